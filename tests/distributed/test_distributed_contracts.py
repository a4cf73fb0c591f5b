"""Construction with a process group checks that every rank holds the same parameters."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned processes import the jobs by name

import contract_jobs
from worlds import run_world

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)

_CACHE: dict = {}


def results(case, world_size):
    key = (case, world_size)
    if key not in _CACHE:
        got = run_world(contract_jobs.construct_job, world_size, case)
        for status, value in got:
            assert status == "ok", value  # no rank aborted, none hung
        _CACHE[key] = [value for _, value in got]
    return _CACHE[key]


EXPECTED = {
    "width": "rank 1 has 4 parameter tensors with 51 entries, rank 0 has 4 with 43",
    "depth": "rank 1 has 6 parameter tensors with 73 entries, rank 0 has 4 with 43",
    "weights": "start from different parameter values",
}


@pytest.mark.parametrize(
    "case, world_size", [("width", 2), ("width", 3), ("depth", 2), ("weights", 2), ("weights", 3)]
)
def test_ranks_that_differ_are_refused_on_every_rank(case, world_size):
    for rank, out in enumerate(results(case, world_size)):
        assert out["alive"] == world_size
        for name in contract_jobs.CLASSES:
            assert out[name] is not None, (rank, name)
            assert EXPECTED[case] in out[name], (rank, name, out[name])
            assert name in out[name]


def test_ranks_that_agree_are_accepted():
    for out in results("same", 2):
        assert out["alive"] == 2
        assert all(out[name] is None for name in contract_jobs.CLASSES), out
