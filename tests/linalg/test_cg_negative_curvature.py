"""CG with negative_curvature="continue": Galerkin iterates through indefinite directions."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg.cg import CGStatus, cg
from secondorder.linalg.cg_callbacks import CallbackList, IterateGrid, MartensStop
from secondorder.linalg.preconditioners import JacobiPreconditioner

DT = torch.float64


def _symmetric(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=DT))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ Q.T


def _solve_through(A, b, x0=None, M=None, martens=False, **kw):
    kw = {"rtol": 1e-12, "maxiter": 50, **kw}
    grid = IterateGrid(keep_before_negative=True)
    callback = CallbackList([grid, MartensStop(5e-4) if martens else None])
    x, info = cg(A, b, x0, M=M, callback=callback, negative_curvature="continue", **kw)
    info.iterates = grid.snapshots(x, info)
    return x, info, info.negative_curvature_directions


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_through_negative_curvature_solves_indefinite_systems(preconditioned):
    A = _symmetric([-3.0, -1.0, 0.5, 2.0, 5.0, 9.0])
    b = torch.arange(1.0, 7.0, dtype=DT)
    M = JacobiPreconditioner(torch.linspace(1, 3, 6, dtype=DT)) if preconditioned else None
    x0 = torch.full((6,), 0.1, dtype=DT)
    x, info, negative = _solve_through(A, b, x0=x0, M=M)
    assert info.status == CGStatus.CONVERGED and negative >= 1
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=0, atol=1e-9)
    assert info.num_matvecs == info.iterations + 1  # one more for x0
    # quadratic values phi(x_k) = x^T A x / 2 - b^T x, recorded for free
    assert info.quadratic_values[-1] == pytest.approx(float(0.5 * x @ A @ x - b @ x), rel=1e-10)


def test_cg_through_negative_curvature_equals_cg_without_negative_curvature():
    A = _symmetric([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], seed=1)
    b = torch.linspace(-1, 1, 8, dtype=DT)
    x, info, negative = _solve_through(A, b, rtol=1e-9, maxiter=40, martens=True)
    grid = IterateGrid()
    y, ref = cg(A, b, rtol=1e-9, maxiter=40, callback=CallbackList([grid, MartensStop()]))
    ref.iterates = grid.snapshots(y, ref)
    assert negative == 0 and info.status == ref.status and info.iterations == ref.iterations
    assert torch.allclose(x, y, rtol=0, atol=1e-12)
    assert [k for k, _, _ in info.iterates] == [k for k, _, _ in ref.iterates]
    for (_, a, pa), (_, c, pc) in zip(info.iterates, ref.iterates):
        assert torch.allclose(a, c, rtol=0, atol=1e-12) and pa == pytest.approx(pc, rel=1e-10)


def test_cg_through_negative_curvature_keeps_the_iterate_before_it():
    # this system (seed 2) has negative curvature first in CG iteration 7, so cg stops at x_6,
    # which is off the snapshot grid ceil(1.3^j) = 1, 2, 3, 4, 5, 7, 9, ... but kept anyway
    A = _symmetric([-0.2, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0, 11.0, 14.0], seed=2)
    b = torch.ones(10, dtype=DT)
    y, ref = cg(A, b, rtol=1e-12, maxiter=50)
    assert ref.status == CGStatus.NEGATIVE_CURVATURE and ref.iterations == 6
    x, info, negative = _solve_through(A, b)
    kept = {k: xk for k, xk, _ in info.iterates}
    assert 6 in kept and negative >= 1
    assert [k for k, _, _ in info.iterates][:6] == [1, 2, 3, 4, 5, 6]
    assert torch.allclose(kept[6], y, rtol=0, atol=1e-12)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=0, atol=1e-8)


def test_cg_through_negative_curvature_stops_at_a_breakdown():
    # p_0 = b with p^T A p = 0: no Galerkin iterate exists
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    x, info, negative = _solve_through(A, torch.tensor([1.0, 0.0], dtype=DT))
    assert info.status == CGStatus.NEGATIVE_CURVATURE and info.iterations == 0
    assert torch.equal(x, torch.zeros(2, dtype=DT)) and negative == 0
