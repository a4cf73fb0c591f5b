"""top_eigh against torch.linalg.eigh on matrices with chosen spectra (float64)."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg import top_eigh
from secondorder.linalg.dense_eig import block_size, default_tol, krylov_applies

DT = torch.float64
D = 240
BUDGET = 50 * D


def with_spectrum(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix Q diag(evals) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=evals.dtype))
    return (Q * evals) @ Q.T


def spectra() -> dict[str, torch.Tensor]:
    i = torch.arange(D, dtype=DT)
    g = torch.Generator().manual_seed(1)
    flat = torch.linspace(1.0, 0.5, D, dtype=DT) + 1e-3 * torch.rand(D, generator=g, dtype=DT)
    clustered = torch.cat(
        [1.0 + 1e-4 * torch.arange(6, dtype=DT), 0.9 + 1e-6 * torch.arange(10, dtype=DT)]
    )
    clustered = torch.cat([clustered, 0.5 * torch.rand(D - 16, generator=g, dtype=DT)])
    repeated = torch.cat(
        [torch.tensor([5.0, 4.0, 3.0], dtype=DT), torch.full((5,), 2.0, dtype=DT)]
    )  # k = 6 cuts through the repeated eigenvalue 2 (positions 4..8)
    repeated = torch.cat([repeated, torch.rand(D - 8, generator=g, dtype=DT)])
    deficient = torch.cat([torch.rand(30, generator=g, dtype=DT) + 0.1, torch.zeros(D - 30)])
    return {
        "decaying": 0.95**i,
        "flat": flat,
        "clustered": clustered,
        "repeated": repeated,
        "rank_deficient": deficient.to(DT),
        "indefinite": torch.randn(D, generator=g, dtype=DT),
    }


def check(A: torch.Tensor, k: int, evals: torch.Tensor, U: torch.Tensor, rtol: float) -> None:
    """Eigenpairs of A, orthonormal, with the k largest eigenvalues; spans the right space."""
    exact, V = torch.linalg.eigh(A)
    scale = exact.abs().max()
    assert evals.shape == (k,) and U.shape == (A.shape[0], k)
    assert bool((evals[1:] >= evals[:-1]).all())  # ascending
    assert (evals - exact[-k:]).abs().max() <= rtol * scale
    assert (A @ U - U * evals).norm(dim=0).max() <= 10 * rtol * scale
    assert (U.T @ U - torch.eye(k, dtype=A.dtype)).abs().max() <= 10 * rtol
    # U lies in the eigenspace of the eigenvalues >= the k-th largest (up to the gap below it)
    cut = exact[-k] - 1e-8 * scale
    outside = V[:, exact < cut]
    assert (outside.T @ U).norm() <= 1e3 * rtol


@pytest.mark.parametrize("k", [1, 6, 10])
@pytest.mark.parametrize("name", list(spectra()))
def test_against_eigh(name, k):
    spectrum = spectra()[name]
    A = with_spectrum(spectrum)
    result = top_eigh(A, k, max_products=BUDGET)  # correctness, also where convergence is slow
    assert result.method == "krylov" and result.cycles >= 1
    assert result.residual <= default_tol(D, DT)
    check(A, k, result.eigenvalues, result.eigenvectors, 1e-11)


def test_simple_eigenvectors_equal_eigh_up_to_sign():
    A = with_spectrum(spectra()["decaying"])
    result = top_eigh(A, 8)
    _, V = torch.linalg.eigh(A)
    overlap = (result.eigenvectors.T @ V[:, -8:]).abs().diagonal()
    assert (overlap - 1).abs().max() <= 1e-10


def test_repeated_eigenvalue_at_the_kth_position():
    A = with_spectrum(spectra()["repeated"])
    result = top_eigh(A, 6, max_products=BUDGET)
    assert result.method == "krylov"
    assert torch.allclose(result.eigenvalues, torch.tensor([2, 2, 2, 3, 4, 5], dtype=DT))
    check(A, 6, result.eigenvalues, result.eigenvectors, 1e-11)


def test_rank_deficient_beyond_the_rank():
    spectrum = torch.cat([torch.linspace(2, 1, 5, dtype=DT), torch.zeros(D - 5, dtype=DT)])
    A = with_spectrum(spectrum)
    result = top_eigh(A, 9, max_products=BUDGET)  # 4 zeros: any orthonormal null vectors
    assert result.method == "krylov"
    assert result.eigenvalues[:4].abs().max() <= 1e-12
    check(A, 9, result.eigenvalues, result.eigenvectors, 1e-11)
    zero = top_eigh(torch.zeros(D, D, dtype=DT), 3)
    assert torch.equal(zero.eigenvalues, torch.zeros(3, dtype=DT))
    assert torch.allclose(zero.eigenvectors.T @ zero.eigenvectors, torch.eye(3, dtype=DT))


def test_float32_meets_its_tolerance():
    A = with_spectrum(spectra()["flat"]).float()
    result = top_eigh(A, 10, max_products=BUDGET)
    assert result.method == "krylov"
    tol = default_tol(D, torch.float32)
    assert result.residual <= tol
    exact = torch.linalg.eigvalsh(A.double())
    assert (result.eigenvalues.double() - exact[-10:]).abs().max() <= tol * exact[-1]


def test_deterministic_and_generator():
    A = with_spectrum(spectra()["flat"])
    a, b = top_eigh(A, 5, max_products=BUDGET), top_eigh(A, 5, max_products=BUDGET)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    c = top_eigh(A, 5, max_products=BUDGET, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(c.eigenvalues, a.eigenvalues, rtol=0, atol=1e-11)


def test_dense_fallbacks():
    A = with_spectrum(spectra()["decaying"])
    large = top_eigh(A, 60)  # k a large share of D: decomposed at once
    assert large.method == "eigh" and large.cycles == 0 and not krylov_applies(60, D)
    check(A, 60, large.eigenvalues, large.eigenvectors, 1e-12)
    small = top_eigh(A[:20, :20], 2)  # small D
    assert small.method == "eigh"
    starved = top_eigh(with_spectrum(spectra()["flat"]), 10, max_products=100)  # one cycle
    assert starved.method == "eigh" and starved.cycles == 1 and starved.residual > 1e-6
    check(with_spectrum(spectra()["flat"]), 10, starved.eigenvalues, starved.eigenvectors, 1e-12)


def test_block_size_and_errors():
    assert block_size(10, 500) == 16 and block_size(1, 500) == 8 and block_size(10, 12) == 12
    assert block_size(10, 500, oversample=20) == 32
    with pytest.raises(ValueError, match="square"):
        top_eigh(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="k must be"):
        top_eigh(torch.eye(4), 0)
    with pytest.raises(ValueError, match="k must be"):
        top_eigh(torch.eye(4), 5)
    with pytest.raises(ValueError, match="depth"):
        top_eigh(torch.eye(4), 1, depth=0)
