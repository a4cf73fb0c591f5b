"""Infinite tolerances are valid (``>= 0``): the solve stops at once, as scipy's ``cg`` does."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from secondorder.linalg import CGStatus, Dense, SolverStatus, block_cg, cg, eigmax, lanczos
from secondorder.linalg.cg_callbacks import MartensStop

F64 = torch.float64


def _problem(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return a @ a.T + torch.eye(n, dtype=F64), torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize(
    "kwargs", [{"rtol": math.inf}, {"atol": math.inf}, {"rtol": math.inf, "atol": math.inf}]
)
@pytest.mark.parametrize("with_x0", [False, True])
def test_cg_infinite_tolerance_returns_x0_at_once(kwargs: dict, with_x0: bool) -> None:
    a, b = _problem()
    x0 = torch.full_like(b, 0.5) if with_x0 else None
    x, info = cg(a, b, x0, **kwargs)
    assert info.status == CGStatus.CONVERGED and info.iterations == 0
    assert info.tol == math.inf
    expected = torch.zeros_like(b) if x0 is None else x0
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    # scipy agrees: immediate return with x0
    x_sp, flag = spla.cg(a.numpy(), b.numpy(), x0=None if x0 is None else x0.numpy(), **kwargs)
    assert flag == 0
    np.testing.assert_array_equal(x_sp, expected.numpy())


def test_cg_infinite_rtol_with_zero_rhs() -> None:
    a, b = _problem()
    x, info = cg(a, torch.zeros_like(b), rtol=math.inf)
    assert info.status == CGStatus.CONVERGED and info.tol == 0.0 and not bool(x.any())


def test_cg_infinite_martens_eps() -> None:
    n = 60
    a = torch.diag(torch.linspace(1.0, 1e4, n, dtype=F64))
    b = torch.ones(n, dtype=F64)
    _, info = cg(a, b, rtol=0.0, maxiter=200, callback=MartensStop(eps=math.inf))
    assert info.status == CGStatus.CALLBACK and info.iterations == 11


def test_cg_infinite_rtol_with_nonfinite_b_is_still_reported() -> None:
    a, b = _problem()
    b[0] = math.nan
    _, info = cg(a, b, rtol=math.inf)
    assert info.status == CGStatus.NONFINITE


@pytest.mark.parametrize("bad", [-1.0, math.nan, -math.inf])
@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_cg_still_refuses_negative_and_nan(name: str, bad: float) -> None:
    a, b = _problem()
    with pytest.raises(ValueError, match=rf"{name} must be a non-negative float \(inf allowed\)"):
        kwargs: dict[str, Any] = {name: bad}
        cg(a, b, **kwargs)


@pytest.mark.parametrize(
    ("rtols", "atols"),
    [
        ([math.inf] * 2, [0.0] * 2),
        ([1e-12] * 2, [math.inf] * 2),
        ([math.inf, 1e-12], [0.0, 0.0]),
        ([1e-12, 1e-12], [0.0, math.inf]),
    ],
)
@pytest.mark.parametrize("flat", [False, True])
def test_block_cg_infinite_tolerance(rtols: list, atols: list, flat: bool) -> None:
    a, b = _problem()
    mats = [a, a[:5, :5]]
    rhs = [b, b[:5] + 1.0]

    def apply(idx: list[int], vs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [mats[i] @ v for i, v in zip(idx, vs)]

    if flat:
        x, info = block_cg(apply, torch.cat(rhs), sizes=[8, 5], rtol=rtols, atol=atols)
    else:
        x, info = block_cg(apply, rhs, rtol=rtols, atol=atols)
    assert info.status == [SolverStatus.CONVERGED] * 2
    for i in range(2):
        if math.inf in (rtols[i], atols[i]):
            assert info.iterations[i] == 0 and not bool(x[i].any())
            assert info.tolerances[i] == math.inf
        else:
            torch.testing.assert_close(mats[i] @ x[i], rhs[i])


def test_block_cg_infinite_rtol_with_zero_rhs() -> None:
    a, b = _problem()
    x, info = block_cg(lambda idx, vs: [a @ v for v in vs], [torch.zeros_like(b)], rtol=math.inf)
    assert info.status == [SolverStatus.CONVERGED] and info.tolerances == [0.0]
    assert not bool(x[0].any())


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_block_cg_refuses_negative_and_nan(bad: float) -> None:
    a, b = _problem()
    with pytest.raises(ValueError, match=r"rtol must be >= 0 \(inf allowed\)"):
        block_cg(lambda idx, vs: [a @ v for v in vs], [b], rtol=bad)


def test_lanczos_infinite_tol_stops_at_first_test() -> None:
    n = 80
    a = torch.diag(torch.linspace(0.0, 1.0, n, dtype=F64))
    evals, _, info = lanczos(Dense(a, symmetric=True), 2, tol=math.inf, return_info=True)
    assert info.converged and info.status == CGStatus.CONVERGED and info.num_matvecs == 2
    assert bool(torch.isfinite(evals).all())
    assert math.isfinite(eigmax(Dense(a, symmetric=True), tol=math.inf))
