"""Exact GGN / empirical-Fisher diagonals against the dense operators and torch.func (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cases import CASE_IDS, CASES, DT, LOSSES, TwoInputs, targets
from torch import nn
from torch.func import functional_call, grad

import secondorder as so
from secondorder.curvature.diagonal import (
    empirical_fisher_diagonal,
    ggn_diagonal,
    per_sample_gradient_diagonal,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "engines"))
from factor_models import MixesSamples, ResidualConv, ResidualMLP, SequenceInside
from graph_models import MLP, ResNet, randomize_batchnorm

RTOL = 1e-10
N = 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def build(case, loss_name, red, n=N):
    model, inputs = case.make(n)
    return model, LOSSES[loss_name](red), inputs, targets(loss_name, n)


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ggn_and_empirical_fisher_diagonals_match_dense(case, loss_name, red):
    model, loss_fn, inputs, y = build(case, loss_name, red)
    data = (inputs, y)
    expected = so.GGN(model, loss_fn, data).to_dense().diagonal()
    assert rel_err(ggn_diagonal(model, loss_fn, data), expected) <= RTOL
    dense_ef = so.Fisher(model, loss_fn, data, kind="empirical").to_dense().diagonal()
    assert rel_err(empirical_fisher_diagonal(model, loss_fn, data), dense_ef) <= RTOL


class SpatialNet(nn.Module):
    """Outputs (N, C, L): cross-entropy rows are positions, several per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.mix = nn.Conv1d(3, 3, 1)

    def forward(self, x):
        return self.mix(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_cross_entropy_with_positions_and_ignored_rows(red):
    torch.manual_seed(3)
    model = SpatialNet().to(DT)
    x = torch.randn(4, 2, 5, dtype=DT)
    y = torch.randint(0, 3, (4, 5))
    y[1, 2] = y[3, 0] = -100  # ignored positions
    loss_fn = nn.CrossEntropyLoss(reduction=red)
    data = (x, y)
    expected = so.GGN(model, loss_fn, data).to_dense().diagonal()
    assert rel_err(ggn_diagonal(model, loss_fn, data), expected) <= RTOL
    dense_ef = so.Fisher(model, loss_fn, data, kind="empirical").to_dense().diagonal()
    assert rel_err(empirical_fisher_diagonal(model, loss_fn, data), dense_ef) <= RTOL


def test_probability_targets_and_label_smoothing():
    model, inputs = CASES[0].make(N)
    probs = torch.softmax(torch.randn(N, 3, dtype=DT), -1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for y in (probs, targets("ce", N)):
        expected = so.GGN(model, loss_fn, (inputs, y)).to_dense().diagonal()
        assert rel_err(ggn_diagonal(model, loss_fn, (inputs, y)), expected) <= RTOL


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_several_batches_weighted_like_the_operators(red):
    model, loss_fn, inputs, y = build(CASES[0], "mse", red, n=9)
    (x,) = inputs
    batches = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]
    whole = (x, y)
    assert (
        rel_err(ggn_diagonal(model, loss_fn, batches), ggn_diagonal(model, loss_fn, whole)) <= RTOL
    )
    dense = so.GGN(model, loss_fn, batches).to_dense().diagonal()
    assert rel_err(ggn_diagonal(model, loss_fn, batches), dense) <= RTOL
    ef_parts = empirical_fisher_diagonal(model, loss_fn, iter(batches))  # a one-shot iterator
    assert rel_err(ef_parts, empirical_fisher_diagonal(model, loss_fn, whole)) <= RTOL


def test_parameter_subset_and_chunking():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    params = [model[2].weight, model[4].bias]
    data = (inputs, y)
    expected = so.GGN(model, loss_fn, data, params=params).to_dense().diagonal()
    got = ggn_diagonal(model, loss_fn, data, params=params)
    assert got.shape == (model[2].weight.numel() + model[4].bias.numel(),)
    assert rel_err(got, expected) <= RTOL
    full = ggn_diagonal(model, loss_fn, data)
    assert rel_err(ggn_diagonal(model, loss_fn, data, chunk_size=1), full) <= RTOL
    assert rel_err(ggn_diagonal(model, loss_fn, data, chunk_size=4), full) <= RTOL


def test_losses_without_a_likelihood_are_refused():
    model, inputs = CASES[0].make(N)
    y = targets("mse", N)

    def custom(out, t):
        return ((out - t) ** 4).mean()

    with pytest.raises(ValueError, match="needs a loss with a likelihood"):
        ggn_diagonal(model, custom, (inputs, y))
    with pytest.raises(ValueError, match="needs a loss with a likelihood"):
        empirical_fisher_diagonal(model, nn.L1Loss(), (inputs, y))
    with pytest.raises(ValueError, match="needs a loss with a likelihood"):
        ggn_diagonal(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), (inputs, y))
    with pytest.raises(ValueError, match="chunk_size"):
        ggn_diagonal(model, nn.MSELoss(), (inputs, y), chunk_size=0)


def test_outputs_without_a_batch_dimension_are_refused():
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).sum(0, keepdim=True)  # (1, 3) for a batch of 5: samples interact

    model = Summed().to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    with pytest.raises(ValueError, match="leading batch dimension"):
        ggn_diagonal(model, nn.MSELoss(), (x, y))


def _reference_per_sample(model, loss_fn, x, y, mean):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    total = None
    for i in range(x.shape[0]):
        g = grad(lambda v, i=i: loss_fn(functional_call(model, v, (x[i : i + 1],)), y[i : i + 1]))(
            values
        )
        sq = torch.cat([g[n].reshape(-1) for n in names]).square()
        total = sq if total is None else total + sq
    return total / x.shape[0] if mean else total


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_per_sample_gradient_diagonal_against_a_loop(red):
    model, loss_fn, (x,), y = build(CASES[0], "mse", red, n=7)
    expected = _reference_per_sample(model, loss_fn, x, y, red == "mean")
    got = per_sample_gradient_diagonal(model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert rel_err(got, expected) <= RTOL


def test_per_sample_gradient_diagonal_of_a_value_model():
    from secondorder.experiments.models import Rosenbrock, value_loss

    model = Rosenbrock(dtype=DT)
    d = per_sample_gradient_diagonal(model, value_loss, (torch.zeros(1, dtype=DT), None))
    g = torch.autograd.grad(model(), model.x)[0]
    assert rel_err(d, g.square()) <= RTOL


# ------------------------------------------------ Kronecker fast path (nn.Linear layers)
def _spy_fast_path(monkeypatch):
    from secondorder.curvature import diagonal_paths

    calls = {"fast": 0}
    real = diagonal_paths._kron_diagonal

    def spy(*args):
        out = real(*args)
        calls["fast"] += out is not None
        return out

    monkeypatch.setattr(diagonal_paths, "_kron_diagonal", spy)
    return calls


def _without_fast_path(monkeypatch, fn):
    from secondorder.curvature import diagonal_paths

    with monkeypatch.context() as m:
        m.setattr(diagonal_paths, "_kron_diagonal", lambda *args: None)
        return fn()


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_kronecker_path_is_taken_and_equals_the_vmap_path(monkeypatch, loss_name, red):
    # an MLP with a frozen BatchNorm between its Linear layers and a parameter subset
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    model = nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.weight.uniform_(0.5, 1.5)
    bn.requires_grad_(False)
    loss_fn = LOSSES[loss_name](red)
    data = [((torch.randn(5, 4, dtype=DT),), targets(loss_name, 5, seed=s)) for s in (1, 2)]
    data = [(x, y) for (x,), y in data]
    for params in (None, [model[3].weight, model[0].bias]):
        calls = _spy_fast_path(monkeypatch)
        got_ggn = ggn_diagonal(model, loss_fn, data, params=params)
        got_ef = empirical_fisher_diagonal(model, loss_fn, data, params=params)
        assert calls["fast"] == 4  # two batches, two diagonals
        ref_ggn = so.GGN(model, loss_fn, data, params=params).to_dense().diagonal()
        ref_ef = so.Fisher(model, loss_fn, data, params=params, kind="empirical")
        assert rel_err(got_ggn, ref_ggn) <= RTOL
        assert rel_err(got_ef, ref_ef.to_dense().diagonal()) <= RTOL
        slow = _without_fast_path(
            monkeypatch, lambda p=params: ggn_diagonal(model, loss_fn, data, params=p)
        )
        assert rel_err(got_ggn, slow) <= RTOL


def test_fast_path_on_sequence_inputs_and_declines_tied_weights(monkeypatch):
    # Linear on (N, T, d) inputs and outputs: T loss rows per sample, one cotangent column per
    # row; the per-sample gradients of each column are sums over T, not outer products
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 3, 2, dtype=DT)
    calls = _spy_fast_path(monkeypatch)
    got = empirical_fisher_diagonal(model, nn.MSELoss(), (x, y))

    class Wrapped(nn.Module):  # the same function through the autograd linearisation
        def __init__(self) -> None:
            super().__init__()
            self.seq = model

        def forward(self, x):
            return self.seq(x)

    ref = so.Fisher(Wrapped(), nn.MSELoss(), (x, y), kind="empirical").to_dense().diagonal()
    assert calls["fast"] == 1 and rel_err(got, ref) <= RTOL
    got = ggn_diagonal(model, nn.MSELoss(), (x, y))
    ref = so.GGN(Wrapped(), nn.MSELoss(), (x, y)).to_dense().diagonal()
    assert calls["fast"] == 2 and rel_err(got, ref) <= RTOL
    slow = _without_fast_path(monkeypatch, lambda: ggn_diagonal(model, nn.MSELoss(), (x, y)))
    assert rel_err(got, slow) <= RTOL
    calls["fast"] = 0
    tied_model, inputs = CASES[CASE_IDS.index("tied_sequential")].make(5)
    data = (inputs, targets("ce", 5))
    got = ggn_diagonal(tied_model, nn.CrossEntropyLoss(), data)
    ref = so.GGN(tied_model, nn.CrossEntropyLoss(), data).to_dense().diagonal()
    assert calls["fast"] == 0 and rel_err(got, ref) <= RTOL


CUSTOM = {
    "custom_mlp": (lambda: MLP((4, 6, 5, 3)), lambda n: (torch.randn(n, 4),), True),
    "residual_mlp": (ResidualMLP, lambda n: (torch.randn(n, 4),), True),
    "residual_conv": (ResidualConv, lambda n: (torch.randn(n, 1, 6, 6),), True),
    "sequence_inside": (SequenceInside, lambda n: (torch.randn(n, 8),), True),
    "two_inputs": (TwoInputs, lambda n: (torch.randn(n, 3), torch.randn(n, 2)), True),
    "resnet_bn": (
        lambda: randomize_batchnorm(ResNet((2, 3), 3)),
        lambda n: (torch.randn(n, 1, 6, 6),),
        True,
    ),
    "mixes_samples": (MixesSamples, lambda n: (torch.randn(n, 4),), False),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", list(CUSTOM))
def test_fast_path_on_custom_modules_equals_dense_and_vmap(monkeypatch, name, loss_name):
    build_model, inputs, fast = CUSTOM[name]
    torch.manual_seed(0)
    model = build_model().to(DT)
    loss_fn = LOSSES[loss_name]("mean")
    data = [(tuple(t.to(DT) for t in inputs(n)), targets(loss_name, n, seed=n)) for n in (5, 3)]
    calls = _spy_fast_path(monkeypatch)
    got_ggn, info = ggn_diagonal(model, loss_fn, data, return_info=True)
    got_ef = empirical_fisher_diagonal(model, loss_fn, data)
    assert calls["fast"] == (4 if fast else 0)
    assert info.paths == (["kronecker"] * 2 if fast else ["batch"] * 2)
    ref_ggn = so.GGN(model, loss_fn, data).to_dense().diagonal()
    ref_ef = so.Fisher(model, loss_fn, data, kind="empirical").to_dense().diagonal()
    assert rel_err(got_ggn, ref_ggn) <= RTOL
    assert rel_err(got_ef, ref_ef) <= RTOL
    if fast:
        slow = _without_fast_path(monkeypatch, lambda: ggn_diagonal(model, loss_fn, data))
        assert rel_err(got_ggn, slow) <= RTOL


@pytest.mark.parametrize("name", ["custom_mlp", "resnet_bn", "sequence_inside"])
def test_fast_path_in_column_chunks_equals_all_columns(monkeypatch, name):
    import secondorder.curvature.engines.factors as factors

    build_model, inputs, _ = CUSTOM[name]
    torch.manual_seed(0)
    model = build_model().to(DT)
    data = (tuple(t.to(DT) for t in inputs(4)), targets("ce", 4))
    whole, info = ggn_diagonal(model, nn.CrossEntropyLoss(), data, return_info=True)
    monkeypatch.setattr(factors, "_COLUMN_ELEMENTS", 1)  # one column per reverse pass
    chunked = ggn_diagonal(model, nn.CrossEntropyLoss(), data)
    assert info.paths == ["kronecker"] and rel_err(chunked, whole) <= 1e-13
