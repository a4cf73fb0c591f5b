"""What the registry-wide rule tests share: one example's module, rule and input, and the
module as a function of its parameters for the torch.func references."""

from __future__ import annotations

import torch
from torch.func import functional_call

from secondorder.curvature.layers import rule_for
from secondorder.curvature.twice_differentiable import TwiceDifferentiable

DT = torch.float64


def setup_rule(example):
    """The example's module (float64), its rule, an input and the parameter values."""
    torch.manual_seed(0)
    module = example.build().to(DT)
    rule, why = rule_for(module)
    assert rule is not None, why
    if "indices" in example.extra:  # an index input (Embedding): not differentiable
        x = torch.randint(0, example.extra["indices"], example.shape)
    else:
        x = torch.randn(*example.shape, dtype=DT)
    params = {k: v.detach() for k, v in module._parameters.items() if v is not None}
    return module, rule, x, params


def module_function(module, params, x):
    """``module(x)`` at ``params`` for torch.func (Hardsigmoid by its definition).

    Buffers are copied inside: a training-mode BatchNorm updates its running statistics in
    place, which torch.func refuses on a captured tensor.
    """
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    with TwiceDifferentiable():
        return functional_call(module, {**params, **buffers}, (x,))
