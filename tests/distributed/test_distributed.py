"""Data-parallel operators and optimizers on gloo equal the single-process full-batch ones."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned processes import the jobs by name

import dist_jobs
from worlds import run_world

import secondorder as so

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)


def ok(results):
    for status, value in results:
        assert status == "ok", value
    return [value for _, value in results]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


_CACHE: dict = {}


def world_results(job, world_size, *args):
    """Run a job once per world size and share its results between the tests."""
    key = (job.__name__, world_size, args)
    if key not in _CACHE:
        _CACHE[key] = ok(run_world(job, world_size, *args))
    return _CACHE[key]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("op_name, loss_name", dist_jobs.OPERATOR_CASES)
def test_sharded_operator_equals_full_batch(world_size, op_name, loss_name):
    model, loss_fn, X, y = dist_jobs.problem(loss_name)
    full = dist_jobs.OPERATORS[op_name](model, loss_fn, (X, y))
    results = [r[op_name, loss_name] for r in world_results(dist_jobs.operator_job, world_size)]
    for dense, grad, loss in results:
        assert rel(dense, full.to_dense()) <= 1e-10
        assert rel(grad, full.gradient()) <= 1e-10
        assert abs(loss.item() - full.loss.item()) <= 1e-12 * abs(full.loss.item())
    # every rank sees exactly the same numbers
    for dense, grad, _ in results[1:]:
        assert torch.equal(dense, results[0][0]) and torch.equal(grad, results[0][1])


def test_mc_fisher_ranks_draw_differently():
    dense = ok(run_world(dist_jobs.mc_job, 2))
    assert torch.equal(dense[0], dense[1])  # reduced: the same operator everywhere
    model, loss_fn, X, y = dist_jobs.problem("ce")
    exact = so.Fisher(model, loss_fn, (X, y)).to_dense()
    assert not torch.allclose(dense[0], exact)  # it is a sample
    assert dense[0].trace() > 0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("opt_name", list(dist_jobs.OPTIMIZERS))
def test_optimizer_steps_match_single_process(world_size, opt_name):
    single_params, single_losses = dist_jobs.optimizer_job(0, 1, opt_name, 3)
    results = [r[opt_name] for r in world_results(dist_jobs.all_optimizers_job, world_size, 3)]
    for params, losses in results:
        assert rel(params, single_params) <= 1e-8
        assert losses == pytest.approx(single_losses, rel=1e-10)
    for params, _ in results[1:]:
        assert torch.equal(params, results[0][0])  # bit-identical across ranks


def test_checkpoint_loads_in_any_world_size(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ok(run_world(dist_jobs.checkpoint_job, 2, path, 2, None))
    single_params, _ = dist_jobs.optimizer_job(0, 1, "gauss_newton", 4)
    for world_size in (1, 2, 3):
        results = ok(run_world(dist_jobs.checkpoint_job, world_size, path, None, 2))
        for params in results:
            assert rel(params, single_params) <= 1e-8


def test_failing_rank_stops_every_rank_within_timeout():
    start = time.monotonic()
    results = run_world(dist_jobs.failing_job, 2, timeout_s=10.0, join_timeout=90.0)
    elapsed = time.monotonic() - start
    statuses = [s for s, _ in results]
    assert statuses == ["error", "error"], results
    assert "rank 1 fails on purpose" in results[1][1]
    assert elapsed < 60
