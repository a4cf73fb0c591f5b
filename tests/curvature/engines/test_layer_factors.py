"""Contract test of the rules' per-sample hooks against ``torch.func`` per-sample references.

Parametrised over the registry's examples (``secondorder.curvature.layers.EXAMPLES``) plus a
few more: ``rowwise`` must only claim what the single module's Jacobian shows (no entry between
different leading indices), and ``per_sample_param_vjp``, ``sq_param_vjp`` and ``kronecker``,
where a rule implements them, must match ``vmap`` over samples of ``grad`` in float64.
"""

from __future__ import annotations

import pytest
import torch
from rule_cases import module_function, setup_rule
from torch import nn
from torch.func import grad, jacrev, vmap

from secondorder.curvature.layers import EXAMPLES, Example, Rule, rule_for

DT = torch.float64
K = 3

MORE = [
    Example(lambda: nn.Linear(3, 2), (4, 2, 5, 3), "linear_4d"),
    Example(lambda: nn.Linear(5, 4, bias=False), (6, 5), "linear_nobias"),
    Example(lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), (4, 2, 9), "conv1d_sd"),
    Example(lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(0, 1)), (3, 2, 5, 6), "c2d"),
    Example(lambda: nn.Conv2d(1, 2, 2, bias=False), (3, 1, 4, 4), "conv2d_nobias"),
    Example(lambda: nn.LayerNorm(4), (4,), "layernorm_1d_input"),
    Example(lambda: nn.Flatten(0, -1), (3, 4), "flatten_everything"),
    Example(lambda: nn.Embedding(6, 3, padding_idx=2), (4, 5), "embedding_pad", {"indices": 6}),
]
ALL = [*EXAMPLES, *MORE]
# examples whose rule must give per-sample cotangents (the fast paths rely on them)
PER_SAMPLE = {"linear", "linear_3d_nobias", "linear_4d", "linear_nobias", "conv1d", "conv2d"}
PER_SAMPLE |= {"linear_seq", "linear_4d_bias"}
PER_SAMPLE |= {"conv1d_sd", "c2d", "conv2d_nobias", "conv2d_same", "conv1d_same", "conv1d_valid"}
PER_SAMPLE |= {"batchnorm1d", "batchnorm1d_seq", "batchnorm2d", "batchnorm3d", "layernorm"}
PER_SAMPLE |= {"layernorm_2d", "layernorm_nobias", "groupnorm1d", "groupnorm2d"}
PER_SAMPLE |= {"embedding", "embedding_seq", "embedding_pad", "rmsnorm", "rmsnorm_2d"}


_setup, _f = setup_rule, module_function


def _has_hooks(rule: Rule) -> bool:
    return type(rule).per_sample_param_vjp is not Rule.per_sample_param_vjp


@pytest.mark.parametrize("example", ALL, ids=lambda e: e.name)
def test_rowwise_only_where_the_jacobian_keeps_samples_apart(example):
    module, rule, x, params = _setup(example)
    out, ctx = rule.forward(module, x, params)
    if not rule.rowwise(module, ctx):
        return
    assert out.ndim >= 1 and out.shape[0] == x.shape[0]
    if not x.is_floating_point():  # indices: row n of the output reads row n of them only
        for n in range(x.shape[0]):
            other = x.clone()
            other[n] = (other[n] + 1) % example.extra["indices"]
            changed = (_f(module, params, other) != out).flatten(1).any(1)
            assert changed[n] and changed.sum() == 1
        return
    jac = jacrev(lambda x_: _f(module, params, x_))(x)  # (*out, *in)
    n = x.shape[0]
    J = jac.reshape(n, out[0].numel(), n, x[0].numel())
    off = J.clone()
    for i in range(n):
        off[i, :, i] = 0
    assert off.abs().max() == 0, "rowwise() claims a Jacobian that mixes the leading index"
    assert J.abs().max() > 0


def test_rowwise_refuses_mixing_layers():
    for build, shape in [
        (lambda: nn.LayerNorm(4), (4,)),  # normalises over the leading index
        (lambda: nn.Flatten(0, -1), (3, 4)),
        (lambda: nn.Linear(4, 2), (4,)),
        (lambda: nn.Conv2d(2, 2, 3), (2, 4, 4)),  # unbatched: channels lead
    ]:
        module = build().to(DT)
        rule = rule_for(module)[0]
        x = torch.randn(*shape, dtype=DT)
        params = {k: v.detach() for k, v in module._parameters.items() if v is not None}
        _, ctx = rule.forward(module, x, params)
        assert not rule.rowwise(module, ctx), type(module).__name__


def _reference(module, params, x, U):
    """Per-sample parameter cotangents ``{name: (N, K, *shape)}`` by vmap over grad."""

    def one(p, xn, un):  # sample n alone (a batch of one), one cotangent column
        return (_f(module, p, xn.unsqueeze(0)).squeeze(0) * un).sum()

    per_col = vmap(grad(one), in_dims=(None, None, 0))  # over the K columns
    return vmap(per_col, in_dims=(None, 0, 1))(params, x, U)  # over the N samples


@pytest.mark.parametrize("example", ALL, ids=lambda e: e.name)
def test_per_sample_hooks_match_vmap_of_grad(example):
    module, rule, x, params = _setup(example)
    out, ctx = rule.forward(module, x, params)
    if not _has_hooks(rule) or not params:
        assert example.name not in PER_SAMPLE
        return
    U = torch.randn(K, *out.shape, dtype=DT)
    got = rule.per_sample_param_vjp(module, ctx, U, list(params))
    if got is None:
        assert example.name not in PER_SAMPLE
        assert rule.sq_param_vjp(module, ctx, U, list(params)) is None
        return
    assert rule.rowwise(module, ctx)
    ref = _reference(module, params, x, U)
    sq = rule.sq_param_vjp(module, ctx, U, list(params))
    assert sq is not None and set(got) == set(sq) == set(params)
    for name in params:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
        want = ref[name].square().sum((0, 1))
        torch.testing.assert_close(sq[name], want, rtol=1e-10, atol=1e-12)
    for name in params:  # a subset of the parameters
        one = rule.per_sample_param_vjp(module, ctx, U, [name])
        assert one is not None and set(one) == {name}
        torch.testing.assert_close(one[name], ref[name], rtol=1e-10, atol=1e-12)
        sq1 = rule.sq_param_vjp(module, ctx, U, [name])
        assert sq1 is not None and set(sq1) == {name}
    a = rule.kronecker(module, ctx)
    if a is not None:  # weight u_n a_n^T, bias u_n
        assert a.ndim == 2 and a.shape[0] == x.shape[0]
        outer = U.transpose(0, 1)[..., None] * a[:, None, None, :]
        torch.testing.assert_close(ref["weight"], outer, rtol=1e-10, atol=1e-12)
        if "bias" in params:
            torch.testing.assert_close(ref["bias"], U.transpose(0, 1), rtol=1e-10, atol=1e-12)
    shared = rule.kronecker_shared(module, ctx, U)  # K-FAC: weight sum_t g_t a_t^T, bias sum_t g_t
    if example.name.startswith(("linear", "conv", "c2d")):
        assert shared is not None
    if shared is not None:
        a, g = shared
        assert a.ndim == 3 and g.ndim == 4 and g.shape[1:3] == a.shape[:2]
        w = torch.einsum("knto,ntd->nkod", g, a).reshape(ref["weight"].shape)
        torch.testing.assert_close(w, ref["weight"], rtol=1e-10, atol=1e-12)
        if "bias" in params:
            torch.testing.assert_close(
                g.sum(2).transpose(0, 1), ref["bias"], rtol=1e-10, atol=1e-12
            )
    onehot = rule.kronecker_indices(module, ctx, U)  # K-FAC: weight (num, out) sum_t e_x g_t^T
    if example.name.startswith("embedding"):
        assert onehot is not None and shared is None
    if onehot is not None:
        index, num, g = onehot
        assert set(params) == {"weight"} and index.ndim == 2 and g.shape[1:3] == index.shape
        a = torch.zeros(*index.shape, num + 1, dtype=DT)  # class num: the zero rows (-1)
        a.scatter_(-1, index.where(index >= 0, num).unsqueeze(-1), 1.0)
        w = torch.einsum("ntv,knto->nkvo", a[..., :num], g)
        torch.testing.assert_close(w, ref["weight"], rtol=1e-10, atol=1e-12)


def test_chunked_squares_equal_the_whole(monkeypatch):
    """``sq_param_vjp`` of Linear on (N, T, d) and of Conv in chunks of one sample."""
    import secondorder.curvature.layers.conv as conv
    import secondorder.curvature.layers.linear as linear

    for example in (MORE[0], MORE[2]):
        module, rule, x, params = _setup(example)
        out, ctx = rule.forward(module, x, params)
        U = torch.randn(K, *out.shape, dtype=DT)
        whole = rule.sq_param_vjp(module, ctx, U, list(params))
        with monkeypatch.context() as m:
            m.setattr(linear, "_CHUNK_ELEMENTS", 1)
            m.setattr(conv, "_SQ_ELEMENTS", 1)
            chunked = rule.sq_param_vjp(module, ctx, U, list(params))
        assert whole is not None and chunked is not None
        for name in params:
            torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-14)
