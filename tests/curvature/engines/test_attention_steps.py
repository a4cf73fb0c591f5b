r"""The steps of matrix products, splits and attention against ``torch.func`` in float64.

Each case builds the step the graph engine builds for one node (``ops.BUILDERS``) with some
operands active, and checks its value, :math:`Jv`, :math:`J^\top u` (single and K batched
columns) and its residual (second-order term) against ``torch.func.jvp``, ``torch.func.vjp``
and ``torch.func.jvp`` of the pullback of the same torch function of the active operands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from secondorder.curvature.attention import differentiable_attention
from secondorder.curvature.engines import mha, sdpa
from secondorder.curvature.engines.ops import BUILDERS, op_kind

DT = torch.float64
K = 3
TOL = {"rtol": 1e-10, "atol": 1e-11}


class _N:
    """A stand-in for an fx node argument."""

    op = "placeholder"

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


@dataclass
class _Node:
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    op: str = "call_function"


@dataclass
class Case:
    """A node calling ``target(*args, **kwargs)``; ``values`` of its tensor args, some active."""

    name: str
    target: Any
    args: tuple[Any, ...]
    values: dict[str, torch.Tensor]
    active: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    method: bool = False


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT)


def _cases() -> list[Case]:
    torch.manual_seed(0)
    a, b = _N("a"), _N("b")
    q, k, v, m = _N("q"), _N("k"), _N("v"), _N("m")
    s = _N("s")
    out: list[Case] = []
    # --- matrix products
    for name, sa, sb in (
        ("2d", (3, 4), (4, 5)),
        ("3d_2d", (2, 3, 4), (4, 5)),
        ("2d_3d", (3, 4), (2, 4, 5)),
        ("broadcast", (2, 1, 3, 4), (3, 4, 2)),
        ("vec_mat", (4,), (4, 5)),
        ("mat_vec", (3, 4), (4,)),
    ):
        vals = {"a": _r(*sa), "b": _r(*sb)}
        for act in (("a", "b"), ("a",), ("b",)):
            out.append(Case(f"matmul_{name}_{''.join(act)}", torch.matmul, (a, b), vals, act))
    vals = {"a": _r(2, 3, 4), "b": _r(2, 4, 5)}
    out.append(Case("bmm", torch.bmm, (a, b), vals, ("a", "b")))
    out.append(Case("method_matmul", "matmul", (a, b), vals, ("a", "b"), method=True))
    out.append(
        Case("einsum", torch.einsum, ("nij,njk->nik", a, b), vals, ("a", "b")),
    )
    out.append(Case("einsum_b", torch.einsum, ("bij,bkj->bik", a, a), {"a": _r(2, 3, 4)}, ("a",)))
    vals = {"s": _r(2, 3, 5), "a": _r(2, 3, 4), "b": _r(2, 4, 5)}
    out.append(
        Case(
            "baddbmm",
            torch.baddbmm,
            (s, a, b),
            vals,
            ("s", "a", "b"),
            {"alpha": 0.7, "beta": -1.3},
        )
    )
    vals = {"s": _r(5), "a": _r(3, 4), "b": _r(4, 5)}
    out.append(Case("addmm", torch.addmm, (s, a, b), vals, ("a", "b")))
    # --- F.linear
    x, w, bias = _N("x"), _N("w"), _N("bias")
    vals = {"x": _r(2, 3, 4), "w": _r(5, 4), "bias": _r(5)}
    for act in (("x", "w", "bias"), ("x",), ("w",), ("w", "bias"), ("x", "bias")):
        out.append(Case(f"linear_{''.join(act)}", F.linear, (x, w, bias), vals, act))
    # --- attention
    base = {"q": _r(2, 2, 3, 4), "k": _r(2, 2, 5, 4), "v": _r(2, 2, 5, 3)}
    for act in (("q", "k", "v"), ("q",), ("k",), ("v",), ("k", "v")):
        out.append(
            Case(f"sdpa_{''.join(act)}", F.scaled_dot_product_attention, (q, k, v), base, act)
        )
    sq = {"q": _r(2, 2, 4, 4), "k": _r(2, 2, 4, 4), "v": _r(2, 2, 4, 3)}
    out.append(
        Case(
            "sdpa_causal_scale",
            F.scaled_dot_product_attention,
            (q, k, v),
            sq,
            ("q", "k", "v"),
            {"is_causal": True, "scale": 0.3},
        )
    )
    keep = torch.rand(2, 1, 3, 5) > 0.4
    keep[0, 0, 1] = False  # a row with every key masked: P = 0
    keep[..., 0] |= torch.arange(3).view(3) != 1
    out.append(
        Case(
            "sdpa_bool_mask",
            F.scaled_dot_product_attention,
            (q, k, v, m),
            {**base, "m": keep},
            ("q", "k", "v"),
        )
    )
    out.append(
        Case(
            "sdpa_float_mask_active",
            F.scaled_dot_product_attention,
            (q, k, v, m),
            {**base, "m": _r(3, 5)},
            ("q", "k", "v", "m"),
        )
    )
    out.append(
        Case(
            "sdpa_float_mask_only",
            F.scaled_dot_product_attention,
            (q, k, v),
            {**base, "m": _r(2, 2, 3, 5)},
            ("m",),
            {"attn_mask": m},
        )
    )
    gqa = {"q": _r(2, 4, 3, 4), "k": _r(2, 2, 5, 4), "v": _r(2, 2, 5, 3)}
    out.append(
        Case(
            "sdpa_gqa",
            F.scaled_dot_product_attention,
            (q, k, v),
            gqa,
            ("q", "k", "v"),
            {"enable_gqa": True},
        )
    )
    out.append(
        Case(
            "sdpa_3d",
            F.scaled_dot_product_attention,
            (q, k, v),
            {n: t[0] for n, t in base.items()},
            ("q", "k", "v"),
        )
    )
    # --- the attention of nn.MultiheadAttention's decomposition
    mha_fn = mha.multi_head_attention
    pm, am = _N("pm"), _N("am")
    e = {"q": _r(2, 3, 4), "k": _r(2, 5, 4), "v": _r(2, 5, 4)}
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    for bf, weights, avg in ((True, False, True), (False, True, True), (True, True, False)):
        out.append(
            Case(
                f"mha_bf{bf:d}_w{weights:d}_avg{avg:d}",
                mha_fn,
                (q, k, v, None, pm, 2, bf, 0.0, False, weights, avg),
                {
                    **(e if bf else {n: t.transpose(0, 1) for n, t in e.items()}),
                    "pm": pad if bf else torch.zeros(2, 5, dtype=DT).masked_fill(pad, -1e4),
                },
                ("q", "k", "v"),
            )
        )
    am3 = torch.randn(2 * 2, 3, 5, dtype=DT)
    out.append(
        Case(
            "mha_3d_mask",
            mha_fn,
            (q, k, v, am, None, 2, True, 0.0, False, False, True),
            {**e, "am": am3},
            ("q", "k", "v"),
        )
    )
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    sq = {"q": _r(2, 4, 4), "k": _r(2, 4, 4), "v": _r(2, 4, 4), "am": causal}
    out.append(
        Case(
            "mha_causal",
            mha_fn,
            (q, k, v, am, None, 2, True, 0.0, True, False, True),
            sq,
            ("q", "v"),
        )
    )
    un = {"q": _r(3, 4), "k": _r(5, 4), "v": _r(5, 4)}
    out.append(
        Case(
            "mha_unbatched",
            mha_fn,
            (q, k, v, None, None, 2, False, 0.0, False, True, True),
            un,
            ("q", "k", "v"),
        )
    )
    # --- splits
    t = _N("t")
    out.append(Case("chunk", "chunk", (t, 3), {"t": _r(2, 6)}, ("t",), {"dim": -1}, method=True))
    out.append(Case("split", torch.split, (t, [1, 3], 1), {"t": _r(2, 4, 3)}, ("t",)))
    out.append(Case("unbind", torch.unbind, (t, 0), {"t": _r(3, 2)}, ("t",)))
    return out


CASES = _cases()


def _fill(case: Case, ops: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def val(a: Any) -> Any:
        if isinstance(a, _N):
            return ops.get(a.name, case.values.get(a.name))
        return a

    return tuple(val(a) for a in case.args), {k: val(v) for k, v in case.kwargs.items()}


def _function(case: Case, order: list[str]) -> Callable[..., Any]:
    """The node's torch function of the operands ``order`` (tuples of tensors, Nones dropped)."""

    def f(*act: torch.Tensor) -> Any:
        args, kwargs = _fill(case, dict(zip(order, act)))
        with differentiable_attention():
            if case.method:
                y = getattr(args[0], case.target)(*args[1:], **kwargs)
            else:
                y = case.target(*args, **kwargs)
        if isinstance(y, (tuple, list)):
            kept = tuple(t for t in y if t is not None)
            return kept if len(kept) > 1 else kept[0]
        return y

    return f


def _build(case: Case) -> tuple[Any, Any]:
    node = _Node(
        case.target, case.args, case.kwargs, "call_method" if case.method else "call_function"
    )

    def is_active(a: Any) -> bool:
        return isinstance(a, _N) and a.name in case.active

    def env_value(a: Any) -> Any:
        return case.values[a.name] if isinstance(a, _N) else a

    kind = op_kind(node, is_active)
    assert kind in BUILDERS, kind
    args, kwargs = _fill(case, {})

    def call() -> Any:
        f = getattr(args[0], case.target) if case.method else case.target
        return f(*args[1:], **kwargs) if case.method else f(*args, **kwargs)

    with differentiable_attention():
        built = BUILDERS[kind](node, env_value, is_active, call)
    assert built is not None
    return built


def _flat(y: Any) -> tuple[Any, ...]:
    if isinstance(y, (tuple, list)):
        return tuple(t for t in y if t is not None)
    return (y,)


def _like(template: Any, flat: Any, lead: tuple[int, ...] = ()) -> Any:
    """Put tensors of ``flat`` into the step's output structure (Nones kept)."""
    if isinstance(template, (tuple, list)):
        it = iter(flat)
        return tuple(None if t is None else next(it) for t in template)
    return flat[0]


def _randn_out(value: Any, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(*lead, *t.shape, dtype=DT) for t in _flat(value))


def _close(got: Any, want: torch.Tensor) -> None:
    if got is None:
        got = torch.zeros_like(want)
    torch.testing.assert_close(got, want, **TOL)


def _setup(case: Case) -> tuple[Any, Any, Any, list[str], list[str], tuple[torch.Tensor, ...]]:
    """Step, value, function, edge names, unique names and their primals."""
    step, value = _build(case)
    names = [n.name for n in step.inputs]
    uniq = list(dict.fromkeys(names))
    assert set(uniq) == set(case.active)
    return step, value, _function(case, uniq), names, uniq, tuple(case.values[n] for n in uniq)


def _edges(names: list[str], uniq: list[str], tans: Any) -> list[Any]:
    by = dict(zip(uniq, tans))
    return [by[n] for n in names]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_value_jvp_vjp(case: Case) -> None:
    step, value, f, names, uniq, primals = _setup(case)
    for got, want in zip(_flat(value), _flat(f(*primals))):
        _close(got, want)
    # J v
    tans = tuple(torch.randn_like(p) for p in primals)
    _, want = torch.func.jvp(f, primals, tans)
    got = step.jvp(_edges(names, uniq, tans), [], False)
    for g, w in zip(_flat(got), _flat(want)):
        _close(g, w)
    batch = [torch.randn(K, *p.shape, dtype=DT) for p in primals]
    got_b = step.jvp(_edges(names, uniq, batch), [], True)
    for c in range(K):
        _, want_c = torch.func.jvp(f, primals, tuple(t[c] for t in batch))
        for g, w in zip(_flat(got_b), _flat(want_c)):
            _close(g[c], w)
    # J^T u
    u = _randn_out(value)
    want_v = torch.func.vjp(f, *primals)[1](u if len(u) > 1 else u[0])
    got_v = step.vjp(_like(value, u), [True] * len(names), {}, False)
    _accumulate_and_check(names, uniq, got_v, want_v)
    ub = _randn_out(value, (K,))
    got_vb = step.vjp(_like(value, ub), [True] * len(names), {}, True)
    for c in range(K):
        uc = tuple(t[c] for t in ub)
        want_c = torch.func.vjp(f, *primals)[1](uc if len(uc) > 1 else uc[0])
        cols = [None if g is None else _index(g, c) for g in got_vb]
        _accumulate_and_check(names, uniq, cols, want_c)


def _index(g: Any, c: int) -> Any:
    return tuple(None if t is None else t[c] for t in g) if isinstance(g, tuple) else g[c]


def _accumulate_and_check(
    names: list[str], uniq: list[str], got: list[Any], want: tuple[Any, ...]
) -> None:
    """Cotangents per input edge (an operand used twice gets the sum) against ``want``."""
    total: dict[str, Any] = {}
    for n, g in zip(names, got):
        if g is not None:
            total[n] = g if n not in total else total[n] + g
    for n, w in zip(uniq, want):
        _close(total.get(n), w)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_residual_matches_jvp_of_vjp(case: Case) -> None:
    step, value, f, names, uniq, primals = _setup(case)
    delta = _randn_out(value)
    d = delta if len(delta) > 1 else delta[0]

    def pullback(*ps: torch.Tensor) -> Any:
        return torch.func.vjp(f, *ps)[1](d)

    rctx = step.prepare_residual(_like(value, delta), None)
    for batched in (False, True):
        lead = (K,) if batched else ()
        tans = [torch.randn(*lead, *p.shape, dtype=DT) for p in primals]
        edges = _edges(names, uniq, tans)
        got = (
            [None] * len(names)
            if rctx is None
            else step.residual(rctx, edges, [], [True] * len(names), {}, batched)
        )
        jv = step.jvp(edges, [], batched)  # as the Hessian product: after the residual
        for c in range(K if batched else 1):
            tc = tuple(t[c] if batched else t for t in tans)
            _, want = torch.func.jvp(pullback, primals, tc)
            gc = [None if g is None else (g[c] if batched else g) for g in got]
            _accumulate_and_check(names, uniq, gc, want)
            _, want_jv = torch.func.jvp(f, primals, tc)
            for g, w in zip(_flat(jv), _flat(want_jv)):
                _close(g[c] if batched else g, w)
    if step.linear:
        assert rctx is None


def test_a_broken_attention_residual_fails() -> None:
    """The residual test catches a residual that drops the softmax curvature term."""
    case = next(c for c in CASES if c.name == "sdpa_qkv")
    test_residual_matches_jvp_of_vjp(case)
    original = sdpa.AttentionStep.prepare_residual

    def broken(self: Any, delta: Any, modify: Any) -> Any:
        r = original(self, delta, modify)
        return None if r is None else {**r, "a": torch.zeros_like(r["a"])}

    sdpa.AttentionStep.prepare_residual = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(AssertionError):
            test_residual_matches_jvp_of_vjp(case)
    finally:
        sdpa.AttentionStep.prepare_residual = original  # type: ignore[method-assign]


def test_dropout_is_left_to_autograd() -> None:
    """Attention with dropout is random: no closed-form step (the node goes to autograd)."""
    q = _N("q")
    vals = {"q": _r(1, 2, 3, 4)}

    def env_value(a: Any) -> Any:
        return vals[a.name] if isinstance(a, _N) else a

    node = _Node(F.scaled_dot_product_attention, (q, q, q), {"dropout_p": 0.2})
    assert BUILDERS["attention"](node, env_value, lambda a: isinstance(a, _N), None) is None
    node = _Node(mha.multi_head_attention, (q, q, q, None, None, 2, True, 0.1, False, False, True))
    vals = {"q": _r(2, 3, 4)}
    assert BUILDERS["attention"](node, env_value, lambda a: isinstance(a, _N), None) is None
