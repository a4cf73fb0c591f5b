"""The one status type of every solver's result."""

from __future__ import annotations

import pytest
import torch

import secondorder as so
from secondorder.linalg import (
    Dense,
    SolverStatus,
    TopEigh,
    block_cg,
    cg,
    lanczos,
    top_eigh,
)

DT = torch.float64


def test_scipy_like_values_and_aliases() -> None:
    assert SolverStatus.CONVERGED == 0 and SolverStatus.SUCCESS is SolverStatus.CONVERGED
    assert SolverStatus.MARTENS is SolverStatus.CALLBACK
    assert so.CGStatus is SolverStatus and so.SolverStatus is SolverStatus
    assert all(s != 0 for s in SolverStatus if s is not SolverStatus.CONVERGED)
    assert len({int(s) for s in SolverStatus}) == len(list(SolverStatus))


@pytest.mark.parametrize("status", list(SolverStatus))
def test_every_status_has_a_message(status: SolverStatus) -> None:
    assert isinstance(status.message, str) and len(status.message) > 20
    assert status.success == (status in (SolverStatus.CONVERGED, SolverStatus.CALLBACK))


def _spd(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, n, generator=g, dtype=DT)
    return q @ q.T + n * torch.eye(n, dtype=DT)


def test_every_solver_reports_a_solver_status() -> None:
    A = _spd()
    b = torch.ones(6, dtype=DT)
    _, info = cg(A, b, rtol=1e-10)
    assert type(info.status) is SolverStatus and info.status == SolverStatus.CONVERGED
    _, binfo = block_cg(lambda idx, vs: [A @ v for v in vs], [b, 2 * b], rtol=1e-10)
    assert all(type(s) is SolverStatus for s in binfo.status)
    assert binfo.status == [SolverStatus.CONVERGED] * 2 and "every system" in binfo.message
    *_, linfo = lanczos(Dense(A), 2, return_info=True)
    assert type(linfo.status) is SolverStatus and linfo.status == SolverStatus.CONVERGED
    result = top_eigh(A, 2)
    assert isinstance(result, TopEigh) and result.status == SolverStatus.CONVERGED


def test_block_cg_statuses_and_message() -> None:
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    b = [torch.ones(1, dtype=DT), torch.ones(1, dtype=DT), torch.ones(2, dtype=DT)]
    mats = [A[:1, :1], A[1:, 1:], torch.zeros(2, 2, dtype=DT)]
    _, info = block_cg(
        lambda idx, vs: [mats[i] @ v for i, v in zip(idx, vs)],
        b,
        rtol=1e-12,
        negative_curvature="stop",
    )
    assert info.status == [
        SolverStatus.CONVERGED,
        SolverStatus.NEGATIVE_CURVATURE,
        SolverStatus.BREAKDOWN,
    ]
    lines = info.message.splitlines()
    assert len(lines) == 2 and "NEGATIVE_CURVATURE" in lines[0] and "BREAKDOWN" in lines[1]
