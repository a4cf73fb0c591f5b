"""LinearStep's pullback: built at a stand-in, equal to the pullback at the input."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.nn import functional as F

from secondorder.curvature.engines.steps import LinearStep, linear_pullback

DT = torch.float64
IDX = torch.tensor([2, 0, 2])

LINEAR_FUNCTIONS = {
    "transpose": (lambda a: a.transpose(1, 2), (2, 3, 4)),
    "permute": (lambda a: a.permute(2, 0, 1), (2, 3, 4)),
    "mT": (lambda a: a.mT, (2, 3, 4)),
    "getitem_slice": (lambda a: a[:, 1:, ::2], (2, 3, 4)),
    "getitem_index": (lambda a: a[:, IDX], (2, 3, 4)),
    "select": (lambda a: a.select(1, 2), (2, 3, 4)),
    "narrow": (lambda a: a.narrow(2, 1, 2), (2, 3, 4)),
    "mean": (lambda a: a.mean(1), (2, 3, 4)),
    "sum_keepdim": (lambda a: a.sum((0, 2), keepdim=True), (2, 3, 4)),
    "expand": (lambda a: a.expand(3, 2, 3, 4), (2, 3, 4)),
    "avg_pool2d": (lambda a: F.avg_pool2d(a, 2), (2, 3, 4, 6)),
    "adaptive_avg_pool1d": (lambda a: F.adaptive_avg_pool1d(a, 3), (2, 3, 7)),
    "embedding_weight": (lambda a: F.embedding(IDX, a), (4, 5)),
    "view": (lambda a: a.view(-1), (2, 3, 4)),  # cannot run on the stand-in: built at x
    "channels_last": (lambda a: a.sum(1), (2, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(LINEAR_FUNCTIONS))
@pytest.mark.parametrize("batched", [False, True])
def test_pullback_equals_the_pullback_at_the_input(name, batched):
    f, shape = LINEAR_FUNCTIONS[name]
    x = torch.randn(shape, dtype=DT)
    if name == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    want_pb = torch.func.vjp(f, x)[1]
    got_pb = linear_pullback(f, x)
    u = torch.randn((3, *f(x).shape) if batched else f(x).shape, dtype=DT)
    if batched:
        want = torch.vmap(want_pb)(u)[0]
        got = torch.vmap(got_pb)(u)[0]
    else:
        want, got = want_pb(u)[0], got_pb(u)[0]
    assert got.shape == x.shape or got.shape == (3, *x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["transpose", "getitem_slice", "select", "mean", "avg_pool2d"])
def test_linear_step_does_not_keep_its_input(name):
    """The step's pullback holds nothing of x (a view of x would keep it alive)."""
    f, shape = LINEAR_FUNCTIONS[name]
    x = torch.randn(shape, dtype=DT)
    ref = weakref.ref(x)
    step = LinearStep([None], f, x)
    u = torch.randn(f(x).shape, dtype=DT)
    want = torch.func.vjp(f, x.clone())[1](u)[0]
    del x
    gc.collect()
    assert ref() is None
    torch.testing.assert_close(step.vjp(u, [True], {}, False)[0], want, rtol=0, atol=0)
