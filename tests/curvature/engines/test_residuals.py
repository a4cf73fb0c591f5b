r"""Contract test of every layer rule's residual (second-order term) against ``torch.func``.

The residual of :math:`y = f(x, \theta)` at the gradient cotangent :math:`\delta` is
:math:`(r_x, r_\theta) = \frac{d}{d\epsilon} J(x + \epsilon dx, \theta + \epsilon d\theta)^\top
\delta`; the reference is ``torch.func.jvp`` of ``torch.func.vjp`` of the single module in
float64, over the registry's examples (``secondorder.curvature.layers.EXAMPLES``), single and
batched columns, and with the PCH modification for the activations.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from rule_cases import module_function, setup_rule

from secondorder.curvature.layers import EXAMPLES
from secondorder.curvature.layers.linear import LinearRule
from secondorder.curvature.pch_mode import positive_curvature_mode

DT = torch.float64
K = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}


_f = module_function


def _setup(example):
    module, rule, x, params = setup_rule(example)
    out, ctx = rule.forward(module, x, params)
    delta = torch.randn_like(out)
    return module, rule, x, params, ctx, delta


def _reference(module, params, x, delta, dx, dp):
    """(r_x, r_theta): forward mode over the single module's pullback of delta."""
    tp = {n: dp.get(n, torch.zeros_like(v)) for n, v in params.items()}
    if not x.is_floating_point():  # indices: the parameters' pullback alone

        def pullback_p(p_):
            return torch.func.vjp(lambda q: _f(module, q, x), p_)[1](delta)[0]

        _, rp = torch.func.jvp(pullback_p, (params,), (tp,))
        return torch.zeros(x.shape, dtype=DT), rp

    def pullback(x_, p_):
        return torch.func.vjp(lambda a, q: _f(module, q, a), x_, p_)[1](delta)

    tx = dx if dx is not None else torch.zeros_like(x)
    _, (rx, rp) = torch.func.jvp(pullback, (x, params), (tx, tp))
    return rx, rp


def _ours(module, rule, ctx, x, params, delta, dx, dp, batched=False):
    rctx = rule.prepare_residual(module, ctx, x, params, delta)
    lead = (K,) if batched else ()
    grads = {n: torch.zeros(*lead, *v.shape, dtype=DT) for n, v in params.items()}
    rx = None
    if rctx is not None:
        rx = rule.residual(module, ctx, rctx, dx, dp, True, grads, batched)
    if rx is None:
        rx = torch.zeros(*lead, *x.shape, dtype=DT)
    return rx, grads


def residual_errors(example):
    """Largest absolute error of the rule's residual over input/parameter tangent subsets."""
    module, rule, x, params, ctx, delta = _setup(example)
    dx = torch.randn_like(x) if x.is_floating_point() else None
    dp = {k: torch.randn_like(v) for k, v in params.items()}
    worst = 0.0
    for tx, tp in ((dx, dp), (dx, {}), (None, dp)):
        if tx is None and not tp:
            continue
        want_x, want_p = _reference(module, params, x, delta, tx, tp)
        got_x, got_p = _ours(module, rule, ctx, x, params, delta, tx, tp)
        scale = max(float(want_x.abs().max()), 1.0)
        worst = max(worst, float((got_x - want_x).abs().max()) / scale)
        for n in params:
            scale = max(float(want_p[n].abs().max()), 1.0)
            worst = max(worst, float((got_p[n] - want_p[n]).abs().max()) / scale)
    return worst


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_residual_matches_jvp_of_vjp(example):
    assert residual_errors(example) < 1e-10


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_residual_batched_columns(example):
    """K columns at once equal K single residuals."""
    module, rule, x, params, ctx, delta = _setup(example)
    dX = torch.randn(K, *x.shape, dtype=DT) if x.is_floating_point() else None
    dP = {k: torch.randn(K, *v.shape, dtype=DT) for k, v in params.items()}
    for dxs, dps in ((dX, dP), (dX, {}), (None, dP)):
        if dxs is None and not dps:
            continue
        got_x, got_p = _ours(module, rule, ctx, x, params, delta, dxs, dps, batched=True)
        for k in range(K):
            dxk = None if dxs is None else dxs[k]
            one_x, one_p = _ours(
                module, rule, ctx, x, params, delta, dxk, {n: t[k] for n, t in dps.items()}
            )
            torch.testing.assert_close(got_x[k], one_x, **TOL)
            for n in params:
                torch.testing.assert_close(got_p[n][k], one_p[n], **TOL)


def test_a_broken_residual_fails():
    """The contract test catches a residual that drops its weight term."""
    example = next(e for e in EXAMPLES if e.name == "linear")
    assert residual_errors(example) < 1e-10

    def broken(self, module, ctx, rctx, dx, dparams, need_input, grads, batched):
        return rctx["delta"] @ dparams["weight"] if need_input and "weight" in dparams else None

    with mock.patch.object(LinearRule, "residual", broken):
        assert residual_errors(example) > 1e-3


ACTIVATIONS = [e for e in EXAMPLES if e.name.startswith("act_")]


@pytest.mark.parametrize("modify", ["clip", "abs"])
@pytest.mark.parametrize("example", ACTIVATIONS, ids=lambda e: e.name)
def test_modified_activation_residual_matches_pch_mode(example, modify):
    """rho(f''(a) delta) dx equals the double backward recorded under positive_curvature_mode."""
    module, rule, x, params, ctx, delta = _setup(example)
    dx = torch.randn_like(x)
    rctx = rule.prepare_residual(module, ctx, x, params, delta, modify)
    got = (
        torch.zeros_like(x)
        if rctx is None
        else rule.residual(module, ctx, rctx, dx, {}, True, {}, False)
    )
    leaf = x.clone().requires_grad_(True)
    with positive_curvature_mode(modify):
        y = _f(module, params, leaf)
        (g,) = torch.autograd.grad(y, leaf, delta, create_graph=True)
    if g.requires_grad:
        (hv,) = torch.autograd.grad(g, leaf, dx)
    else:
        hv = torch.zeros_like(x)
    torch.testing.assert_close(got, hv, **TOL)
