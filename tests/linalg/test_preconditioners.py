"""Tests for secondorder.linalg.preconditioners: SPD, formulas, exactness, fewer CG iterations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from secondorder.linalg.cg import CGStatus, cg
from secondorder.linalg.operator import Dense, Diagonal, Identity, LinearOperator
from secondorder.linalg.preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
)

F64 = torch.float64


def _spd(eigenvalues: Tensor, seed: int) -> Tensor:
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def _spiked(n: int = 300, spikes: int = 12) -> Tensor:
    """A few huge eigenvalues (1e3 .. 1e6) over many small ones in [0, 0.1]."""
    g = torch.Generator().manual_seed(0)
    eig = torch.cat(
        [
            torch.logspace(3.0, 6.0, spikes, dtype=F64),
            0.1 * torch.rand(n - spikes, generator=g, dtype=F64),
        ]
    )
    return _spd(eig, seed=1)


def _low_rank(n: int, r: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, r, generator=g, dtype=F64)
    return u @ u.T


class _MatrixFree(LinearOperator):
    """A plain operator (no Dense fast paths): only _matmat, so columns come from products."""

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)
        self.matrix = matrix
        self.products = 0

    def _matmat(self, X: Tensor) -> Tensor:
        self.products += X.shape[1]
        return self.matrix @ X


def _build(kind: str, a: Tensor, mu: float) -> LinearOperator:
    if kind == "jacobi":
        return JacobiPreconditioner(a.diagonal(), damping=mu, exponent=0.75)
    if kind == "nystrom":
        return NystromPreconditioner(a, 20, mu, generator=torch.Generator().manual_seed(3))
    return PivotedCholeskyPreconditioner(a, 20, mu)


KINDS = ["jacobi", "nystrom", "pivoted_cholesky"]


# --------------------------------------------------------------- all of them
@pytest.mark.parametrize("kind", KINDS)
def test_is_symmetric_positive_definite(kind: str) -> None:
    a = _spiked(n=120)
    p = _build(kind, a, mu=1e-2)
    assert p.SELF_ADJOINT and p.IS_PSD and p.shape == a.shape and p.dtype == F64
    dense = p.to_dense()
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12 * float(dense.abs().max()))
    assert float(torch.linalg.eigvalsh(0.5 * (dense + dense.T)).min()) > 0
    # matmat and matvec agree with the dense matrix
    x = torch.randn(120, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p @ x, dense @ x)
    torch.testing.assert_close(p @ x[:, 0], dense @ x[:, 0])


@pytest.mark.parametrize("kind", ["nystrom", "pivoted_cholesky"])
def test_accepts_a_tensor_or_an_operator(kind: str) -> None:
    a = _spiked(n=60)
    from_tensor = _build(kind, a, mu=1e-2).to_dense()
    from_operator = _build(kind, Dense(a), mu=1e-2).to_dense()  # type: ignore[arg-type]
    torch.testing.assert_close(from_tensor, from_operator)


# -------------------------------------------------------------------- Jacobi
@pytest.mark.parametrize(
    ("damping", "exponent"), [(0.0, 1.0), (0.5, 0.75), (2.0, 0.0), (0.1, 0.5), (1e-3, 0.3)]
)
def test_jacobi_equals_its_formula(damping: float, exponent: float) -> None:
    d = torch.tensor([0.5, 1.0, 4.0, 100.0], dtype=F64)
    p = JacobiPreconditioner(d, damping=damping, exponent=exponent)
    expected = (d + damping) ** (-exponent)
    torch.testing.assert_close(p.inverse_diagonal, expected)
    torch.testing.assert_close(p.to_dense(), torch.diag(expected))
    x = torch.arange(1.0, 5.0, dtype=F64)
    torch.testing.assert_close(p @ x, expected * x)


def test_jacobi_reduces_iterations_on_a_badly_scaled_matrix() -> None:
    n = 200
    c = _spd(torch.linspace(1.0, 4.0, n, dtype=F64), seed=5)
    s = torch.logspace(-3.0, 3.0, n, dtype=F64).sqrt()
    a = s[:, None] * c * s[None, :]
    a = 0.5 * (a + a.T)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, plain = cg(a, b, rtol=1e-8)
    x, info = cg(a, b, rtol=1e-8, M=JacobiPreconditioner(a.diagonal()))
    assert info.status == CGStatus.CONVERGED
    assert info.iterations * 5 < plain.iterations
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("exponent", [1.0, 0.75, 0.5])
def test_jacobi_fast_powers_are_accurate_in_float32(exponent: float) -> None:
    # the square-root forms of the common exponents against float64 pow, over 12 decades
    d = torch.logspace(-6.0, 6.0, 1001, dtype=F64)
    p = JacobiPreconditioner(d.float(), damping=1e-3, exponent=exponent)
    expected = (d.float().double() + 1e-3) ** (-exponent)
    rel = ((p.inverse_diagonal.double() - expected) / expected).abs().max()
    assert rel < 4 * torch.finfo(torch.float32).eps


def test_preconditioner_operator_and_callable_give_the_same_solve() -> None:
    # a preconditioner given as an operator and as a plain callable: the same iterates
    n = 120
    a = _spd(torch.logspace(-2.0, 2.0, n, dtype=F64), seed=3)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(0))
    for M in (JacobiPreconditioner(a.diagonal(), exponent=0.75), Diagonal(1 / a.diagonal())):
        x, info = cg(a, b, rtol=1e-10, M=M)
        x_ref, ref = cg(a, b, rtol=1e-10, M=lambda v, M=M: M @ v)
        assert info.iterations == ref.iterations
        assert info.residual_norms == ref.residual_norms
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.tensor([1.0, -2.0], dtype=F64), 1.0), r"diagonal \+ damping > 0.*-1\.0"),
        ((torch.tensor([1.0, 0.0], dtype=F64), 0.0), r"diagonal \+ damping > 0.*0\.0"),
        ((torch.ones(2, 2, dtype=F64),), r"expected a 1-D tensor diagonal, got shape \(2, 2\)"),
        ((torch.ones(2, dtype=torch.int64),), r"expected a real floating diagonal"),
        ((torch.tensor([1.0, float("nan")]),), r"NaN or Inf"),
        ((torch.tensor([float("nan"), 1.0]),), r"NaN or Inf"),
        ((torch.tensor([1.0, float("inf")]),), r"NaN or Inf"),
        ((torch.tensor([-float("inf"), 1.0]),), r"NaN or Inf"),
        ((torch.ones(2), 0.0, -1.0), r"exponent must be a finite float >= 0, got -1\.0"),
        ((torch.ones(2), float("inf")), r"damping must be finite, got inf"),
    ],
)
def test_jacobi_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JacobiPreconditioner(*args)


# ------------------------------------------------------------------- Nystrom
@pytest.mark.parametrize("rank", [7, 12])
def test_nystrom_is_exact_for_low_rank_matrices(rank: int) -> None:
    n, true_rank, mu = 80, 7, 0.3
    a = _low_rank(n, true_rank, seed=2)
    p = NystromPreconditioner(a, rank, mu, generator=torch.Generator().manual_seed(0))
    # the Nystrom approximation reproduces A ...
    approx = (p.eigenvectors * p.eigenvalues) @ p.eigenvectors.T
    torch.testing.assert_close(approx, a, rtol=0, atol=1e-9 * float(a.abs().max()))
    top = torch.linalg.eigvalsh(a).flip(0)[:rank]
    torch.testing.assert_close(p.eigenvalues, top.clamp_min(0), rtol=1e-9, atol=1e-8)
    # ... so P^{-1} (A + mu I) = mu I + lambda_r U U^T: two eigenvalues, or mu I if rank(A) < r
    lam_r = float(p.eigenvalues[-1])
    eye = torch.eye(n, dtype=F64)
    product = p.to_dense() @ (a + mu * eye)
    expected = mu * eye + lam_r * p.eigenvectors @ p.eigenvectors.T
    torch.testing.assert_close(product, expected, atol=1e-9, rtol=0)
    # hence preconditioned CG converges in two iterations, or one if rank(A) < r
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(4))
    x, info = cg(Dense(a) + mu * Identity(n, dtype=F64), b, rtol=1e-8, M=p)
    assert info.status == CGStatus.CONVERGED
    assert info.iterations == (1 if rank > true_rank else 2)
    torch.testing.assert_close(x, torch.linalg.solve(a + mu * eye, b))


def test_nystrom_is_reproducible_from_the_generator() -> None:
    a = _spiked(n=60)
    p1 = NystromPreconditioner(a, 10, 1e-2, generator=torch.Generator().manual_seed(7))
    p2 = NystromPreconditioner(a, 10, 1e-2, generator=torch.Generator().manual_seed(7))
    p3 = NystromPreconditioner(a, 10, 1e-2, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(p1.to_dense(), p2.to_dense(), rtol=0, atol=0)
    assert not torch.equal(p1.to_dense(), p3.to_dense())
    # generator=None is a fixed seed, not the global RNG state
    torch.manual_seed(123)
    q1 = NystromPreconditioner(a, 10, 1e-2).to_dense()
    torch.manual_seed(456)
    q2 = NystromPreconditioner(a, 10, 1e-2).to_dense()
    torch.testing.assert_close(q1, q2, rtol=0, atol=0)


def test_nystrom_uses_one_block_product() -> None:
    op = _MatrixFree(_spiked(n=60))
    NystromPreconditioner(op, 15, 1e-2)
    assert op.products == 15


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be an int in \[1, 40\], got 0"),
        ({"rank": 41}, r"rank must be an int in \[1, 40\], got 41"),
        ({"damping": -1.0}, r"damping must be a finite float >= 0, got -1\.0"),
        ({"rank": 10, "damping": 0.0}, r"smallest Nyström eigenvalue is 0 and damping=0"),
    ],
)
def test_nystrom_rejects_bad_input(kwargs: dict, match: str) -> None:
    a = _low_rank(40, 5, seed=0)
    args = {"rank": 5, "damping": 1e-2} | kwargs
    with pytest.raises(ValueError, match=match):
        NystromPreconditioner(a, **args)


def test_nystrom_rejects_non_square() -> None:
    with pytest.raises(ValueError, match=r"expected a square operator, got shape \(3, 4\)"):
        NystromPreconditioner(torch.ones(3, 4, dtype=F64), 2, 1.0)


# ---------------------------------------------------------- pivoted Cholesky
def test_pivoted_cholesky_is_exact_for_low_rank_matrices() -> None:
    n, true_rank, mu = 50, 6, 0.1
    a = _low_rank(n, true_rank, seed=3)
    p = PivotedCholeskyPreconditioner(a, 10, mu)
    assert p.rank == true_rank  # stops early: the remaining diagonal vanished
    assert len(set(p.pivots)) == true_rank
    factor = p.factor
    torch.testing.assert_close(factor @ factor.T, a, rtol=0, atol=1e-10 * float(a.abs().max()))
    inverse = torch.linalg.inv(a + mu * torch.eye(n, dtype=F64))
    torch.testing.assert_close(p.to_dense(), inverse, rtol=1e-8, atol=1e-8)


def test_pivoted_cholesky_pivots_on_the_largest_diagonal() -> None:
    a = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.5], dtype=F64))
    p = PivotedCholeskyPreconditioner(a, 2, 1.0)
    assert p.pivots == [1, 2]
    torch.testing.assert_close(
        p.factor @ p.factor.T, torch.diag(a.diagonal() * torch.tensor([0, 1, 1, 0.0], dtype=F64))
    )


def test_pivoted_cholesky_diagonal_sources_agree() -> None:
    a = _spiked(n=70)
    op = _MatrixFree(a)
    computed = PivotedCholeskyPreconditioner(op, 8, 1e-2)
    assert op.products == 70 + 8  # n products for the diagonal, one per pivot column
    op.products = 0
    given = PivotedCholeskyPreconditioner(op, 8, 1e-2, diagonal=a.diagonal().clone())
    assert op.products == 8
    from_dense = PivotedCholeskyPreconditioner(a, 8, 1e-2)
    torch.testing.assert_close(computed.factor, given.factor)
    torch.testing.assert_close(computed.factor, from_dense.factor)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, r"damping must be a finite float > 0, got 0\.0"),
        ({"rank": 50}, r"rank must be an int in \[1, 40\], got 50"),
        (
            {"diagonal": torch.ones(39, dtype=F64)},
            r"expected diagonal of shape \(40,\).*shape \(39,\)",
        ),
        ({"diagonal": torch.ones(40)}, r"dtype torch.float64.*got .*dtype torch.float32"),
        ({"diagonal": -torch.ones(40, dtype=F64)}, r"diagonal entries must be >= 0"),
    ],
)
def test_pivoted_cholesky_rejects_bad_input(kwargs: dict, match: str) -> None:
    a = _low_rank(40, 5, seed=0)
    args = {"rank": 5, "damping": 1e-2} | kwargs
    with pytest.raises(ValueError, match=match):
        PivotedCholeskyPreconditioner(a, **args)


# -------------------------------------------------- fewer CG iterations
@pytest.mark.parametrize("kind", ["nystrom", "pivoted_cholesky"])
def test_low_rank_preconditioners_reduce_iterations(kind: str) -> None:
    n, mu = 300, 1e-2
    a = _spiked(n=n, spikes=12)
    op = Dense(a, psd=True) + mu * Identity(n, dtype=F64)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(9))
    _, plain = cg(op, b, rtol=1e-8)
    x, info = cg(op, b, rtol=1e-8, M=_build(kind, a, mu))
    assert plain.status == CGStatus.CONVERGED and info.status == CGStatus.CONVERGED
    assert info.iterations * 4 < plain.iterations
    expected = torch.linalg.solve(a + mu * torch.eye(n, dtype=F64), b)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


# ------------------------------------------- pivoted Cholesky: stopping rule
def _dense_pivoted_cholesky(a: Tensor, rank: int) -> tuple[Tensor, list[int]]:
    """Reference: ``rank`` steps of greedy pivoted Cholesky on the dense Schur complement."""
    s = a.clone()
    n = a.shape[0]
    factor = torch.zeros(n, rank, dtype=a.dtype)
    pivots = []
    for k in range(rank):
        i = int(torch.argmax(s.diagonal()))
        factor[:, k] = s[:, i] / s[i, i].sqrt()
        s = s - torch.outer(factor[:, k], factor[:, k])
        pivots.append(i)
    return factor, pivots


@pytest.mark.parametrize("rank", [1, 5, 20, 60])
def test_pivoted_cholesky_matches_the_dense_reference(rank: int) -> None:
    # full rank, known spectrum (geometric from 1 down to 1e-8): every rank up to n is reached
    n = 80
    a = _spd(torch.logspace(0, -8, n, dtype=F64), seed=4)
    p = PivotedCholeskyPreconditioner(a, rank, 1e-3)
    factor, pivots = _dense_pivoted_cholesky(a, rank)
    assert p.rank == rank and p.pivots == pivots
    torch.testing.assert_close(p.factor, factor, rtol=0, atol=1e-10)
    # the residual diagonal decreases and stays nonnegative
    res = (a - p.factor @ p.factor.T).diagonal()
    assert float(res.min()) > -1e-12
    inverse = torch.linalg.inv(p.factor @ p.factor.T + 1e-3 * torch.eye(n, dtype=F64))
    torch.testing.assert_close(p.to_dense(), inverse, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pivoted_cholesky_reaches_the_rank_for_large_n(dtype: torch.dtype) -> None:
    # the old rule (stop when max d <= n eps tr(A)) stopped here at rank 0 in float32:
    # n eps tr(A) = 1e5 * 1.2e-7 * 7.5e4 ~ 900 > max A_ii = 1
    n, rank = 100_000, 10
    d = torch.linspace(1.0, 0.5, n, dtype=dtype)
    p = PivotedCholeskyPreconditioner(Diagonal(d), rank, 1e-3)
    assert p.rank == rank and p.pivots == list(range(rank))
    torch.testing.assert_close(p.factor.square().sum(dim=0), d[:rank])


def test_pivoted_cholesky_stops_on_the_relative_diagonal() -> None:
    # diagonal with entries 1, 1e-1, ..., 1e-9: the rule max d <= tol max A_ii stops where said
    d = torch.logspace(0, -9, 10, dtype=F64)
    for tol, expected in [(0.0, 10), (1e-12, 10), (0.5e-4, 5), (0.5, 1), (2.0, 0)]:
        p = PivotedCholeskyPreconditioner(torch.diag(d), 10, 1e-3, tol=tol)
        assert p.rank == expected, (tol, p.rank)
        assert p.tol == tol
        assert p.pivots == list(range(expected))
    # rank 0 (nothing above the threshold): the preconditioner is 1 / damping
    torch.testing.assert_close(p.to_dense(), torch.eye(10, dtype=F64) / 1e-3)
    # the default is 100 eps, whatever the rank asked for
    for rank in (4, 10):
        p = PivotedCholeskyPreconditioner(torch.diag(d), rank, 1.0)
        assert p.tol == 100 * torch.finfo(F64).eps and p.rank == rank


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf"), "x"])
def test_pivoted_cholesky_rejects_bad_tol(tol: object) -> None:
    with pytest.raises(ValueError, match="tol must be"):
        PivotedCholeskyPreconditioner(torch.eye(4, dtype=F64), 2, 1.0, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pivoted_cholesky_reduces_cg_iterations_at_every_rank(dtype: torch.dtype) -> None:
    # a known ill-conditioned spectrum: 30 eigenvalues from 1e3 down to 1, a bulk at 1e-3
    n, mu = 400, 1e-3
    spec = torch.cat([torch.logspace(3, 0, 30, dtype=F64), torch.full((n - 30,), 1e-3, dtype=F64)])
    a = _spd(spec, seed=5)
    op = Dense(a.to(dtype), psd=True) + mu * Identity(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(2))
    _, plain = cg(op, b, rtol=1e-4, maxiter=2000)
    previous = plain.iterations
    for rank in (30, 40):  # (in float32 the residual is at rounding level after ~43 steps)
        p = PivotedCholeskyPreconditioner(a.to(dtype), rank, mu)
        assert p.rank == rank
        dense = p.to_dense().double()
        scale = float(dense.abs().max())
        torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-5 * scale)
        assert float(torch.linalg.eigvalsh(0.5 * (dense + dense.T)).min()) > 0  # SPD
        _, info = cg(op, b, rtol=1e-4, maxiter=2000, M=p)
        assert info.status == CGStatus.CONVERGED
        assert info.iterations <= previous, (rank, info.iterations, previous)
        previous = info.iterations
    assert previous * 4 < plain.iterations
