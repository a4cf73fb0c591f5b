"""Data-parallel HessianFree on gloo: every rank takes the single-process full-batch step."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned processes import the jobs by name

import hf_jobs
from worlds import run_world

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)

_CACHE: dict = {}


def world(world_size):
    """All cases, run once per world size (one launch) and shared between the tests."""
    if world_size not in _CACHE:
        results = run_world(hf_jobs.all_job, world_size)
        for status, value in results:
            assert status == "ok", value
        _CACHE[world_size] = [value for _, value in results]
    return _CACHE[world_size]


def single(case):
    key = ("single", case)
    if key not in _CACHE:
        _CACHE[key] = hf_jobs.all_job(0, 1)
    return _CACHE[key][case]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


STEP_CASES = ["step", "step_no_warm_start", "hessian_continue", "acc_step"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", STEP_CASES)
def test_steps_equal_the_single_process_steps(world_size, case):
    reference = single(case)
    for ranks in world(world_size):
        steps = ranks[case]
        assert len(steps) == len(reference)
        drift = 0.0  # relative parameter difference before this step (rounding, amplified by CG)
        for got, want in zip(steps, reference):
            # the same decisions: CG iterations, backtracked iterate, step length, damping
            for key in ("cg_iterations", "chosen_iterate", "alpha", "accepted", "cg_status"):
                assert got[key] == want[key], (key, got[key], want[key])
            for key in ("cg_negative_directions", "loss_evaluations"):
                assert got[key] == want[key], (key, got[key], want[key])
            assert got["damping"] == pytest.approx(want["damping"], rel=1e-12)
            # the loss is evaluated at the parameters before the step: exact to rounding at the
            # start, then within a small multiple of the parameters' drift (CG through negative
            # curvature amplifies the all-reduce's rounding by ~100x per step)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-12 + 10 * drift)
            drift = rel(got["params"], want["params"])
            assert drift <= 1e-8
    assert all(s["accepted"] for s in reference)
    if case == "hessian_continue":
        assert all(s["cg_negative_directions"] > 0 for s in reference)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", STEP_CASES)
def test_parameters_are_bit_identical_across_ranks(world_size, case):
    ranks = world(world_size)
    for other in ranks[1:]:
        for a, b in zip(ranks[0][case], other[case]):
            assert torch.equal(a["params"], b["params"])
            assert a["loss"] == b["loss"] and a["damping"] == b["damping"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "per_sample"])
def test_sharded_diagonals_equal_the_full_batch(world_size, kind):
    full = single("diagonals")[kind]
    ranks = world(world_size)
    for r in ranks:
        assert rel(r["diagonals"][kind], full) <= 1e-12
    assert all(torch.equal(r["diagonals"][kind], ranks[0]["diagonals"][kind]) for r in ranks)
