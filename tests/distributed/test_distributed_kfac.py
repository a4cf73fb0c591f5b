"""Data-parallel K-FAC and EKFAC on gloo equal the single-process full-batch operators."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned processes import the jobs by name

import kfac_jobs
from worlds import run_world

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)


def ok(results):
    for status, value in results:
        assert status == "ok", value
    return [value for _, value in results]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sharded_kfac_equals_full_batch():
    results = ok(run_world(kfac_jobs.kfac_job, 2))
    for case in kfac_jobs.CASES:
        full = kfac_jobs.build(*case, lambda X, y: (X, y)).to_dense()
        for r in results:
            assert rel(r[case], full) <= 1e-12, case
        assert torch.equal(results[0][case], results[1][case])


def test_sharded_mc_kfac_is_the_same_on_every_rank():
    (d0, x0), (d1, x1) = ok(run_world(kfac_jobs.kfac_mc_job, 2))
    assert torch.equal(d0, d1) and torch.equal(x0, x1)


@pytest.mark.parametrize("inverse", ["eigen", "cholesky"])
def test_sharded_kfac_optimizer_equals_single_process(inverse):
    job = {"eigen": kfac_jobs.kfac_optimizer_job, "cholesky": kfac_jobs.kfac_optimizer_cholesky_job}
    results = ok(run_world(job[inverse], 2))
    theta, grad = kfac_jobs.kfac_optimizer_run(lambda X, y: (X, y), inverse=inverse)
    for t, g in results:
        assert rel(t, theta) <= 1e-12 and rel(g, grad) <= 1e-12
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_sharded_attention_and_embedding_kfac_equal_single_process():
    """Kronecker blocks of attention projections and a 1-D embedding factor, all-reduced."""
    results = ok(run_world(kfac_jobs.lm_kfac_job, 2))
    full = kfac_jobs.lm_kfac(lambda X, y: (X, y))
    for key, ref in full.items():
        for r in results:
            assert rel(r[key], ref) <= 1e-12, key
        assert torch.equal(results[0][key], results[1][key])
