"""Tests for the trace, diagonal and spectral-density estimators.

The matrices have a known trace, diagonal and spectrum. Statistical checks use fixed seeds, so
they are deterministic; each tolerance is chosen several standard deviations wide (computed
from the estimator's known variance) so that they would also hold for most other seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from secondorder.linalg.estimators import (
    diagonal_estimate,
    hutchinson_trace,
    hutchpp_trace,
    slq_nodes_weights,
    spectral_density,
)
from secondorder.linalg.lanczos import lanczos_tridiag
from secondorder.linalg.operator import Dense, Diagonal, LinearOperator

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(spectrum: Tensor, seed: int = 0) -> Tensor:
    n = spectrum.numel()
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    return (U * spectrum) @ U.T


def rademacher_variance(M: Tensor) -> float:
    """Variance of z^T M z for one Rademacher probe and symmetric M."""
    return float(2 * ((M**2).sum() - (M.diagonal() ** 2).sum()))


class Counting(LinearOperator):
    SELF_ADJOINT = True

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)
        self.matrix = matrix
        self.count = 0

    def _matmat(self, X: Tensor) -> Tensor:
        self.count += X.shape[1]
        return self.matrix @ X


# A generic symmetric matrix with a sizeable diagonal and off-diagonal part.
M = with_spectrum(torch.linspace(-1.0, 3.0, 80, dtype=F64), seed=1)
TRACE = float(M.trace())


# ----------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(distribution: str) -> None:
    seeds = 300
    estimates = torch.tensor(
        [hutchinson_trace(M, 4, generator=gen(s), distribution=distribution) for s in range(seeds)]
    )
    # per-probe variance: Rademacher 2(|M|_F^2 - sum M_ii^2), Gaussian 2|M|_F^2
    var = rademacher_variance(M) if distribution == "rademacher" else float(2 * (M**2).sum())
    std_of_mean = math.sqrt(var / (4 * seeds))
    assert abs(float(estimates.mean()) - TRACE) < 4 * std_of_mean


def test_hutchinson_error_shrinks_like_inverse_sqrt() -> None:
    std_one = math.sqrt(rademacher_variance(M))
    rms = {}
    for m in (4, 16, 64):
        errors = torch.tensor(
            [hutchinson_trace(M, m, generator=gen(s)) - TRACE for s in range(120)]
        )
        rms[m] = float(errors.pow(2).mean().sqrt())
        # the RMS over 120 seeds estimates std_one / sqrt(m) with ~7% relative spread
        # (chi distribution, 1/sqrt(2*120)); 30% is about four of those
        assert rms[m] == pytest.approx(std_one / math.sqrt(m), rel=0.3)
    # quadrupling the probes halves the error
    assert 1.4 < rms[4] / rms[16] < 2.8 and 1.4 < rms[16] / rms[64] < 2.8


def test_hutchinson_stderr_and_exact_cases() -> None:
    estimate, stderr = hutchinson_trace(M, 200, generator=gen(0), return_stderr=True)
    expected = math.sqrt(rademacher_variance(M) / 200)
    assert stderr == pytest.approx(expected, rel=0.3)  # sample std from 200 draws
    assert abs(estimate - TRACE) < 4 * expected
    _, stderr_one = hutchinson_trace(M, 1, return_stderr=True)
    assert math.isnan(stderr_one)
    # Rademacher probes are exact for diagonal matrices: z^T D z = sum_i d_i z_i^2
    d = torch.linspace(-2.0, 5.0, 50, dtype=F64)
    assert hutchinson_trace(Diagonal(d), 1) == pytest.approx(float(d.sum()), abs=1e-12)


def test_probes_do_not_depend_on_batch_size() -> None:
    for distribution in ("rademacher", "gaussian"):
        a = hutchinson_trace(M, 10, generator=gen(3), distribution=distribution)
        b = hutchinson_trace(M, 10, generator=gen(3), distribution=distribution, batch_size=3)
        assert a == pytest.approx(b, rel=1e-13)
    A = Counting(M)
    hutchinson_trace(A, 10, batch_size=4)
    assert A.count == 10


# -------------------------------------------------------------------- Hutch++
def test_hutchpp_beats_hutchinson_on_low_rank_dominated_matrix() -> None:
    spectrum = torch.cat([torch.logspace(2, 1, 10, dtype=F64), torch.full((190,), 0.01, dtype=F64)])
    L = with_spectrum(spectrum, seed=2)
    trace = float(spectrum.sum())
    pp, hutch = [], []
    for s in range(20):
        A = Counting(L)
        pp.append(hutchpp_trace(A, 36, generator=gen(s)) - trace)
        assert A.count == 36  # exactly num_matvecs products
        hutch.append(hutchinson_trace(L, 36, generator=gen(s)) - trace)
    rms_pp = float(torch.tensor(pp).pow(2).mean().sqrt())
    rms_hutch = float(torch.tensor(hutch).pow(2).mean().sqrt())
    # the sketch (12 columns) captures the rank-10 head; what remains is the flat 0.01 tail,
    # so Hutch++'s error is ~1e-2 while Hutchinson's is ~|head|_F / 6 ~ 10
    assert rms_pp < rms_hutch / 100


def test_hutchpp_unbiased_and_exact_for_low_rank() -> None:
    estimates = torch.tensor([hutchpp_trace(M, 9, generator=gen(s)) for s in range(300)])
    # the deflated Hutchinson part has at most the variance of plain Hutchinson with 3 probes
    std_of_mean = math.sqrt(rademacher_variance(M) / 3 / 300)
    assert abs(float(estimates.mean()) - TRACE) < 4 * std_of_mean
    # rank 5 <= 6 sketch columns: exact
    U = torch.randn(60, 5, generator=gen(9), dtype=F64)
    low = U @ U.T
    assert hutchpp_trace(low, 18) == pytest.approx(float(low.trace()), rel=1e-10)


# ------------------------------------------------------------------ diagonal
def test_diagonal_exact_for_diagonal_matrix() -> None:
    d = torch.linspace(-3.0, 4.0, 64, dtype=F64)
    est = diagonal_estimate(Diagonal(d), 1, generator=gen(0))
    torch.testing.assert_close(est, d, rtol=0, atol=1e-14)
    est = diagonal_estimate(torch.diag(d), 3, generator=gen(1), batch_size=2)
    torch.testing.assert_close(est, d, rtol=0, atol=1e-14)


def test_diagonal_converges_on_dense_matrix() -> None:
    # entry i has variance sum_{k != i} M_ik^2 / m; check the normalized error
    row_var = (M**2).sum(dim=1) - M.diagonal() ** 2
    for m in (16, 256):
        est = diagonal_estimate(M, m, generator=gen(m))
        z = (est - M.diagonal()) / torch.sqrt(row_var / m)
        # z-scores of 80 roughly normal entries: RMS ~1 (allow 0.6..1.4), none beyond 4.5
        assert 0.6 < float(z.pow(2).mean().sqrt()) < 1.4
        assert float(z.abs().max()) < 4.5
    gauss = diagonal_estimate(M, 4000, generator=gen(5), distribution="gaussian")
    torch.testing.assert_close(gauss, M.diagonal(), rtol=0, atol=0.1)


# ------------------------------------------------------------------------ SLQ
def test_slq_quadrature_is_exact_for_low_degree_polynomials() -> None:
    # per probe: sum_i w_i theta_i^p = z^T M^p z / z^T z for p < 2 * num_steps
    Z = torch.randn(80, 3, generator=gen(0), dtype=F64)
    dec = lanczos_tridiag(M, 6, Z)
    theta, S = torch.linalg.eigh(dec.tridiagonal())
    w = S[:, 0, :] ** 2
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, dtype=F64))
    for p in range(1, 12):
        quad = (w * theta**p).sum(dim=1)
        exact = (Z * (torch.linalg.matrix_power(M, p) @ Z)).sum(dim=0) / (Z * Z).sum(dim=0)
        torch.testing.assert_close(quad, exact, rtol=1e-10, atol=1e-10)


def test_slq_nodes_weights_match_hutchinson_for_f_x() -> None:
    nodes, weights = slq_nodes_weights(M, num_probes=7, num_steps=10, generator=gen(4))
    assert nodes.shape == weights.shape == (7, 10)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(7, dtype=F64))
    # Rademacher: z^T z = n, so n * mean_j sum_i w_ji theta_ji is Hutchinson with the same probes
    slq_trace = 80 * float((weights * nodes).sum(dim=1).mean())
    assert slq_trace == pytest.approx(hutchinson_trace(M, 7, generator=gen(4)), rel=1e-12)
    # nodes lie in the spectrum's range
    assert float(nodes.min()) >= -1.0 - 1e-10 and float(nodes.max()) <= 3.0 + 1e-10


def test_spectral_density_two_clusters() -> None:
    g = gen(6)
    low = 1.0 + 0.02 * torch.randn(90, generator=g, dtype=F64)  # 30% near 1
    high = 10.0 + 0.05 * torch.randn(210, generator=g, dtype=F64)  # 70% near 10
    C = Dense(with_spectrum(torch.cat([low, high]), seed=7), symmetric=True)
    grid, density = spectral_density(C, num_probes=10, num_steps=20, generator=gen(8))
    assert grid.shape == density.shape == (1000,)
    assert torch.all(density >= 0)
    # n = 300; the Gaussian kernels integrate to 1; the default grid covers +-5 sigma
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    below = grid < 5.5
    mass_low = float(torch.trapezoid(density[below], grid[below]))
    # each probe's mass near the low cluster is sum_{k low} (u_k^T z)^2 / n, with standard
    # deviation ~ sqrt(2 * 0.3 * 0.7 / n) ~ 0.04 per probe and ~0.012 over 10 probes
    assert mass_low == pytest.approx(0.3, abs=0.05)
    # the smoothed density peaks at the clusters
    assert abs(float(grid[below][density[below].argmax()]) - 1.0) < 0.2
    assert abs(float(grid[~below][density[~below].argmax()]) - 10.0) < 0.3


def test_spectral_density_custom_grid_and_sigma() -> None:
    grid = torch.linspace(-3.0, 5.0, 801, dtype=F64)
    out_grid, density = spectral_density(
        M, num_probes=4, num_steps=15, generator=gen(0), grid=grid, sigma=0.1
    )
    assert torch.equal(out_grid, grid)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    # the true density is uniform on [-1, 3]: 1/4 there
    mid = (grid > -0.5) & (grid < 2.5)
    assert float(density[mid].mean()) == pytest.approx(0.25, abs=0.05)


def test_slq_with_more_steps_than_the_krylov_space() -> None:
    # 3 distinct eigenvalues: every Krylov space is invariant after 3 steps
    spec = torch.tensor([1.0, 2.0, 4.0], dtype=F64).repeat_interleave(10)
    D = with_spectrum(spec, seed=3)
    nodes, weights = slq_nodes_weights(D, num_probes=2, num_steps=8, generator=gen(0))
    # 3 exact nodes per probe; the 5 padding nodes carry weight exactly 0
    assert torch.all((weights > 1e-12).sum(dim=1) == 3)
    support = nodes[weights > 1e-12].reshape(2, 3)
    torch.testing.assert_close(support, spec.unique().expand(2, 3), rtol=0, atol=1e-10)
    assert torch.all(weights[weights <= 1e-12] == 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, dtype=F64))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: hutchinson_trace(M, 0), ValueError, r"expected 1 <= num_probes, got num_probes=0"),
        (lambda: hutchinson_trace(M, 2.5), TypeError, r"expected an int for num_probes, got float"),
        (
            lambda: hutchinson_trace(M, 2, distribution="normal"),
            ValueError,
            r"expected distribution in \('rademacher', 'gaussian'\), got 'normal'",
        ),
        (lambda: hutchinson_trace(M, 2, batch_size=0), ValueError, r"expected 1 <= batch_size"),
        (lambda: hutchinson_trace(M, 2, generator=1), TypeError, r"torch.Generator or None"),
        (lambda: hutchpp_trace(M, 2), ValueError, r"expected 3 <= num_matvecs, got num_matvecs=2"),
        (lambda: diagonal_estimate(M, 0), ValueError, r"expected 1 <= num_probes"),
        (
            lambda: diagonal_estimate(torch.ones(3, 4, dtype=F64), 1),
            ValueError,
            r"expected a square operator, got shape \(3, 4\)",
        ),
        (
            lambda: slq_nodes_weights(M, num_probes=1, num_steps=0),
            ValueError,
            r"expected 1 <= num_steps, got num_steps=0",
        ),
        (
            lambda: spectral_density(M, num_probes=1, num_steps=3, sigma=0.0),
            ValueError,
            r"expected sigma > 0, got 0.0",
        ),
        (
            lambda: spectral_density(M, num_probes=1, num_steps=3, grid=torch.ones(2, 2)),
            ValueError,
            r"expected grid to be a 1-D tensor, got shape \(2, 2\)",
        ),
        (
            lambda: spectral_density(M, num_probes=1, num_steps=3, num_points=1),
            ValueError,
            r"expected 2 <= num_points, got num_points=1",
        ),
    ],
)
def test_bad_arguments(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_inputs_not_mutated() -> None:
    before = M.clone()
    hutchinson_trace(M, 3)
    hutchpp_trace(M, 6)
    diagonal_estimate(M, 3)
    spectral_density(M, num_probes=2, num_steps=5)
    assert torch.equal(M, before)
