"""Operators on a model compiled by ``torch.compile``: products through the module underneath.

``torch.compile`` with an AOT backend has no double backward, so every product on the compiled
wrapper itself would raise; :func:`~secondorder.curvature.model.unwrap_compiled` evaluates the
module underneath (the same Parameter objects). Products on the compiled model must equal those
on the plain one exactly (float64). ``backend="aot_eager"`` is the AOT path of the default
backend without its code generation (seconds per model on CPU); one test runs the default one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature import (
    BlockDiagonalCurvature,
    FunctionalModel,
    LowRankGGN,
    empirical_fisher_diagonal,
    ggn_diagonal,
    per_sample_gradient_diagonal,
)
from secondorder.curvature.model import unwrap_compiled

DT = torch.float64


class Residual(nn.Module):
    """Not an nn.Sequential: traced by the graph engine."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.sigmoid(self.mid(h)))


def sequential():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))


def problem(make, seed=0):
    torch.manual_seed(seed)
    model = make().to(DT)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


OPERATORS = {
    "ggn": lambda m, f, d: so.GGN(m, f, d),
    "ggn_autograd": lambda m, f, d: so.GGN(m, f, d, engine="autograd"),
    "hessian": lambda m, f, d: so.Hessian(m, f, d),
    "hessian_autograd": lambda m, f, d: so.Hessian(m, f, d, engine="autograd"),
    "fisher_exact": lambda m, f, d: so.Fisher(m, f, d, kind="exact"),
    "fisher_mc": lambda m, f, d: so.Fisher(
        m, f, d, kind="mc", num_samples=2, generator=torch.Generator().manual_seed(3)
    ),
    "fisher_empirical": lambda m, f, d: so.Fisher(m, f, d, kind="empirical"),
    "lowrank_ggn": lambda m, f, d: LowRankGGN(m, f, d),
    "block_ggn": lambda m, f, d: BlockDiagonalCurvature(m, f, d, curvature="ggn"),
    "block_hessian": lambda m, f, d: BlockDiagonalCurvature(m, f, d, curvature="hessian"),
    "block_pch": lambda m, f, d: BlockDiagonalCurvature(m, f, d, curvature="pch_abs"),
    "kfac_exact": lambda m, f, d: so.KFAC(m, f, d, fisher="exact"),
    "ekfac_empirical": lambda m, f, d: so.EKFAC(m, f, d, fisher="empirical"),
}
DIAGONALS = {
    "ggn_diagonal": ggn_diagonal,
    "empirical_fisher_diagonal": empirical_fisher_diagonal,
    "per_sample_gradient_diagonal": per_sample_gradient_diagonal,
}
MODELS = {"sequential": sequential, "residual": Residual}


@pytest.fixture(scope="module", params=list(MODELS))
def compiled_problem(request):
    """A model, its compiled wrapper (already run once: its graph exists) and a batch."""
    model, loss_fn, X, y = problem(MODELS[request.param])
    compiled = torch.compile(model, backend="aot_eager")
    loss_fn(compiled(X), y).backward()  # the compiled forward and backward run
    model.zero_grad()
    return model, compiled, loss_fn, X, y


@pytest.mark.parametrize("name", list(OPERATORS))
def test_products_on_compiled_model_equal_plain(compiled_problem, name):
    model, compiled, loss_fn, X, y = compiled_problem
    plain_op = OPERATORS[name](model, loss_fn, (X, y))
    compiled_op = OPERATORS[name](compiled, loss_fn, (X, y))
    if isinstance(plain_op, LowRankGGN):  # a factor, not a LinearOperator
        expected, got = plain_op.factor(), compiled_op.factor()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(compiled_op.gradient(), plain_op.gradient(), rtol=1e-10, atol=0)
        return
    n = plain_op.shape[0]
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    expected = plain_op @ V
    torch.testing.assert_close(compiled_op @ V, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled_op @ V[:, 0], expected[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(DIAGONALS))
def test_diagonals_on_compiled_model_equal_plain(compiled_problem, name):
    model, compiled, loss_fn, X, y = compiled_problem
    expected = DIAGONALS[name](model, loss_fn, (X, y))
    torch.testing.assert_close(
        DIAGONALS[name](compiled, loss_fn, (X, y)), expected, rtol=1e-10, atol=1e-12
    )


def test_loss_and_gradient_equal_the_compiled_forward(compiled_problem):
    """The operator's loss and gradient equal those of the user's compiled forward/backward."""
    model, compiled, loss_fn, X, y = compiled_problem
    G = so.GGN(compiled, loss_fn, (X, y))
    loss = loss_fn(compiled(X), y)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    torch.testing.assert_close(G.loss, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(G.gradient(), grad, rtol=1e-10, atol=1e-12)


def test_functional_model_sees_the_module_underneath(compiled_problem):
    model, compiled, _, _, _ = compiled_problem
    fm, fc = FunctionalModel(model), FunctionalModel(compiled)
    assert fc.model is model and fc.compiled is compiled and fm.compiled is None
    assert fc.names == fm.names  # no "_orig_mod." prefix
    assert all(a is b for a, b in zip(fc.params, fm.params))
    assert unwrap_compiled(model) is model


def test_default_backend():
    """The default (inductor) backend: the user's forward runs compiled, products underneath."""
    model, loss_fn, X, y = problem(sequential)
    compiled = torch.compile(model)
    compiled_out = compiled(X)
    torch.testing.assert_close(compiled_out, model(X), rtol=1e-10, atol=1e-12)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=DT)
    for make in (so.GGN, so.Hessian):
        torch.testing.assert_close(
            make(compiled, loss_fn, (X, y)) @ V,
            make(model, loss_fn, (X, y)) @ V,
            rtol=1e-10,
            atol=1e-12,
        )
