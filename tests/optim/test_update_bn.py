"""update_bn: running statistics equal the data set's own, computed directly in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import secondorder as so


def norm_inputs(model: nn.Module, chunks: list[torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
    """Each norm layer's inputs over all chunks, from a copy run in training mode."""
    twin = copy.deepcopy(model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    names = {m: n for n, m in twin.named_modules()}
    hooks = [
        m.register_forward_pre_hook(lambda m, a: seen.setdefault(names[m], []).append(a[0]))
        for m in twin.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
    ]
    with torch.no_grad():
        for x in chunks:
            twin(x)
    for h in hooks:
        h.remove()
    own = dict(model.named_modules())
    return {own[n]: torch.cat(xs) for n, xs in seen.items()}


def bn_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.double().movedim(1, -1).reshape(-1, x.shape[1])
    return rows.mean(0), rows.var(0, unbiased=True)


def in_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().flatten(2)
    return flat.mean(-1).mean(0), flat.var(-1, unbiased=True).mean(0)


MODELS = {
    "bn1d": lambda: nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)),
    "bn2d_twice": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 2), nn.BatchNorm2d(4)
    ),
    "bn_momentum_none": lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)),
    "instancenorm": lambda: nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, track_running_stats=True)
    ),
    "bn3d": lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2)),
}
SHAPES = {
    "bn1d": (3,),
    "bn2d_twice": (1, 6, 6),
    "bn_momentum_none": (3,),
    "instancenorm": (2, 7),
    "bn3d": (1, 3, 3, 3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("sizes", [(4, 4, 4), (7, 2, 5)], ids=["equal", "unequal"])
def test_running_stats_equal_the_data_sets(name, sizes):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    X = torch.randn(sum(sizes), *SHAPES[name]) * 3 + 1
    chunks = list(X.split(sizes))
    expected = norm_inputs(model, chunks)
    momenta = [m.momentum for m in expected]
    so.update_bn([(x, torch.zeros(len(x))) for x in chunks], model)
    assert not model.training and all(not m.training for m in model.modules())
    assert [m.momentum for m in expected] == momenta
    for layer, x in expected.items():
        ref = in_reference(x) if isinstance(layer, nn.InstanceNorm1d) else bn_reference(x)
        torch.testing.assert_close(layer.running_mean.double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), ref[1], rtol=1e-5, atol=1e-6)
        assert int(layer.num_batches_tracked) == len(chunks)


def test_inputs_only_tuples_loaders_and_devices():
    torch.manual_seed(1)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a, b):
            return self.bn(a + b)

    X, Y = torch.randn(9, 3), torch.randn(9, 3)
    model = TwoInputs()
    loader = DataLoader(TensorDataset(X, Y, torch.zeros(9)), batch_size=5)
    so.update_bn((((a, b), t) for a, b, t in loader), model, device="cpu")
    mean, var = bn_reference(X + Y)
    torch.testing.assert_close(model.bn.running_mean.double(), mean)
    torch.testing.assert_close(model.bn.running_var.double(), var)

    plain = nn.BatchNorm1d(3)
    so.update_bn(DataLoader(X, batch_size=5), plain)  # batches of inputs alone
    torch.testing.assert_close(plain.running_mean.double(), bn_reference(X)[0])


def test_means_agree_with_torch_update_bn_on_equal_batches():
    torch.manual_seed(2)
    model = MODELS["bn2d_twice"]()
    twin = copy.deepcopy(model)
    X = torch.randn(12, 1, 6, 6)
    so.update_bn([(x, None) for x in X.split(4)], model)
    torch.optim.swa_utils.update_bn([[x] for x in X.split(4)], twin)
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[4].running_mean, twin[4].running_mean)


def test_failures_leave_the_statistics_alone():
    model = MODELS["bn1d"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield torch.randn(4, 3), None
        yield torch.randn(4, 7), None  # wrong width: the forward fails

    with pytest.raises(RuntimeError):
        so.update_bn(batches(), model)
    with pytest.raises(ValueError, match="no batch"):
        so.update_bn([], model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_a_model_without_norm_layers_is_left_alone():
    model = nn.Linear(2, 2)
    so.update_bn([], model)  # nothing to update, nothing read
