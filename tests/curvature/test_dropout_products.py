"""Dropout in training mode: one fixed mask per linearisation, the products of that network.

The model draws its masks from the default generator; an operator built after
``torch.manual_seed(s)`` must be the curvature of the network whose dropout layers are replaced
by the masks that the model's own forward draws from state ``s`` (``FixedMask``), and every
product of one operator uses that one mask (deterministic). References are dense float64
matrices of the fixed-mask network (``tests/reference.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from conformance import reference as ref
from secondorder.curvature.layers import rule_for

DT = torch.float64
SEED = 7


class DropNet(nn.Module):
    """Dropout modules and ``F.dropout`` between layers; ``masks`` replaces them (reference)."""

    def __init__(self, masks: list[Tensor] | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.4)
        self.conv = nn.Conv1d(2, 2, 1)
        self.drop1d = nn.Dropout1d(0.5)
        self.b = nn.Linear(6, 3)
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = self.drop(h) if self.masks is None else h * self.masks[0]
        h = self.conv(h.view(-1, 2, 3))
        h = self.drop1d(h) if self.masks is None else h * self.masks[1]
        h = torch.tanh(h.flatten(1))
        h = F.dropout(h, 0.3, self.training) if self.masks is None else h * self.masks[2]
        return self.b(h)


def masks_from(seed: int, n: int) -> list[Tensor]:
    """The masks DropNet's forward draws on a batch of ``n`` from ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    one = torch.ones((), dtype=DT)
    return [
        F.dropout(one.expand(n, 6), 0.4, True),
        F.dropout1d(one.expand(n, 2, 3), 0.5, True),
        F.dropout(one.expand(n, 6), 0.3, True),
    ]


def _pair(n: int = 8) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = DropNet().to(DT).train()
    fixed = DropNet(masks_from(SEED, n)).to(DT)
    fixed.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, fixed, X, y


def test_the_masks_are_the_models_draw():
    model, fixed, X, _ = _pair()
    torch.manual_seed(SEED)
    out = model(X)
    torch.testing.assert_close(out, fixed(X), rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: nn.Dropout(0.3), (5, 4)),
        (lambda: nn.Dropout(0.7), (2, 3, 4)),
        (lambda: nn.Dropout1d(0.5), (3, 4, 5)),
        (lambda: nn.Dropout1d(0.5), (4, 5)),  # unbatched
        (lambda: nn.Dropout2d(0.5), (2, 3, 2, 2)),
        (lambda: nn.Dropout3d(0.4), (2, 3, 2, 2, 2)),
    ],
)
def test_rule_reproduces_the_module_and_transposes(build, shape):
    module = build().train()
    rule, why = rule_for(module)
    assert rule is not None, why
    x = torch.randn(*shape, dtype=DT)
    torch.manual_seed(SEED)
    want = module(x)
    torch.manual_seed(SEED)
    out, ctx = rule.forward(module, x, {})
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # the products are the fixed mask, J^T the transpose of J, and columns batch
    mask = ctx["mask"]
    dx, u = torch.randn_like(x), torch.randn_like(x)
    jv = rule.jvp(module, ctx, dx, {}, False)
    torch.testing.assert_close(jv, dx * mask)
    torch.testing.assert_close(rule.vjp(module, ctx, u, True, {}, False), u * mask)
    K = torch.randn(3, *shape, dtype=DT)
    torch.testing.assert_close(rule.jvp(module, ctx, K, {}, True), K * mask)
    torch.testing.assert_close(rule.vjp(module, ctx, K, True, {}, True), K * mask)
    assert rule.prepare_residual(module, ctx, x, {}, u) is None
    assert set(mask.unique().tolist()) <= {0.0, 1.0 / (1.0 - module.p)}


OPERATORS = {
    "ggn": (lambda m, d: so.GGN(m, nn.CrossEntropyLoss(), d), "ggn"),
    "ggn_autograd": (lambda m, d: so.GGN(m, nn.CrossEntropyLoss(), d, engine="autograd"), "ggn"),
    "hessian": (lambda m, d: so.Hessian(m, nn.CrossEntropyLoss(), d), "hessian"),
    "hessian_autograd": (
        lambda m, d: so.Hessian(m, nn.CrossEntropyLoss(), d, engine="autograd"),
        "hessian",
    ),
    "fisher_exact": (lambda m, d: so.Fisher(m, nn.CrossEntropyLoss(), d, kind="exact"), "ggn"),
    "fisher_empirical": (
        lambda m, d: so.Fisher(m, nn.CrossEntropyLoss(), d, kind="empirical"),
        "ef",
    ),
    "block_ggn": (
        lambda m, d: so.BlockDiagonalCurvature(m, nn.CrossEntropyLoss(), d, curvature="ggn"),
        "ggn_blocks",
    ),
    "block_hessian": (
        lambda m, d: so.BlockDiagonalCurvature(m, nn.CrossEntropyLoss(), d, curvature="hessian"),
        "hessian_blocks",
    ),
}


def _dense(kind: str, fixed: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    loss_fn = nn.CrossEntropyLoss()
    if kind in ("ggn", "ggn_blocks"):
        M = ref.dense_ggn(fixed, loss_fn, (X,), y)
    elif kind == "ef":
        M = ref.dense_empirical_fisher(fixed, loss_fn, (X,), y)
    else:
        M = ref.double_backward_hessian(fixed, loss_fn, (X,), y)
    if kind.endswith("_blocks"):
        M = ref.block_diagonal(M, [p.numel() for p in fixed.parameters()])
    return M


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_is_the_fixed_mask_network(name):
    build, kind = OPERATORS[name]
    model, fixed, X, y = _pair()
    torch.manual_seed(SEED)
    op = build(model, (X, y))
    want = _dense(kind, fixed, X, y)
    v = torch.randn(op.shape[0], dtype=DT)
    first = op @ v
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)  # one mask for every product
    torch.testing.assert_close(first, want @ v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), want, rtol=1e-9, atol=1e-12)
    if hasattr(op, "gradient"):
        g = ref.gradient(fixed, nn.CrossEntropyLoss(), (X,), y)
        torch.testing.assert_close(op.gradient(), g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            op.loss, ref.loss_value(fixed, nn.CrossEntropyLoss(), (X,), y), rtol=1e-12, atol=0
        )


def test_streamed_operator_refuses_a_random_model_clearly():
    """Without a cache every product draws new masks: the determinism check says so."""
    model, _, X, y = _pair()
    with pytest.raises(RuntimeError, match="Dropout"):
        so.GGN(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])], cache=False)


@pytest.mark.parametrize("name", ["ggn_diagonal", "ef_diagonal", "lowrank", "lowrank_autograd"])
def test_diagonals_and_low_rank_are_the_fixed_mask_network(name):
    from secondorder.curvature.lowrank import LowRankGGN

    model, fixed, X, y = _pair()
    loss_fn = nn.CrossEntropyLoss()
    ggn = ref.dense_ggn(fixed, loss_fn, (X,), y)
    torch.manual_seed(SEED)
    if name == "ggn_diagonal":
        got, want = so.ggn_diagonal(model, loss_fn, (X, y)), ggn.diagonal()
    elif name == "ef_diagonal":
        got = so.empirical_fisher_diagonal(model, loss_fn, (X, y))
        want = ref.dense_empirical_fisher(fixed, loss_fn, (X,), y).diagonal()
    else:
        engine = {"lowrank": "auto", "lowrank_autograd": "autograd"}[name]
        got, want = LowRankGGN(model, loss_fn, (X, y), engine=engine).to_dense(), ggn
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_pch_products_are_deterministic():
    model, _, X, y = _pair()
    torch.manual_seed(SEED)
    P = so.PCH(model, nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(P.shape[0], 3, dtype=DT)
    torch.testing.assert_close(P @ V, P @ V, rtol=0, atol=0)
    D = P.to_dense()
    torch.testing.assert_close(D, D.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(D).min() > -1e-10


def test_module_wise_block_engine_refuses_a_random_dropout_and_takes_an_inactive_one():
    torch.manual_seed(0)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).to(DT)
    with pytest.raises(ValueError, match="Dropout in training mode"):
        so.BlockDiagonalCurvature(net, nn.CrossEntropyLoss(), (X, y), engine="sequential")
    B = so.BlockDiagonalCurvature(net.eval(), nn.CrossEntropyLoss(), (X, y), engine="sequential")
    assert B.engine == "sequential"
