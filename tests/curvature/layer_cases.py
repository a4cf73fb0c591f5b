"""Cases and dense float64 references of the layer matrix (:mod:`test_layer_correctness`).

Activation cases are generated from the table (:data:`ACTIVATIONS`) with default arguments,
non-default ones and ``inplace=True``; BatchNorm (eval) cases put it first, above frozen layers,
in the middle and in a small CNN; refused cases are layers the hand-written engines must not
serve (subclasses with their own forward, instance-level forwards, unread attributes). The
references run an out-of-place copy of the model: :math:`J` by ``jacrev`` of the output, the
output Hessian and the full Hessian by ``jacrev(grad)`` (never ``torch.func.hessian``), the PCH
blocks by a dense Hessian backpropagation.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.nn import functional as F

from secondorder.curvature.activations import ACTIVATIONS

DT = torch.float64
RTOL = 1e-10
N, D_IN, WIDTH, C = 5, 3, 4, 3

# non-default values of every activation argument (inplace aside); the ranges of the inputs
# (about N(0, 2)) cross every threshold, bound and kink these values put
NONDEFAULT: dict[str, Any] = {
    "negative_slope": 0.3,
    "alpha": 0.6,
    "beta": 2.0,
    "threshold": 0.4,
    "approximate": "tanh",
    "min_val": -0.5,
    "max_val": 0.7,
    "value": -0.2,
    "lambd": 0.3,
}
# deprecated aliases (nn.Hardtanh's min_value, max_value)
DEPRECATED = {"min_value", "max_value"}
# arguments without a default (nn.Threshold): the documentation's example
REQUIRED: dict[str, Any] = {"threshold": 0.1, "value": 20.0}


def activation_arguments(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    skip = {"self", "inplace", *DEPRECATED}
    return {k: p for k, p in params.items() if k not in skip and p.kind not in variadic}


def _variants(cls: type) -> list[tuple[str, dict[str, Any]]]:
    """``(name, kwargs)``: default arguments, non-default ones, and in place where it exists."""
    args = activation_arguments(cls)
    required = {k: REQUIRED.get(k) for k, p in args.items() if p.default is inspect.Parameter.empty}
    out = [("default", required)]
    nondefault = {k: NONDEFAULT[k] for k in args if k in NONDEFAULT}
    if args:
        out.append(("args", nondefault))
    if "inplace" in inspect.signature(cls.__init__).parameters:
        out.append(("inplace", {**nondefault, "inplace": True}))
    return out


ACT_CASES = [(cls, kind, kwargs) for cls in ACTIVATIONS for kind, kwargs in _variants(cls)]
ACT_IDS = [f"{cls.__name__}-{kind}" for cls, kind, _ in ACT_CASES]


# ------------------------------------------------------------------------------ models
def _eval_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _freeze(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    mlp: bool  # Linear, activation, Linear, activation, Linear: hand-written everywhere
    sequential: bool = True  # served by the hand-written Sequential engine
    kron: bool = False  # served by the Kronecker paths (selected parameters in Linear layers)


def activation_case(cls: type, kwargs: dict[str, Any]) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH),
        cls(**kwargs),
        nn.Linear(WIDTH, WIDTH),
        cls(**kwargs),
        nn.Linear(WIDTH, C),
    ).to(DT)
    with torch.no_grad():  # pre-activations of about N(0, 2): every region of every activation
        for layer in (model[0], model[2]):
            layer.weight.mul_(2.5)
    return Case(model, torch.randn(N, D_IN, dtype=DT), True)


def _bn_first() -> Case:
    model = nn.Sequential(nn.BatchNorm1d(D_IN), nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(4, C))
    return Case(model, torch.randn(N, D_IN), False)


def _bn_first_only_trainable() -> Case:
    case = _bn_first()
    _freeze(case.model[1], case.model[3])
    return case


def _bn_above_frozen() -> Case:
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh(), nn.Linear(WIDTH, C)
    )
    _freeze(model[0])
    return Case(model, torch.randn(N, D_IN), False)


def _bn_middle() -> Case:
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH),
        nn.BatchNorm1d(WIDTH),
        nn.SiLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.BatchNorm1d(WIDTH, affine=False),
        nn.Linear(WIDTH, C),
    )
    return Case(model, torch.randn(N, D_IN), False)


def _bn_frozen_between_linears() -> Case:  # the Kronecker paths run it by autograd
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.BatchNorm1d(WIDTH), nn.ELU(inplace=True), nn.Linear(WIDTH, C)
    )
    _freeze(model[1])
    return Case(model, torch.randn(N, D_IN), False, kron=True)


def _bn1d_sequence_first() -> Case:  # BatchNorm1d on (N, C, L)
    model = nn.Sequential(
        nn.BatchNorm1d(2), nn.Conv1d(2, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, C)
    )
    return Case(model, torch.randn(N, 2, 3), False)


def _cnn_bn2d() -> Case:
    model = nn.Sequential(
        nn.BatchNorm2d(1),
        nn.Conv2d(1, 2, 2),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, C),
    )
    return Case(model, torch.randn(N, 1, 5, 5), False)


def _cnn_bn2d_above_frozen() -> Case:
    case = _cnn_bn2d()
    _freeze(case.model[0], case.model[1])
    return case


BN_CASES: dict[str, Callable[[], Case]] = {
    "bn_first": _bn_first,
    "bn_first_only_trainable": _bn_first_only_trainable,
    "bn_above_frozen": _bn_above_frozen,
    "bn_middle": _bn_middle,
    "bn_frozen_between_linears": _bn_frozen_between_linears,
    "bn1d_sequence_first": _bn1d_sequence_first,
    "cnn_bn2d": _cnn_bn2d,
    "cnn_bn2d_above_frozen": _cnn_bn2d_above_frozen,
}


def bn_case(name: str) -> Case:
    torch.manual_seed(0)
    case = BN_CASES[name]()
    case.model = _eval_bn(case.model.to(DT))
    case.x = 2 * case.x.to(DT)
    return case


# ------------------------------------------------------------------------- references
class _Hardsigmoid(nn.Module):
    """``relu6(a + 3) / 6``: torch has no double backward of its hardsigmoid kernel."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(a + 3, 0.0, 6.0) / 6


def _out_of_place(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
        for name, child in m.named_children():
            if type(child) is nn.Hardsigmoid:
                setattr(m, name, _Hardsigmoid())
    return ref


def _rho(r: torch.Tensor, curvature: str) -> torch.Tensor:
    return {
        "ggn": torch.zeros_like(r),
        "hessian": r,
        "pch_clip": r.clamp_min(0),
        "pch_abs": r.abs(),
    }[curvature]


def _mlp_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, curvature: str):
    r"""Dense diagonal blocks of Linear, act, Linear, act, Linear by Hessian backpropagation.

    :math:`H_{a} = D H_{h} D + \operatorname{diag}(\rho(\delta \odot \sigma''(a)))` at each
    activation, :math:`H_{h} = J^\top H_{a'} J` at each Linear (all by ``jacrev``), blocks
    :math:`J_\theta^\top H_{a} J_\theta`.
    """
    lin = [model[0], model[2], model[4]]
    acts = [model[1], model[3]]
    loss_fn = nn.CrossEntropyLoss()
    # forward: inputs of the Linear layers and pre-activations
    h, inputs, pre = x, [], []
    for j in range(3):
        inputs.append(h)
        a = F.linear(h, lin[j].weight.detach(), lin[j].bias.detach())
        if j < 2:
            pre.append(a)
            h = acts[j](a)
        else:
            z = a
    H = jacrev(grad(lambda zz: loss_fn(zz.view(z.shape), y)))(z.reshape(-1))
    blocks: list[torch.Tensor] = []
    for j in (2, 1, 0):
        w, b = lin[j].weight.detach(), lin[j].bias.detach()
        hin = inputs[j]
        Jw = jacrev(lambda ww, hin=hin, b=b: F.linear(hin, ww, b))(w).reshape(-1, w.numel())
        Jb = jacrev(lambda bb, hin=hin, w=w: F.linear(hin, w, bb))(b).reshape(-1, b.numel())
        blocks[:0] = [Jw.T @ H @ Jw, Jb.T @ H @ Jb]
        if j == 0:
            break
        Jh = jacrev(lambda hh, w=w: F.linear(hh, w))(hin).reshape(H.shape[0], -1)
        H = Jh.T @ H @ Jh  # Hessian with respect to the activation's output
        act, a = acts[j - 1], pre[j - 1]

        def loss_of_h(hh, j=j):
            out = hh
            for k in range(j, 3):
                out = F.linear(out, lin[k].weight.detach(), lin[k].bias.detach())
                if k < 2:
                    out = acts[k](out)
            return loss_fn(out, y)

        delta = grad(loss_of_h)(act(a)).reshape(-1)
        d1 = grad(lambda aa, act=act: act(aa).sum())(a).reshape(-1)
        d2 = jacrev(grad(lambda aa, act=act: act(aa).sum()))(a).reshape(d1.numel(), -1).diagonal()
        H = d1[:, None] * H * d1[None, :] + torch.diag(_rho(delta * d2, curvature))
    return blocks


def _block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


def blocks_of(M: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for n in sizes:
        out.append(M[start : start + n, start : start + n])
        start += n
    return out


@functools.cache
def reference(key: tuple) -> dict[str, Any]:
    case = make_case(key)
    model = _out_of_place(case.model)
    x = case.x
    y = torch.arange(N) % C
    loss_fn = nn.CrossEntropyLoss()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    values = [p.detach() for _, p in model.named_parameters() if p.requires_grad]
    sizes, shapes = [v.numel() for v in values], [v.shape for v in values]
    theta = torch.cat([v.reshape(-1) for v in values])

    def f(th):
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), (x,))

    z = f(theta)
    J = jacrev(f)(theta).reshape(z.numel(), -1)
    Hz = jacrev(grad(lambda zz: loss_fn(zz.view(z.shape), y)))(z.reshape(-1))
    G = J.T @ Hz @ J
    H = jacrev(grad(lambda th: loss_fn(f(th), y)))(theta)
    per_sample = jacrev(lambda th: F.cross_entropy(f(th), y, reduction="none"))(theta)
    ref = {
        "ggn": G,
        "hessian": H,
        "ef": per_sample.T @ per_sample / N,
        "gradient": grad(lambda th: loss_fn(f(th), y))(theta),
        "loss": loss_fn(z, y),
        "sizes": sizes,
        "y": y,
        "block_ggn": _block_diagonal(blocks_of(G, sizes)),
        "block_hessian": _block_diagonal(blocks_of(H, sizes)),
    }
    if case.mlp:
        for curvature in ("ggn", "hessian", "pch_clip", "pch_abs"):
            ref[f"bp_{curvature}"] = _block_diagonal(_mlp_blocks(model, x, y, curvature))
    return ref


def make_case(key: tuple) -> Case:
    if key[0] == "act":
        _, cls, kwargs = key
        return activation_case(cls, dict(kwargs))
    if key[0] == "refused":
        return refused_case(key[1])
    return bn_case(key[1])


# ------------------------------------------------- layers the hand-written engines refuse
class _SquaredTanh(nn.Tanh):
    """A subclass of a table activation with its own forward."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a) ** 2


class _ScaledBatchNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x) ** 3


class _SquaredFlatten(nn.Flatten):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) ** 2


def _instance_forward() -> nn.Module:
    act = nn.Softplus()
    act.forward = lambda a: F.softplus(a) ** 2  # type: ignore[method-assign]
    return act


def _unread_attribute() -> nn.Module:
    act = nn.ELU()
    act.scale = 3.0  # an argument a later torch could add: refused, not ignored
    return act


REFUSED: dict[str, Callable[[], nn.Module]] = {
    "activation_subclass": _SquaredTanh,
    "batchnorm_subclass": lambda: _ScaledBatchNorm(WIDTH),
    "flatten_subclass": _SquaredFlatten,
    "instance_forward": _instance_forward,
    "unread_attribute": _unread_attribute,
}


def refused_case(name: str) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, WIDTH), REFUSED[name](), nn.Linear(WIDTH, C))
    return Case(_eval_bn(model.to(DT)), torch.randn(N, D_IN, dtype=DT), False, False)
