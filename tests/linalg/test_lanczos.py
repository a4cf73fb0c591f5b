"""Tests for the Lanczos eigen-solver, checked against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from secondorder.linalg.lanczos import (
    LanczosDecomposition,
    LanczosInfo,
    eigmax,
    lanczos,
    lanczos_tridiag,
)
from secondorder.linalg.operator import Dense, LinearOperator

F64 = torch.float64


class Counting(LinearOperator):
    """A dense symmetric matrix that counts how many vectors it has been applied to."""

    SELF_ADJOINT = True

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)
        self.matrix = matrix
        self.count = 0

    def _matvec(self, x: Tensor) -> Tensor:
        self.count += 1
        return self.matrix @ x

    def _matmat(self, X: Tensor) -> Tensor:
        self.count += X.shape[1]
        return self.matrix @ X


def with_spectrum(spectrum: Tensor, seed: int = 0) -> Tensor:
    """``U diag(spectrum) U^T`` with a random orthogonal ``U`` (float64)."""
    n = spectrum.numel()
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (U * spectrum) @ U.T


def clustered_spectrum(n: int = 200) -> Tensor:
    # a bulk in [0, 1], a cluster at 5 with gaps 1e-3, negative outliers
    spec = torch.linspace(0.0, 1.0, n, dtype=F64)
    spec[-4:] = torch.tensor([3.0, 5.0, 5.001, 5.002], dtype=F64)
    spec[:3] = torch.tensor([-2.0, -1.999, -1.5], dtype=F64)
    return spec


def reference(M: Tensor, k: int, which: str) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(M)
    n = M.shape[0]
    if which == "largest":
        idx = torch.arange(n - k, n)
    elif which == "smallest":
        idx = torch.arange(k)
    else:
        idx = torch.cat([torch.arange(k // 2), torch.arange(n - (k - k // 2), n)])
    return evals[idx], evecs[:, idx]


# ------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_matches_eigh_on_clustered_spectrum(which: str, k: int) -> None:
    M = with_spectrum(clustered_spectrum())
    evals, evecs, info = lanczos(M, k, which, tol=1e-10, return_info=True)
    ref_vals, ref_vecs = reference(M, k, which)
    assert info.converged, info.message
    assert evals.shape == (k,) and evecs.shape == (M.shape[0], k)
    assert torch.all(evals[1:] >= evals[:-1])  # ascending
    torch.testing.assert_close(evals, ref_vals, rtol=0, atol=1e-8)
    # distinct eigenvalues (gaps >= 1e-3): eigenvectors agree up to sign
    overlap = (evecs * ref_vecs).sum(dim=0).abs()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    # the reported bounds are honest: true residuals are below them (up to rounding)
    residual = (M @ evecs - evecs * evals).norm(dim=0)
    assert torch.all(residual <= info.residual_bounds + 1e-12)


def subspace_distance(U: Tensor, V: Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors (sine of largest angle)."""
    return float(torch.linalg.matrix_norm(U @ U.T - V @ V.T, ord=2))


@pytest.mark.parametrize("which", ["largest", "both"])
def test_repeated_eigenvalues_with_block(which: str) -> None:
    # eigenvalue 10 with multiplicity 3, separated from the rest: a single start vector
    # sees one direction of its eigenspace; a block of 3 sees all of it
    spec = torch.linspace(0.0, 0.1, 150, dtype=F64)
    spec[-3:] = 10.0
    spec[-4] = 5.0
    spec[:2] = -3.0
    M = with_spectrum(spec, seed=1)
    k = 3 if which == "largest" else 5
    evals, evecs, info = lanczos(M, k, which, tol=1e-10, block_size=3, return_info=True)
    ref_vals, ref_vecs = reference(M, k, which)
    assert info.converged, info.message
    torch.testing.assert_close(evals, ref_vals, rtol=0, atol=1e-8)
    top = slice(k - 3, k)
    assert subspace_distance(evecs[:, top], ref_vecs[:, top]) < 1e-7
    if which == "both":
        assert subspace_distance(evecs[:, :2], ref_vecs[:, :2]) < 1e-7


def test_matches_scipy_eigsh() -> None:
    eigsh = pytest.importorskip("scipy.sparse.linalg").eigsh
    M = with_spectrum(torch.logspace(0, -4, 300, dtype=F64), seed=2)
    A = Dense(M, psd=True)
    evals, evecs = lanczos(A, 6, tol=1e-10)
    w, v = eigsh(A.to_scipy(), k=6, v0=np.ones(300))
    np.testing.assert_allclose(evals.numpy(), np.sort(w), rtol=0, atol=1e-10)
    v = v[:, np.argsort(w)]
    np.testing.assert_allclose(np.abs((evecs.numpy() * v).sum(axis=0)), 1.0, atol=1e-7)


def test_matvecs_fewer_than_arpack() -> None:
    """Products dominate for curvature operators, so count them: ours <= ARPACK's."""
    eigsh = pytest.importorskip("scipy.sparse.linalg").eigsh
    n = 2000
    spectrum = 1.0 / torch.arange(1, n + 1, dtype=F64)  # decaying, PSD
    M = with_spectrum(spectrum, seed=3)
    true = spectrum[:5].flip(0)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)

    ours = Counting(M)
    evals, _ = lanczos(ours, 5, v0=v0)
    ours_err = float((evals - true).abs().max())

    counts = {}
    for tol in (0.0, 1e-6):  # scipy's default (machine precision) and our default
        theirs = Counting(M)
        w, _ = eigsh(theirs.to_scipy(), k=5, v0=v0.numpy(), tol=tol)
        counts[tol] = theirs.count
        assert np.abs(np.sort(w) - true.numpy()).max() < 1e-8
    # ARPACK needs ~34 and ~21 products here, we need ~20 (with eigenvalue error ~1e-13)
    assert ours.count <= counts[0.0]
    assert ours.count <= counts[1e-6]
    assert ours_err < 1e-8


def test_float32_operator() -> None:
    M = with_spectrum(clustered_spectrum(), seed=5).to(torch.float32)
    evals, evecs = lanczos(M, 3, tol=1e-5)
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    ref = torch.linalg.eigvalsh(M.double())[-3:].float()
    torch.testing.assert_close(evals, ref, rtol=0, atol=1e-4)


def test_small_problem_is_solved_densely() -> None:
    M = with_spectrum(torch.arange(12, dtype=F64), seed=6)
    evals, _, info = lanczos(M, 3, "both", return_info=True)
    ref_vals, _ = reference(M, 3, "both")
    torch.testing.assert_close(evals, ref_vals, rtol=0, atol=1e-12)
    assert info.converged and info.num_matvecs == 12


def test_hopeless_small_problem_falls_back_to_dense() -> None:
    # the 3 smallest of a rank-60 PSD matrix of size 120 lie in a 60-fold zero eigenvalue:
    # a single Krylov vector sees one direction of it, so n products do not suffice
    U = torch.randn(120, 60, generator=torch.Generator().manual_seed(0), dtype=F64)
    A = Counting(U @ U.T)
    evals, evecs, info = lanczos(A, 3, "smallest", ncv=20, return_info=True)
    assert info.converged and "densely" in info.message
    assert info.num_matvecs == A.count == 240
    torch.testing.assert_close(evals, torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(3, dtype=F64))


def test_invariant_subspace_stops_exactly() -> None:
    # 4 distinct eigenvalues: the Krylov space of any vector is invariant after 4 steps
    spec = torch.tensor([1.0, 2.0, 3.0, 7.0], dtype=F64).repeat_interleave(25)
    M = Counting(with_spectrum(spec, seed=7))
    evals, _, info = lanczos(M, 2, tol=1e-12, return_info=True)
    assert info.converged and info.num_matvecs == 4
    torch.testing.assert_close(evals, torch.tensor([3.0, 7.0], dtype=F64), rtol=0, atol=1e-12)
    # identity: every vector is an eigenvector, each breakdown continues with a new direction
    evals, evecs, info = lanczos(torch.eye(60, dtype=F64), 3, return_info=True)
    assert info.converged and info.num_matvecs == 3
    torch.testing.assert_close(evals, torch.ones(3, dtype=F64))
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(3, dtype=F64))


def test_reproducible_with_generator() -> None:
    M = with_spectrum(clustered_spectrum(), seed=8)
    out1 = lanczos(M, 4, generator=torch.Generator().manual_seed(3))
    out2 = lanczos(M, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    # the default is a fixed seed, not the global RNG
    torch.manual_seed(123)
    d1 = lanczos(M, 4)
    torch.manual_seed(456)
    d2 = lanczos(M, 4)
    assert torch.equal(d1[1], d2[1])


def test_v0_is_used_and_not_mutated() -> None:
    M = with_spectrum(clustered_spectrum(), seed=9)
    v0 = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=F64)
    before = v0.clone()
    a = lanczos(M, 2, v0=v0, generator=torch.Generator().manual_seed(1))
    b = lanczos(M, 2, v0=v0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(v0, before)
    assert torch.equal(a[1], b[1])  # the generator is not used when v0 is given


def test_non_convergence_is_reported() -> None:
    M = with_spectrum(torch.linspace(0.0, 1.0, 300, dtype=F64), seed=10)
    evals, evecs, info = lanczos(M, 3, tol=1e-12, maxiter=25, ncv=20, return_info=True)
    assert isinstance(info, LanczosInfo)
    assert not info.converged and info.num_matvecs == 25 and info.num_restarts >= 1
    assert "maxiter" in info.message
    assert evals.shape == (3,) and evecs.shape == (300, 3)
    with pytest.warns(RuntimeWarning, match="not converged"):
        lanczos(M, 3, tol=1e-12, maxiter=25, ncv=20)


def test_eigmax() -> None:
    spec = torch.logspace(1, -3, 400, dtype=F64)
    M = Counting(with_spectrum(spec, seed=11))
    value = eigmax(M)
    assert isinstance(value, float)
    assert abs(value - 10.0) <= 1e-3 * 10.0
    assert M.count < 30


# ------------------------------------------------------ the decomposition
def check_relation(M: Tensor, dec: LanczosDecomposition) -> None:
    Q, T, r = dec.Q, dec.tridiagonal(), dec.residual
    m = Q.shape[-1]
    e_m = torch.zeros(m, dtype=F64)
    e_m[-1] = 1.0
    lhs = M @ Q
    rhs = Q @ T + r.unsqueeze(-1) * e_m
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)
    eye = torch.eye(m, dtype=F64)
    torch.testing.assert_close(Q.mT @ Q, eye.expand_as(T), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        Q.mT @ r.unsqueeze(-1), torch.zeros_like(T[..., :1]), atol=1e-10, rtol=0
    )


def test_tridiag_relation_single() -> None:
    M = with_spectrum(clustered_spectrum(), seed=12)
    v0 = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=F64)
    before = v0.clone()
    dec = lanczos_tridiag(M, 40, v0)
    assert torch.equal(v0, before)
    assert dec.Q.shape == (200, 40) and dec.alpha.shape == (40,) and dec.beta.shape == (39,)
    assert dec.residual.shape == (200,)
    torch.testing.assert_close(dec.Q[:, 0], v0 / v0.norm())
    assert torch.all(dec.beta > 0)
    check_relation(M, dec)


def test_tridiag_relation_batched() -> None:
    M = with_spectrum(clustered_spectrum(), seed=13)
    V0 = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    dec = lanczos_tridiag(M, 30, V0)
    assert dec.Q.shape == (3, 200, 30) and dec.alpha.shape == (3, 30)
    assert dec.beta.shape == (3, 29) and dec.residual.shape == (3, 200)
    check_relation(M, dec)
    # each column is the same recurrence as a single run
    single = lanczos_tridiag(M, 30, V0[:, 1])
    torch.testing.assert_close(dec.alpha[1], single.alpha)
    torch.testing.assert_close(dec.Q[1], single.Q)


def test_tridiag_invariant_subspace() -> None:
    spec = torch.tensor([-1.0, 2.0, 3.0], dtype=F64).repeat_interleave(10)
    M = with_spectrum(spec, seed=14)
    v0 = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=F64)
    dec = lanczos_tridiag(M, 10, v0)
    assert dec.Q.shape == (30, 3)  # truncated: T is exact
    torch.testing.assert_close(
        torch.linalg.eigvalsh(dec.tridiagonal()), spec.unique(), rtol=0, atol=1e-12
    )
    check_relation(M, dec)
    # batched: the finished recurrences are padded with zeros, the relation still holds
    V0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    dec = lanczos_tridiag(M, 5, V0)
    assert dec.Q.shape == (2, 30, 5)
    assert torch.all(dec.alpha[:, 3:] == 0) and torch.all(dec.beta[:, 2:] == 0)
    e = torch.linalg.eigvalsh(dec.tridiagonal()[:, :3, :3])
    torch.testing.assert_close(e, spec.unique().expand(2, 3), rtol=0, atol=1e-12)
    lhs = M @ dec.Q
    rhs = dec.Q @ dec.tridiagonal() + dec.residual.unsqueeze(-1) * torch.eye(5, dtype=F64)[-1]
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)


# ------------------------------------------------------------ bad input
M_SMALL = torch.eye(30, dtype=F64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"expected 1 <= k <= 30, got k=0"),
        ({"k": 31}, ValueError, r"expected 1 <= k <= 30, got k=31"),
        ({"k": 2.0}, TypeError, r"expected an int for k, got float"),
        ({"k": 2, "which": "middle"}, ValueError, r"expected which in .*got 'middle'"),
        ({"k": 2, "tol": -1.0}, ValueError, r"expected a float tol >= 0, got -1.0"),
        ({"k": 2, "ncv": 2}, ValueError, r"expected 3 <= ncv <= 30, got ncv=2"),
        ({"k": 2, "maxiter": 1}, ValueError, r"expected 2 <= maxiter, got maxiter=1"),
        ({"k": 2, "block_size": 0}, ValueError, r"expected 1 <= block_size <= 30"),
        ({"k": 2, "v0": torch.ones(29, dtype=F64)}, ValueError, r"expected v0 of shape \(30,\)"),
        ({"k": 2, "v0": torch.ones(30)}, ValueError, r"expected v0 with dtype torch.float64"),
        ({"k": 2, "generator": 0}, TypeError, r"expected a torch.Generator or None, got int"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        lanczos(M_SMALL, **kwargs)


def test_bad_operator_and_tridiag_arguments() -> None:
    with pytest.raises(ValueError, match=r"expected a square operator, got shape \(3, 4\)"):
        lanczos(torch.ones(3, 4, dtype=F64), 1)
    with pytest.raises(TypeError, match="expected a LinearOperator or a 2-D tensor"):
        lanczos([[1.0]], 1)
    with pytest.raises(ValueError, match="expected 1 <= num_steps, got num_steps=0"):
        lanczos_tridiag(M_SMALL, 0, torch.ones(30, dtype=F64))
    with pytest.raises(ValueError, match="expected nonzero start vectors"):
        lanczos_tridiag(M_SMALL, 3, torch.zeros(30, dtype=F64))
    with pytest.raises(ValueError, match="expected a finite v0"):
        lanczos_tridiag(M_SMALL, 3, torch.full((30,), float("nan"), dtype=F64))


# ------------------------------------------------ orthogonalization kernel
def _orthonormal_rows(m: int, n: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, generator=g, dtype=F64))[0].T.to(dtype)


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("b", [1, 3])
def test_orthogonalize_matches_dense_projection(local: bool, b: int) -> None:
    from secondorder.linalg.krylov import _orthogonalize

    n, M = 300, 12  # 12 basis rows already multiplied, the current block is rows M..M+b
    Qt = _orthonormal_rows(M + b, n, seed=0)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(n, b, generator=g, dtype=F64)
    W = W[:, 0] if b == 1 else W
    before = W.clone()
    work = torch.empty_like(W)
    W1, H, norm = _orthogonalize(Qt, M, W, local, work)
    assert torch.equal(W, before)  # the input is not modified
    Wm = W.reshape(n, b)
    expected_H = Qt @ Wm  # dense reference: the coefficients and the orthogonal remainder
    expected_W = Wm - Qt.T @ expected_H
    np.testing.assert_allclose(H, expected_H.numpy(), rtol=0, atol=1e-13)
    torch.testing.assert_close(W1.reshape(n, b), expected_W, rtol=0, atol=1e-13)
    np.testing.assert_allclose(norm, expected_W.norm(dim=0).numpy(), rtol=1e-13)
    assert float((Qt @ W1.reshape(n, b)).abs().max()) < 1e-14 * float(Wm.norm())


def test_orthogonalize_second_pass_on_cancellation() -> None:
    # W almost in the span of the basis: one pass leaves relative non-orthogonality
    # ~ eps ||w|| / ||w'|| = 1e-8, the DGKS criterion triggers another pass
    from secondorder.linalg.krylov import _orthogonalize

    n, M = 400, 10
    Qt = _orthonormal_rows(M + 1, n, seed=2)
    g = torch.Generator().manual_seed(3)
    tiny = torch.randn(n, generator=g, dtype=F64)
    tiny -= Qt.T @ (Qt @ tiny)
    c = torch.randn(M + 1, generator=g, dtype=F64)
    W = Qt.T @ c + 1e-8 * tiny / tiny.norm()
    W1, H, norm = _orthogonalize(Qt, M, W, False, torch.empty_like(W))
    assert float((Qt @ W1).abs().max()) < 1e-14 * float(W1.norm())
    np.testing.assert_allclose(H[:, 0], c.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(norm, [1e-8], rtol=1e-6)


# ------------------------------------------------------- restarts, float32
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_many_thick_restarts_match_eigh(which: str) -> None:
    # a small basis (ncv = k + 3) restarts many times; the first step after each restart
    # couples to every kept Ritz vector
    M = with_spectrum(clustered_spectrum(), seed=15)
    k = 4
    evals, evecs, info = lanczos(M, k, which, tol=1e-10, ncv=k + 3, return_info=True)
    ref_vals, ref_vecs = reference(M, k, which)
    assert info.converged and info.num_restarts >= 3, info
    torch.testing.assert_close(evals, ref_vals, rtol=0, atol=1e-8)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    overlap = (evecs * ref_vecs).sum(dim=0).abs()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=F64), rtol=0, atol=1e-6)


def test_float32_large_operator_matches_float64_reference() -> None:
    # n = 20,000 (a matrix-free diagonal in a random basis would be too large: use a
    # diagonal operator with a decaying spectrum in random order); float32 at tol 1e-6
    from secondorder.linalg.operator import Diagonal

    n = 20_000
    g = torch.Generator().manual_seed(16)
    spec = torch.cat([torch.logspace(0, -2, 40, dtype=F64), 1e-3 * torch.rand(n - 40, generator=g)])
    spec = spec[torch.randperm(n, generator=g)]
    A = Diagonal(spec.float())
    evals, evecs, info = lanczos(A, 5, tol=1e-6, return_info=True)
    assert info.converged and evals.dtype == torch.float32
    ref = torch.sort(spec).values[-5:]
    torch.testing.assert_close(evals.double(), ref, rtol=2e-6, atol=0)
    U = evecs.double()
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=F64), rtol=0, atol=1e-5)
    residual = (spec.unsqueeze(1) * U - U * evals.double()).norm(dim=0)
    assert torch.all(residual <= 1e-5 * evals.double())
