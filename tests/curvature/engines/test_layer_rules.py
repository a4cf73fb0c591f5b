"""Contract test of every layer rule against ``torch.func.jvp``/``vjp`` of the single module.

Parametrised over the registry's examples (``secondorder.curvature.layers.EXAMPLES``), so a new
rule is tested by adding it with its examples; every registered type must have one.
"""

from __future__ import annotations

import pytest
import torch
from rule_cases import module_function, setup_rule

from secondorder.curvature.layers import EXAMPLES, RULES, rule_for

DT = torch.float64
K = 3


_setup, _f = setup_rule, module_function


def test_every_rule_has_an_example():
    covered = {type(e.build()) for e in EXAMPLES}
    assert set(RULES) <= covered, set(RULES) - covered


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_forward_jvp_vjp(example):
    module, rule, x, params = _setup(example)
    out, ctx = rule.forward(module, x, params)
    want = _f(module, params, x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if not x.is_floating_point():  # indices: products with the parameters only
        _check_parameter_products(module, rule, ctx, x, params, want)
        return
    dx = torch.randn_like(x)
    dp = {k: torch.randn_like(v) for k, v in params.items()}
    _, jv = torch.func.jvp(lambda x_, p_: _f(module, p_, x_), (x, params), (dx, dp))
    torch.testing.assert_close(rule.jvp(module, ctx, dx, dp, False), jv, rtol=1e-10, atol=1e-12)
    # input tangent alone, parameter tangents alone
    _, jx = torch.func.jvp(lambda x_: _f(module, params, x_), (x,), (dx,))
    torch.testing.assert_close(rule.jvp(module, ctx, dx, {}, False), jx, rtol=1e-10, atol=1e-12)
    if dp:
        _, jp = torch.func.jvp(lambda p_: _f(module, p_, x), (params,), (dp,))
        got = rule.jvp(module, ctx, None, dp, False)
        torch.testing.assert_close(got, jp, rtol=1e-10, atol=1e-12)
    u = torch.randn_like(want)
    _, vjp_fn = torch.func.vjp(lambda x_, p_: _f(module, p_, x_), x, params)
    gx, gp = vjp_fn(u)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    got_x = rule.vjp(module, ctx, u, True, grads, False)
    torch.testing.assert_close(got_x, gx, rtol=1e-10, atol=1e-12)
    for k in params:
        torch.testing.assert_close(grads[k], gp[k], rtol=1e-10, atol=1e-12)
    assert rule.vjp(module, ctx, u, False, {}, False) is None


def _check_parameter_products(module, rule, ctx, x, params, want):
    """jvp and vjp of a module whose input is not differentiable (indices)."""
    dp = {k: torch.randn_like(v) for k, v in params.items()}
    _, jp = torch.func.jvp(lambda p_: _f(module, p_, x), (params,), (dp,))
    torch.testing.assert_close(rule.jvp(module, ctx, None, dp, False), jp, rtol=1e-10, atol=1e-12)
    u = torch.randn_like(want)
    (gp,) = torch.func.vjp(lambda p_: _f(module, p_, x), params)[1](u)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    assert rule.vjp(module, ctx, u, True, grads, False) is None
    for k in params:
        torch.testing.assert_close(grads[k], gp[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_batched_columns(example):
    """K columns at once equal K single products."""
    module, rule, x, params = _setup(example)
    out, ctx = rule.forward(module, x, params)
    dX = torch.randn(K, *x.shape, dtype=DT) if x.is_floating_point() else None
    dP = {k: torch.randn(K, *v.shape, dtype=DT) for k, v in params.items()}
    for dxs, dps in ((dX, dP), (dX, {}), (None, dP)):
        if dxs is None and not dps:
            continue
        got = rule.jvp(module, ctx, dxs, dps, True)
        for k in range(K):
            col = rule.jvp(
                module,
                ctx,
                None if dxs is None else dxs[k],
                {n: t[k] for n, t in dps.items()},
                False,
            )
            torch.testing.assert_close(got[k], col, rtol=1e-10, atol=1e-12)
    U = torch.randn(K, *out.shape, dtype=DT)
    grads = {n: torch.zeros(K, *v.shape, dtype=DT) for n, v in params.items()}
    gx = rule.vjp(module, ctx, U, True, grads, True)
    for k in range(K):
        g1 = {n: torch.zeros_like(v) for n, v in params.items()}
        gx1 = rule.vjp(module, ctx, U[k], True, g1, False)
        if gx is None:  # an index input has no cotangent
            assert gx1 is None and not x.is_floating_point()
        else:
            torch.testing.assert_close(gx[k], gx1, rtol=1e-10, atol=1e-12)
        for n in params:
            torch.testing.assert_close(grads[n][k], g1[n], rtol=1e-10, atol=1e-12)


def test_refusals_name_the_reason():
    assert rule_for(torch.nn.GRU(2, 2))[0] is None
    # Dropout in training mode has its rule (one fixed mask per forward pass, issue 15)
    assert rule_for(torch.nn.Dropout(0.5).train())[0] is not None
    assert rule_for(torch.nn.Embedding(4, 2, max_norm=1.0))[0] is None
    assert "sparse" in rule_for(torch.nn.Embedding(4, 2, sparse=True))[1]
    # BatchNorm by batch statistics has its rule (training mode, or no running statistics)
    assert rule_for(torch.nn.BatchNorm1d(3).train())[0] is not None
    relu = torch.nn.ReLU()
    relu.register_forward_hook(lambda *a: None)
    assert rule_for(relu) == (None, "it has hooks")
    conv = torch.nn.Conv2d(1, 1, 2, padding="same")  # torch pads one side more
    assert "padding" in rule_for(conv)[1]
    assert "scale_grad_by_freq" in rule_for(torch.nn.Embedding(4, 2, scale_grad_by_freq=True))[1]
