r"""Curvature operators of bfloat16/float16 models and under ``torch.autocast``.

A model with low-precision parameters is evaluated through a float32 copy at its parameter
values (``FunctionalModel(dtype=...)``), so every product is the float32 product of the
function the low-precision parameters define. Two kinds of check follow from that:

- **exact at the rounded parameters**: against dense float64 references of the same model
  cast to float64 (its bfloat16 values are exact in float64) and inputs rounded the same way,
  products agree to float32 rounding. We allow ``RTOL_F32 = 2**-16`` (about 250 float32 units
  :math:`2^{-24}`: a few dozen float32 roundings per output grow through a handful of layers);
  a product computed in bfloat16 end to end (``dtype=torch.bfloat16``, the behaviour before)
  is off by about :math:`2^{-8}` and fails it (checked below);
- **within bfloat16 rounding of the float32 model**: against the original float32 model,
  rounding the parameters and inputs to bfloat16 (unit roundoff :math:`u = 2^{-9}`) perturbs
  each of :math:`L` layers' maps by :math:`O(u)` relatively; independent perturbations add in
  quadrature, so products differ by about :math:`u \sqrt{L}` relatively times the conditioning
  of the product, for which we allow a factor 4: ``4 * 2**-9 * sqrt(L)`` (``L`` counts the
  parameterised layers on the longest path).

Under ``torch.autocast`` the operators switch autocast off: products equal those without it.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature.blockwise import BlockDiagonalCurvature
from secondorder.curvature.diagonal import (
    empirical_fisher_diagonal,
    ggn_diagonal,
    per_sample_gradient_diagonal,
)
from secondorder.curvature.lowrank import LowRankGGN
from secondorder.curvature.model import FunctionalModel, compute_dtype

# the dense float64 references of tests/reference.py (jacrev(grad(.)) Hessians), by path: the
# reference.py next to this file is an older one
_spec = importlib.util.spec_from_file_location(
    "dense_reference", Path(__file__).resolve().parents[1] / "reference.py"
)
assert _spec is not None and _spec.loader is not None
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
dense_empirical_fisher, dense_ggn, dense_hessian = (
    _ref.dense_empirical_fisher,
    _ref.dense_ggn,
    _ref.dense_hessian,
)

RTOL_F32 = 2.0**-16
U_BF16 = 2.0**-9
N, T, D = 6, 4, 16


class Encoder(nn.Module):
    """A small transformer: one encoder layer (d 16, 2 heads, dropout 0) and a linear head."""

    depth = 5  # attention in/out projections, feed-forward (2), head; LayerNorms ride along

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x)).mean(1)


class MLP(nn.Sequential):
    depth = 2

    def __init__(self) -> None:
        super().__init__(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, 3))


class NormMLP(nn.Sequential):
    """An MLP with a BatchNorm in evaluation mode: buffers that must follow the module."""

    depth = 2

    def __init__(self) -> None:
        super().__init__(nn.Linear(D, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
        self[1].running_mean.uniform_(-0.5, 0.5)
        self[1].running_var.uniform_(0.5, 2.0)
        self.eval()


MODELS = {"transformer": Encoder, "mlp": MLP, "bn_mlp": NormMLP}


def problem(name: str, dtype: torch.dtype = torch.bfloat16):
    """(float32 model, low-precision copy, its float64 image, inputs low / float64, targets)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(N, T, D) if name == "transformer" else torch.randn(N, D)
    y = torch.randint(0, 3, (N,))
    low = copy.deepcopy(model).to(dtype)
    exact = copy.deepcopy(low).double()  # the same function, exactly
    return model, low, exact, x, x.to(dtype), x.to(dtype).double(), y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


LOSS = nn.CrossEntropyLoss()

OPERATORS = {
    "ggn": (lambda m, d, **kw: so.GGN(m, LOSS, d, **kw), dense_ggn),
    "hessian": (lambda m, d, **kw: so.Hessian(m, LOSS, d, **kw), dense_hessian),
    "fisher_empirical": (
        lambda m, d, **kw: so.Fisher(m, LOSS, d, kind="empirical", **kw),
        dense_empirical_fisher,
    ),
}


# ----------------------------------------------------------------------------- the dtype


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_default_dtype(param, expected):
    model = MLP().to(param)
    x, y = torch.randn(N, D, dtype=param), torch.randint(0, 3, (N,))
    G = so.GGN(model, LOSS, (x, y))
    assert G.dtype == expected
    assert G.gradient().dtype == expected and G.loss.dtype == expected
    assert compute_dtype(param) == expected


@pytest.mark.parametrize(
    "bad", [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn, "float32", 32]
)
def test_bad_dtype_is_refused(bad):
    model = MLP().bfloat16()
    x, y = torch.randn(N, D, dtype=torch.bfloat16), torch.randint(0, 3, (N,))
    with pytest.raises(TypeError, match="dtype: expected"):
        so.GGN(model, LOSS, (x, y), dtype=bad)


def test_vector_of_the_parameters_dtype_is_refused():
    model = MLP().bfloat16()
    x, y = torch.randn(N, D, dtype=torch.bfloat16), torch.randint(0, 3, (N,))
    G = so.GGN(model, LOSS, (x, y))
    with pytest.raises(ValueError, match=r"expected dtype torch\.float32, got torch\.bfloat16"):
        G @ torch.zeros(G.shape[0], dtype=torch.bfloat16)


def test_model_is_left_alone():
    _, low, _, _, xl, _, y = problem("bn_mlp")
    before = {k: v.clone() for k, v in low.state_dict().items()}
    G = so.GGN(low, LOSS, (xl, y))
    G @ torch.randn(G.shape[0])
    G.gradient()
    for k, v in low.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in low.parameters())


# --------------------------------------------------- exact at the low-precision parameters


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("op", list(OPERATORS))
def test_products_match_float64_at_rounded_parameters(name, op):
    _, low, exact, _, xl, x64, y = problem(name)
    make, dense = OPERATORS[op]
    C = make(low, (xl, y))
    assert C.dtype == torch.float32
    ref = dense(exact, LOSS, (x64,), y)
    V = torch.randn(C.shape[0], 3)
    assert rel(C @ V, ref @ V.double()) < RTOL_F32
    assert rel(C @ V[:, 0], ref @ V[:, 0].double()) < RTOL_F32


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_products_in_bfloat16_end_to_end_fail_the_tolerance(name):
    """The old behaviour (everything in bfloat16) is distinguishable: the test can fail."""
    _, low, exact, _, xl, x64, y = problem(name)
    C = so.GGN(low, LOSS, (xl, y), dtype=torch.bfloat16)
    assert C.dtype == torch.bfloat16
    ref = dense_ggn(exact, LOSS, (x64,), y)
    v = torch.randn(C.shape[0])
    assert rel(C @ v.bfloat16(), ref @ v.double()) > 10 * RTOL_F32


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_on_a_bfloat16_model(name):
    _, low, exact, _, xl, x64, y = problem(name)
    C = so.GGN(low, LOSS, (xl, y), dtype=torch.float64)
    assert C.dtype == torch.float64
    ref = dense_ggn(exact, LOSS, (x64,), y)
    v = torch.randn(C.shape[0], dtype=torch.float64)
    assert rel(C @ v, ref @ v) < 1e-10


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_float16_model(name):
    _, low, exact, _, xl, x64, y = problem(name, torch.float16)
    C = so.GGN(low, LOSS, (xl, y))
    assert C.dtype == torch.float32
    ref = dense_ggn(exact, LOSS, (x64,), y)
    v = torch.randn(C.shape[0])
    assert rel(C @ v, ref @ v.double()) < RTOL_F32


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_gradient_and_loss_at_rounded_parameters(name, engine):
    _, low, exact, _, xl, x64, y = problem(name)
    C = so.GGN(low, LOSS, (xl, y), engine=engine)
    ref = so.GGN(exact, LOSS, (x64, y), engine="autograd")
    assert rel(C.gradient(), ref.gradient()) < RTOL_F32
    assert abs(float(C.loss) - float(ref.loss)) < RTOL_F32 * abs(float(ref.loss))


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch_clip"])
@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_block_diagonal(curvature, engine):
    _, low, exact, _, xl, x64, y = problem("mlp")
    B = BlockDiagonalCurvature(low, LOSS, (xl, y), curvature=curvature, engine=engine)
    R = BlockDiagonalCurvature(exact, LOSS, (x64, y), curvature=curvature, engine=engine)
    assert B.dtype == torch.float32
    v = torch.randn(B.shape[0])
    assert rel(B @ v, R @ v.double()) < RTOL_F32


def test_diagonals_and_low_rank():
    _, low, exact, _, xl, x64, y = problem("mlp")
    for f in (ggn_diagonal, empirical_fisher_diagonal, per_sample_gradient_diagonal):
        d = f(low, LOSS, (xl, y))
        assert d.dtype == torch.float32
        assert rel(d, f(exact, LOSS, (x64, y))) < RTOL_F32, f.__name__
    L = LowRankGGN(low, LOSS, (xl, y))
    assert rel(L.to_dense(), dense_ggn(exact, LOSS, (x64,), y)) < RTOL_F32


def test_buffers_and_mode_follow_the_module():
    """The float32 copy reads buffers, frozen parameters and train/eval flag at every pass."""
    _, low, exact, _, xl, x64, _ = problem("bn_mlp")
    low[0].bias.requires_grad_(False)
    fm = FunctionalModel(low)
    assert len(fm.params) == len(list(low.parameters())) - 1
    with torch.no_grad():
        low[1].running_mean.add_(0.25)
        exact[1].running_mean.copy_(low[1].running_mean)
        low[0].bias.add_(0.5)
        exact[0].bias.copy_(low[0].bias)
    out = fm(fm.values(), (xl,))
    assert out.dtype == torch.float32
    assert rel(out, exact(x64)) < RTOL_F32
    low.train()
    exact.train()
    with torch.no_grad():
        assert rel(fm(fm.values(), (xl,)), exact(x64)) < RTOL_F32


# ------------------------------------------------- within bfloat16 rounding of float32


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("op", list(OPERATORS))
def test_products_within_bfloat16_rounding_of_the_float32_model(name, op):
    model, low, _, x, xl, _, y = problem(name)
    make, _ = OPERATORS[op]
    C, R = make(low, (xl, y)), make(model, (x, y))
    v = torch.randn(C.shape[0])
    assert rel(C @ v, R @ v) < 4 * U_BF16 * math.sqrt(MODELS[name].depth)


# ------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("op", list(OPERATORS))
def test_autocast_products_equal_float32(name, op):
    model, _, _, x, _, _, y = problem(name)
    make, _ = OPERATORS[op]
    ref = make(model, (x, y))
    v = torch.randn(ref.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = make(model, (x, y))
        out, grad = C @ v, C.gradient()
    assert out.dtype == torch.float32
    assert rel(out, ref @ v) < RTOL_F32
    assert rel(grad, ref.gradient()) < RTOL_F32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # built outside, applied inside
        assert rel(ref @ v, ref @ v) == 0.0


def test_autocast_solvers_compute_in_float32():
    """CG, Lanczos and the estimators run in the operator's dtype inside autocast."""
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40))
    A = so.linalg.Dense(Q @ torch.diag(torch.logspace(0, 3, 40)) @ Q.T)
    b = torch.randn(40)
    x_ref, _ = so.cg(A, b, rtol=1e-6)
    ev_ref, _ = so.lanczos(A, 3)
    tr_ref = so.linalg.hutchinson_trace(A, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, _ = so.cg(A, b, rtol=1e-6)
        ev, _ = so.lanczos(A, 3)
        tr = so.linalg.hutchinson_trace(A, 8, generator=torch.Generator().manual_seed(1))
        Ab = A @ torch.eye(40)
    assert x.dtype == torch.float32 and rel(x, x_ref) < RTOL_F32
    assert rel(ev, ev_ref) < RTOL_F32
    assert abs(float(tr) - float(tr_ref)) <= RTOL_F32 * abs(float(tr_ref))
    assert Ab.dtype == torch.float32 and rel(Ab, A.matrix) < RTOL_F32


def test_solvers_on_a_bfloat16_model_run_in_float32():
    _, low, exact, _, xl, x64, y = problem("transformer")
    G = so.GGN(low, LOSS, (xl, y))
    ref = dense_ggn(exact, LOSS, (x64,), y)
    n = G.shape[0]
    lam = 1e-2
    A = G + lam * so.linalg.Identity(n, dtype=G.dtype)
    b = G.gradient()
    x, _ = so.cg(A, b, rtol=1e-5, maxiter=500)
    assert x.dtype == torch.float32
    exact_x = torch.linalg.solve(ref + lam * torch.eye(n, dtype=torch.float64), b.double())
    assert rel(x, exact_x) < 1e-3  # CG's own stopping rule, not bfloat16
    ev, _ = so.lanczos(G, 2)
    ev_ref = torch.linalg.eigvalsh(ref)[-2:]
    assert ev.dtype == torch.float32 and rel(ev, ev_ref) < 1e-4


class Tied(nn.Module):
    """Input and output embeddings tied to one parameter; integer inputs are not cast."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, D)
        self.out = nn.Linear(D, 7)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx))).mean(1)


@pytest.mark.parametrize("op", ["ggn", "hessian"])
def test_tied_parameters_stay_tied(op):
    torch.manual_seed(0)
    low = Tied().bfloat16()
    exact = copy.deepcopy(low).double()
    idx, y = torch.randint(0, 7, (N, T)), torch.randint(0, 7, (N,))
    make, dense = OPERATORS[op]
    C = make(low, (idx, y))
    assert C.shape[0] == sum(p.numel() for p in low.parameters())  # the tied weight once
    v = torch.randn(C.shape[0])
    assert rel(C @ v, dense(exact, LOSS, (idx,), y) @ v.double()) < RTOL_F32


def test_low_rank_methods_under_autocast():
    model, _, _, x, _, _, y = problem("mlp")
    ref = LowRankGGN(model, LOSS, (x, y))
    expected = (ref.eigvalsh(), ref.to_dense(), ref.directional_derivatives([0, 1])[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L = LowRankGGN(model, LOSS, (x, y))
        got = (L.eigvalsh(), L.to_dense(), L.directional_derivatives([0, 1])[0])
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and rel(a, b) < RTOL_F32


@pytest.mark.parametrize("name", ["mlp", "transformer"])
@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
def test_kfac_factors_in_float32_on_a_bfloat16_model(name, cls):
    """K-FAC of a bfloat16 model is the float32 K-FAC of the same function (it raised before)."""
    _, low, exact, _, xl, x64, y = problem(name)
    K = cls(low, LOSS, (xl, y), fisher="exact")
    R = cls(exact, LOSS, (x64, y), fisher="exact")
    assert K.dtype == torch.float32 and K.factor_dtype == torch.float32
    v = torch.randn(K.shape[0])
    assert rel(K @ v, R @ v.double()) < RTOL_F32
    assert rel(K.inverse(1e-2) @ v, R.inverse(1e-2) @ v.double()) < RTOL_F32
