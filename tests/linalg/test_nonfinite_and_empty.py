"""Fault injection: NaN/Inf operators and right-hand sides, and products with zero columns.

Every solver and estimator reports a NaN/Inf in the same way: functions that return an info
object report it there (``SolverStatus.NONFINITE``) and do not raise; functions
that return only numbers raise :class:`~secondorder.linalg.NonFiniteError` (a ``ValueError``
and a ``FloatingPointError``), never torch's ``_LinAlgError`` nor a NaN result. Every
:class:`LinearOperator` maps ``(n, 0)`` to ``(m, 0)`` and ``(0, m)`` to ``(0, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.linalg import (
    BlockDiagonal,
    CGStatus,
    Dense,
    Diagonal,
    Identity,
    LinearOperator,
    NonFiniteError,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    block_cg,
    cg,
    diagonal_estimate,
    eigmax,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_tridiag,
    slq_nodes_weights,
    spectral_density,
    top_eigh,
)
from secondorder.linalg.status import SolverStatus

F64 = torch.float64


def _spd(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return a @ a.T / n + torch.eye(n, dtype=F64)


def _bad_matrix(n: int, kind: str) -> torch.Tensor:
    a = _spd(n)
    if kind in ("nan_operator", "inf_operator"):
        value = math.nan if kind == "nan_operator" else math.inf
        a[2, 3] = a[3, 2] = value
    return a


def _rhs(n: int, kind: str) -> torch.Tensor:
    b = torch.linspace(1.0, 2.0, n, dtype=F64)
    if kind == "nan_rhs":
        b[1] = math.nan
    return b


# ------------------------------------------------- solvers with an info object
INFO_SOLVERS: dict[str, Callable[[torch.Tensor, torch.Tensor], bool]] = {}


def _info_solver(fn: Callable[[torch.Tensor, torch.Tensor], bool]) -> Any:
    INFO_SOLVERS[fn.__name__] = fn
    return fn


@_info_solver
def cg_dense(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, info = cg(Dense(a, symmetric=True), b, rtol=1e-10)
    assert bool(torch.isfinite(x).all())
    return info.status == CGStatus.NONFINITE


@_info_solver
def cg_callable_with_preconditioner(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, info = cg(lambda v: a @ v, b, rtol=1e-10, M=Diagonal(torch.ones_like(b)))
    assert bool(torch.isfinite(x).all())
    return info.status == CGStatus.NONFINITE


@_info_solver
def block_cg_list(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, info = block_cg(lambda idx, vs: [a @ v for v in vs], [b], rtol=1e-10, maxiter=100)
    assert bool(torch.isfinite(x[0]).all())
    return info.status == [SolverStatus.NONFINITE]


@_info_solver
def block_cg_flat(a: torch.Tensor, b: torch.Tensor) -> bool:
    n = b.numel()
    both = torch.cat([b, b])
    bd = torch.block_diag(a, a)
    x, info = block_cg(
        lambda idx, vs: [bd[i * n : (i + 1) * n, i * n : (i + 1) * n] @ v for i, v in zip(idx, vs)],
        both,
        sizes=[n, n],
        rtol=1e-10,
        maxiter=100,
    )
    assert all(bool(torch.isfinite(xi).all()) for xi in x)
    return info.status == [SolverStatus.NONFINITE] * 2


@pytest.mark.parametrize("kind", ["nan_operator", "inf_operator", "nan_rhs"])
@pytest.mark.parametrize("name", sorted(INFO_SOLVERS))
def test_solver_reports_nonfinite_in_its_info(name: str, kind: str) -> None:
    n = 12
    assert INFO_SOLVERS[name](_bad_matrix(n, kind), _rhs(n, kind))


# ---------------------------------------------------------------- lanczos
@pytest.mark.parametrize("kind", ["nan_operator", "inf_operator"])
@pytest.mark.parametrize(("n", "block_size"), [(10, 1), (60, 1), (60, 2)])
def test_lanczos_reports_nonfinite(kind: str, n: int, block_size: int) -> None:
    op = Dense(_bad_matrix(n, kind), symmetric=True)
    evals, evecs, info = lanczos(op, 2, block_size=block_size, return_info=True)
    assert info.status == CGStatus.NONFINITE and not info.converged
    assert "NaN/Inf" in info.message
    assert evals.shape == (2,) and evecs.shape == (n, 2)
    assert bool(evals.isnan().all()) and bool(evecs.isnan().all())
    with pytest.raises(NonFiniteError, match=r"lanczos: a product with A held NaN/Inf"):
        lanczos(op, 2, block_size=block_size)


@pytest.mark.parametrize(("n", "block_size"), [(10, 1), (60, 1), (60, 2)])
def test_lanczos_reports_nonfinite_start_vector(n: int, block_size: int) -> None:
    op = Dense(_spd(n), symmetric=True)
    v0 = _rhs(n, "nan_rhs")
    evals, evecs, info = lanczos(op, 2, v0=v0, block_size=block_size, return_info=True)
    assert info.status == CGStatus.NONFINITE and info.num_matvecs == 0
    assert "v0 held NaN/Inf" in info.message
    assert bool(evals.isnan().all()) and evecs.shape == (n, 2)


def test_lanczos_status_of_finite_runs() -> None:
    op = Dense(_spd(60), symmetric=True)
    *_, info = lanczos(op, 2, return_info=True)
    assert info.status == CGStatus.CONVERGED and info.converged
    with pytest.warns(RuntimeWarning):
        lanczos(op, 2, tol=1e-14, maxiter=3)
    *_, info = lanczos(op, 2, tol=1e-14, maxiter=3, return_info=True)
    assert info.status == CGStatus.MAXITER and not info.converged


# ----------------------------------------- functions that return only numbers
RAISERS: dict[str, Callable[[LinearOperator, torch.Tensor], Any]] = {
    "eigmax": lambda op, v: eigmax(op),
    "lanczos_no_info": lambda op, v: lanczos(op, 2),
    "lanczos_v0": lambda op, v: lanczos(op, 2, v0=v),
    "lanczos_tridiag": lambda op, v: lanczos_tridiag(op, 5, v),
    "lanczos_tridiag_batch": lambda op, v: lanczos_tridiag(op, 5, torch.stack([v, v + 1], 1)),
    "top_eigh": lambda op, v: top_eigh(op.to_dense(), 2),
    "top_eigh_krylov": lambda op, v: top_eigh(torch.block_diag(*[op.to_dense()] * 8), 2),
    "hutchinson_trace": lambda op, v: hutchinson_trace(op, 4, return_stderr=True),
    "hutchinson_trace_gaussian": lambda op, v: hutchinson_trace(op, 4, distribution="gaussian"),
    "hutchpp_trace": lambda op, v: hutchpp_trace(op, 9),
    "diagonal_estimate": lambda op, v: diagonal_estimate(op, 3, batch_size=2),
    "slq_nodes_weights": lambda op, v: slq_nodes_weights(op, num_probes=2, num_steps=4),
    "spectral_density": lambda op, v: spectral_density(op, num_probes=2, num_steps=4),
    "NystromPreconditioner": lambda op, v: NystromPreconditioner(op, rank=3, damping=0.1),
    "PivotedCholeskyPreconditioner": lambda op, v: PivotedCholeskyPreconditioner(
        op, rank=3, damping=0.1
    ),
}
# those with a start vector also refuse a NaN one
WITH_START = {"lanczos_v0", "lanczos_tridiag", "lanczos_tridiag_batch"}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (name, kind)
        for name in sorted(RAISERS)
        for kind in ("nan_operator", "inf_operator", "nan_rhs")
        if kind != "nan_rhs" or name in WITH_START
    ],
)
@pytest.mark.parametrize("n", [12, 60])
def test_raises_nonfinite_error(name: str, kind: str, n: int) -> None:
    op = Dense(_bad_matrix(n, kind), symmetric=True)
    with pytest.raises(NonFiniteError) as err:
        RAISERS[name](op, _rhs(n, kind))
    assert isinstance(err.value, ValueError) and isinstance(err.value, FloatingPointError)
    assert "NaN/Inf" in str(err.value) or "non-finite" in str(err.value)


def test_nonfinite_only_in_products_is_caught() -> None:
    """A finite matrix whose products overflow (float32) is reported like a NaN one."""
    n = 40
    a = _spd(n).to(torch.float32) * 1e37
    op = Dense(a, symmetric=True)
    with pytest.raises(NonFiniteError):
        hutchinson_trace(op, 3, distribution="gaussian")
    _, info = cg(op, torch.full((n,), 1e30), rtol=1e-6)
    assert info.status in (CGStatus.NONFINITE, CGStatus.CONVERGED, CGStatus.MAXITER)


def test_nonfinite_error_is_exported() -> None:
    assert so.linalg.NonFiniteError is NonFiniteError


# ---------------------------------------------------------- zero columns
def _tiny_model() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randint(0, 3, (5,))
    return model, nn.CrossEntropyLoss(), (x, y)


class _MatvecOnly(LinearOperator):
    """A subclass that implements only ``_matvec`` (the base class loops over columns)."""

    SELF_ADJOINT = True

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__(tuple(a.shape), a.dtype, a.device)  # type: ignore[arg-type]
        self.a = a

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.a @ x


class _MatmatOnly(_MatvecOnly):
    def _matvec(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return LinearOperator._matvec(self, x)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.a @ X


def _operators() -> dict[str, Callable[[], LinearOperator]]:
    a = _spd(4)
    rect = torch.arange(12.0, dtype=F64).reshape(3, 4)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)

    def curvature(cls: Any, **kw: Any) -> Callable[[], LinearOperator]:
        return lambda: cls(*_tiny_model(), **kw)

    return {
        "Dense": lambda: Dense(a),
        "Dense_rect": lambda: Dense(rect),
        "Dense_symmetric": lambda: Dense(a, symmetric=True),
        "Diagonal": lambda: Diagonal(d),
        "Identity": lambda: Identity(4, dtype=F64),
        "sum": lambda: Dense(a) + Diagonal(d),
        "damped": lambda: Dense(a) + 0.5 * Identity(4, dtype=F64),
        "identity_multiples": lambda: 2.0 * Identity(4, dtype=F64) + Identity(4, dtype=F64),
        "difference": lambda: Dense(a) - Diagonal(d),
        "scaled": lambda: 3.0 * Dense(a),
        "negated": lambda: -Dense(a),
        "divided": lambda: Dense(a) / 2.0,
        "product": lambda: Dense(rect) @ Dense(a),
        "adjoint": lambda: Dense(rect).T,
        "BlockDiagonal": lambda: BlockDiagonal([Dense(rect), Diagonal(d)]),
        "matvec_only": lambda: _MatvecOnly(a),
        "matmat_only": lambda: _MatmatOnly(a),
        "GGN": curvature(so.GGN),
        "Hessian": curvature(so.Hessian),
        "Fisher_exact": curvature(so.Fisher, kind="exact"),
        "Fisher_mc": curvature(
            so.Fisher, kind="mc", num_samples=2, generator=torch.Generator().manual_seed(0)
        ),
        "Fisher_empirical": curvature(so.Fisher, kind="empirical"),
        "PCH": curvature(so.PCH),
        "BlockDiagonalCurvature": curvature(so.BlockDiagonalCurvature),
        "GGN_block": lambda: so.GGN(*_tiny_model()).block(0),
        "GGN_damped": lambda: (lambda g: g + 0.1 * Identity(g.shape[0], dtype=F64))(
            so.GGN(*_tiny_model())
        ),
    }


OPERATORS = _operators()


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_zero_columns(name: str) -> None:
    op = OPERATORS[name]()
    m, n = op.shape
    out = op @ torch.zeros(n, 0, dtype=op.dtype)
    assert out.shape == (m, 0) and out.dtype == op.dtype
    out = op.matvec(torch.empty(n, 0, dtype=op.dtype))
    assert out.shape == (m, 0)
    rows = torch.zeros(0, m, dtype=op.dtype) @ op
    assert rows.shape == (0, n)
    assert op.rmatvec(torch.zeros(m, 0, dtype=op.dtype)).shape == (n, 0)
    # one column still agrees with the operator's vector product
    v = torch.linspace(-1.0, 1.0, n, dtype=op.dtype)
    torch.testing.assert_close((op @ v.unsqueeze(1))[:, 0], op @ v)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dense(torch.zeros(0, 0, dtype=F64)),
        lambda: Diagonal(torch.zeros(0, dtype=F64)),
        lambda: Identity(0, dtype=F64),
        lambda: Identity(0, dtype=F64) + Dense(torch.zeros(0, 0, dtype=F64)),
        lambda: Dense(torch.zeros(0, 3, dtype=F64)),
    ],
)
def test_empty_operators(make: Callable[[], LinearOperator]) -> None:
    op = make()
    m, n = op.shape
    assert (op @ torch.zeros(n, dtype=F64)).shape == (m,)
    assert (op @ torch.zeros(n, 2, dtype=F64)).shape == (m, 2)
    assert (op @ torch.zeros(n, 0, dtype=F64)).shape == (m, 0)
    assert op.to_dense().shape == (m, n)
