import pytest
import torch

from secondorder.linalg.scalars import host_floats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_floats_reads_every_value_in_order(dtype):
    values = [torch.tensor(v, dtype=dtype) for v in (1.0 / 3.0, -2.5e-30, float("nan"), 7.0)]
    got = host_floats(values)
    assert isinstance(got, list) and all(isinstance(v, float) for v in got)
    expected = torch.stack(values).tolist()
    assert got[:2] + got[3:] == expected[:2] + expected[3:]  # bit for bit, float64 kept
    assert got[2] != got[2]  # NaN reads as NaN
    assert host_floats([]) == []


def test_host_floats_reads_reductions_of_mixed_dtypes():
    a = torch.arange(4, dtype=torch.float64)
    b = torch.ones(3, dtype=torch.float32)
    assert host_floats((torch.dot(a, a), torch.dot(b, b))) == [14.0, 3.0]
