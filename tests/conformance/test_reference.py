"""The dense references of ``tests/reference.py`` checked against each other and by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from . import reference as ref
from .models import DT, MODELS

CHAINS = [
    name
    for name, spec in MODELS.items()
    if spec.chain and spec.second_order and spec.out not in ("seq", "seq_last")
]


def _layernorm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.reshape(-1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_hessian_agrees_with_double_backward_and_finite_differences_through_layernorm():
    model = _layernorm_model()
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    H = ref.dense_hessian(model, loss_fn, (x,), y)
    assert _relative(H, ref.double_backward_hessian(model, loss_fn, (x,), y)) < 1e-12
    assert _relative(H, ref.finite_difference_hessian(model, loss_fn, (x,), y)) < 1e-7
    assert torch.allclose(H, H.T, rtol=0, atol=1e-14)


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    for p in model[0].parameters():  # the product of two trainable layers is not linear
        p.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    G = ref.dense_ggn(model, nn.MSELoss(), (x,), y)
    assert _relative(G, ref.dense_hessian(model, nn.MSELoss(), (x,), y)) < 1e-12


def test_empirical_fisher_is_a_sum_over_samples_for_vector_outputs():
    model = _layernorm_model()
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    grads = []
    for n in range(6):  # per-sample gradients by plain autograd, one sample at a time
        model.zero_grad()
        F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        grads.append(torch.cat([_grad(p) for p in model.parameters()]))
    G = torch.stack(grads)
    want = G.T @ G / 6
    assert _relative(ref.dense_empirical_fisher(model, loss_fn, (x,), y), want) < 1e-12


def test_empirical_fisher_rows_are_positions_for_sequence_outputs():
    torch.manual_seed(0)
    model = nn.Conv1d(2, 3, 1).to(DT)  # (N, 2, L) -> (N, 3, L): rows of MSE are (n, channel)
    x, y = torch.randn(4, 2, 5, dtype=DT), torch.randn(4, 3, 5, dtype=DT)
    grads = []
    for n in range(4):
        for c in range(3):
            model.zero_grad()
            (model(x[n : n + 1])[0, c] - y[n, c]).square().sum().backward()
            grads.append(torch.cat([_grad(p) for p in model.parameters()]))
    G = torch.stack(grads)
    want = G.T @ G / y.numel()
    got = ref.dense_empirical_fisher(model, nn.MSELoss(), (x,), y)
    assert _relative(got, want) < 1e-12


@pytest.mark.parametrize("name", CHAINS)
def test_hessian_backpropagation_gives_the_hessian_and_ggn_blocks(name):
    torch.manual_seed(0)
    spec = MODELS[name]
    model = spec.build()
    g = torch.Generator().manual_seed(3)
    x = spec.inputs(6, g)
    y = torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.NLLLoss() if spec.out == "logprob" else nn.CrossEntropyLoss()
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    for curvature, full in (("hessian", ref.dense_hessian), ("ggn", ref.dense_ggn)):
        want = ref.block_diagonal(full(model, loss_fn, (x,), y), sizes)
        got = ref.pch_blocks(model, loss_fn, (x,), y, curvature)
        assert (got - want).norm() <= 1e-12 * want.norm() + 1e-14, curvature


@pytest.mark.parametrize("modify", ["pch_clip", "pch_abs"])
def test_pch_blocks_are_positive_semidefinite_and_differ_from_the_hessian(modify):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
    )
    model = model.to(DT)
    x, y = 2 * torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    P = ref.pch_blocks(model, loss_fn, (x,), y, modify)
    H = ref.pch_blocks(model, loss_fn, (x,), y, "hessian")
    assert torch.linalg.eigvalsh(P).min() > -1e-12
    assert torch.linalg.eigvalsh(H).min() < -1e-6  # the Hessian blocks are indefinite here
    last = sum(p.numel() for p in model[-1].parameters())  # no activation above: exact
    assert torch.allclose(P[-last:, -last:], H[-last:, -last:], rtol=0, atol=1e-14)
