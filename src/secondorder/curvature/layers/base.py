r"""The contract of a layer rule: forward, :math:`Jv` and :math:`J^\top u` of one module.

A rule computes a module's output from its input ``x`` and its own parameters, and keeps in a
context dictionary only what the products need (the input of a linear map, an activation's
derivative, ...). With :math:`y = f(x, \theta)`:

- ``jvp``: :math:`dy = \partial_x f\, dx + \sum_p \partial_{\theta_p} f\, d\theta_p`
  (``dx`` and any ``dparams`` entry may be ``None``: a zero tangent);
- ``vjp``: :math:`dx = (\partial_x f)^\top u` (only if ``need_input``), and
  :math:`g_p \mathrel{+}= (\partial_{\theta_p} f)^\top u` accumulated in place into the buffers
  ``grads[p]`` (only the parameters present in ``grads``).

With ``batched=True`` every tangent, cotangent and buffer carries a leading column dimension
``K``; the context is shared by the columns. Parameters are named as in the module's own
``_parameters`` (``"weight"``, ``"bias"``); a parameter the module lacks is ``None``.

**Second-order (residual) term** for Hessian products (Pearlmutter's R-operator node by node).
With :math:`\delta = \partial L / \partial y` the gradient cotangent at the output (fixed by the
build), the residual is the directional derivative of the pullback with :math:`\delta` held
fixed,

.. math::
    (r_x, r_\theta) = \frac{d}{d\epsilon}\Big[J(x + \epsilon\, dx, \theta + \epsilon\,
    d\theta)^\top \delta\Big]_{\epsilon=0}
    = \nabla^2_{(x,\theta)} \langle \delta, f(x, \theta) \rangle\, (dx, d\theta),

so the reverse pass of :math:`Hv` is :math:`R\{\delta_x\} = J_x^\top R\{\delta_y\} + r_x`,
:math:`R\{g_\theta\} = J_\theta^\top R\{\delta_y\} + r_\theta`. ``prepare_residual`` runs
once per build and keeps what the residual needs (``None``: the residual is zero at this
point, e.g. a piecewise-linear layer); ``residual`` returns :math:`r_x` (if ``need_input``) and
adds :math:`r_\theta` into ``grads`` like ``vjp``. ``modify="clip"|"abs"`` (the PCH) replaces an
elementwise activation's :math:`\delta \odot f''(a)` by :math:`\rho(\delta \odot f''(a))`;
every other rule keeps its exact term. The default (:func:`generic_prepare`,
:func:`generic_residual`) is exact for any rule: the double backward of the single module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Example",
    "Rule",
    "add_bias_tangent",
    "channel_view",
    "generic_prepare",
    "generic_residual",
    "per_sample",
    "sum_to",
    "SECOND_DERIVATIVES",
]

SECOND_DERIVATIVES: ContextVar[bool] = ContextVar("SECOND_DERIVATIVES", default=False)
"""Set while a forward pass is evaluated for second-order products: rules whose residual needs
a second derivative compute it with the first (e.g. one sigmoid for SiLU's f' and f'')."""

Params = Mapping[str, Tensor | None]
Context = dict[str, Any]


class Rule:
    """Base class of layer rules (module docstring); one instance serves every module of a type."""

    #: whether the module's input must be a floating-point tensor (False: indices, Embedding)
    float_input: bool = True

    def unsupported(self, module: nn.Module) -> str | None:
        """Why the rule cannot compute ``module`` exactly (an option it ignores), or None."""
        return None

    # Optional hooks of the per-sample fast paths (exact diagonals, low-rank GGN; see
    # :mod:`secondorder.curvature.engines.factors`). ``u`` holds K output cotangent columns,
    # shape ``(K, N, ...)``; "sample" n is the leading index of the module's input and output.
    def rowwise(self, module: nn.Module, ctx: Context) -> bool:
        """Whether output row ``n`` depends on input row ``n`` only (leading size kept).

        Default ``False``: the step is taken to mix the samples.
        """
        return False

    def kronecker(self, module: nn.Module, ctx: Context) -> Tensor | None:
        r"""Input rows :math:`a` ``(N, d)`` if per-sample cotangents are outer products, or None.

        With them, sample :math:`n`'s weight cotangent is :math:`u_n a_n^\top` (shape
        ``(out, d)``) and its bias cotangent :math:`u_n`, for output cotangent rows ``u_n``.
        """
        return None

    def kronecker_shared(
        self, module: nn.Module, ctx: Context, u: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        r"""Inputs ``a`` ``(N, T, d)`` and cotangents ``g`` ``(K, N, T, out)`` of a shared weight.

        With them sample :math:`n`'s weight cotangent (the weight viewed as ``(out, d)``) is
        :math:`\sum_t g_{knt} a_{nt}^\top` and its bias cotangent :math:`\sum_t g_{knt}` (K-FAC's
        expand/reduce forms). Default: :meth:`kronecker` with ``T = 1``; None if there is none.
        """
        x = self.kronecker(module, ctx)
        return None if x is None else (x.unsqueeze(1), u.unsqueeze(2))

    def kronecker_indices(
        self, module: nn.Module, ctx: Context, u: Tensor
    ) -> tuple[Tensor, int, Tensor] | None:
        r"""One-hot inputs of a shared weight stored transposed, ``(index, num, g)``, or None.

        ``index`` ``(N, T)`` holds each position's class in ``range(num)`` (``-1``: a zero
        input row, e.g. ``padding_idx``), ``g`` ``(K, N, T, out)`` the output cotangents; the
        weight has shape ``(num, out)`` and sample :math:`n`'s weight cotangent is
        :math:`\sum_t e_{x_{nt}} g_{knt}^\top` (an ``nn.Embedding``: a Linear map of the
        one-hot rows without bias, its input factor diagonal). Default: None.
        """
        return None

    def per_sample_param_vjp(
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        r"""Per-sample parameter cotangents :math:`(\partial_{\theta_p} f_n)^\top u_{kn}`.

        Args:
            module: The module.
            ctx: Its context from :meth:`forward`.
            u: Output cotangents ``(K, N, *out)``.
            names: The parameters wanted.

        Returns:
            ``{name: (N, K, *param.shape)}``, or None where the rule has no such formula.
        """
        return None

    def sq_param_vjp(
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        r""":math:`\sum_{k, n} \big((\partial_{\theta_p} f_n)^\top u_{kn}\big)^{\odot 2}` per name.

        Same arguments as :meth:`per_sample_param_vjp` (whose squares it sums by default);
        returns ``{name: param.shape}`` or None.
        """
        rows = self.per_sample_param_vjp(module, ctx, u, names)
        return None if rows is None else {k: v.square().sum((0, 1)) for k, v in rows.items()}

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:
        """Return the output and the context the products need."""
        raise NotImplementedError

    def jvp(
        self,
        module: nn.Module,
        ctx: Context,
        dx: Tensor | None,
        dparams: Params,
        batched: bool,
    ) -> Tensor | None:
        """Return the output tangent (``None`` if every tangent is zero)."""
        raise NotImplementedError

    def vjp(
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        """Accumulate parameter cotangents into ``grads``; return the input cotangent or None."""
        raise NotImplementedError

    def prepare_residual(
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        """What :meth:`residual` needs at the gradient cotangent ``delta`` (None: it is zero).

        Args:
            module: The module.
            ctx: Its forward context.
            x: Its input.
            params: Every parameter value of the module (trainable or not).
            delta: The gradient cotangent at its output (shape of the output).
            modify: ``None``, or the PCH modification ``"clip"``/``"abs"``.

        Returns:
            The residual's context, or None where the residual vanishes.
        """
        return generic_prepare(module, x, params, delta)

    def residual(
        self,
        module: nn.Module,
        ctx: Context,
        rctx: Context,
        dx: Tensor | None,
        dparams: Params,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        r"""Add :math:`r_\theta` into ``grads``; return :math:`r_x` (or None if zero/not needed)."""
        return generic_residual(module, rctx, dx, dparams, need_input, grads, batched)


@dataclass(frozen=True)
class Example:
    """A module and an input shape for the registry-wide contract test."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def add_bias_tangent(out: Tensor | None, bias: Tensor, shape: Any, batched: bool) -> Tensor:
    """``out + bias`` in place, or ``bias`` broadcast to the output (``(K, *shape)`` if batched).

    Args:
        out: The output tangent so far, or None when no other term reached it.
        bias: The bias tangent, viewed to broadcast against the output.
        shape: The output's shape without the K dimension.
        batched: Whether tangents carry a leading K dimension (the bias's first).

    Returns:
        The output tangent.
    """
    if out is not None:
        return out.add_(bias)
    lead = (bias.shape[0],) if batched else ()
    return bias.expand(*lead, *shape).clone()


def channel_view(t: Tensor, ndim: int, dim: int, batched: bool) -> Tensor:
    """View a per-channel tensor (``(C,)`` or ``(K, C)``) to broadcast along ``dim`` of ``ndim``."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(t.shape[0], *shape) if batched else t.view(shape)


def sum_to(t: Tensor, shape: torch.Size | tuple[int, ...], batched: bool) -> Tensor:
    """Sum ``t`` (broadcast result, with a leading column dimension if ``batched``) to ``shape``."""
    lead = 1 if batched else 0
    extra = t.ndim - lead - len(shape)
    if extra > 0:
        t = t.sum(dim=tuple(range(lead, lead + extra)))
    dims = tuple(lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


def per_sample(fn: Callable[[Tensor], Tensor], t: Tensor, batched: bool) -> Tensor:
    """Apply a layer acting on each leading index separately to ``t`` (columns ride along)."""
    if not batched:
        return fn(t)
    return fn(t.flatten(0, 1)).unflatten(0, (t.shape[0], -1))


def generic_prepare(module: nn.Module, x: Tensor, params: Params, delta: Tensor) -> Context | None:
    r"""The graph of :math:`g = \nabla_{(x,\theta)} \langle \delta, f(x, \theta) \rangle`.

    Args:
        module: The module.
        x: Its input.
        params: Every parameter value of the module.
        delta: The gradient cotangent at its output.

    Returns:
        ``{"leaves", "names", "g"}`` for :func:`generic_residual`, or None where :math:`g` does
        not depend on the input and the parameters (a linear module).
    """
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        pl = {n: p.detach().requires_grad_(True) for n, p in params.items() if p is not None}
        # buffers are copies: a module in training mode (BatchNorm) updates its running
        # statistics in place, and a residual must not move them
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        y = torch.func.functional_call(module, {**buffers, **pl}, (xl,))
        leaves = [xl, *pl.values()]
        g = torch.autograd.grad(y, leaves, delta, create_graph=True, allow_unused=True)
    if not any(gi is not None and gi.requires_grad for gi in g):
        return None
    return {"leaves": leaves, "names": list(pl), "g": list(g)}


def generic_residual(
    module: nn.Module,
    rctx: Context,
    dx: Tensor | None,
    dparams: Params,
    need_input: bool,
    grads: Mapping[str, Tensor],
    batched: bool,
) -> Tensor | None:
    r"""The residual by double backward of the single module: :math:`\nabla_{(x,\theta)} g`.

    :math:`g` (:func:`generic_prepare`) is a gradient, so its Jacobian is the symmetric Hessian
    of :math:`\langle \delta, f \rangle` and one backward of :math:`g` against
    :math:`(dx, d\theta)` gives :math:`(r_x, r_\theta)`.

    Args:
        module: The module.
        rctx: The context of :func:`generic_prepare`.
        dx: Input tangent (``None``: zero), ``(K, *x.shape)`` if batched.
        dparams: Parameter tangents by name (missing or ``None``: zero).
        need_input: Whether :math:`r_x` is returned.
        grads: Buffers :math:`r_\theta` is added into (by name).
        batched: Whether tangents and buffers carry a leading column dimension.

    Returns:
        :math:`r_x`, or None.
    """
    leaves, names, g = rctx["leaves"], rctx["names"], rctx["g"]
    tangents = [dx, *(dparams.get(n) for n in names)]
    outs, tans = [], []
    for gi, t in zip(g, tangents):
        if gi is not None and t is not None and gi.requires_grad:
            outs.append(gi)
            tans.append(t)
    slots = ([0] if need_input else []) + [1 + k for k, n in enumerate(names) if n in grads]
    if not outs or not slots:
        return None
    wrt = [leaves[k] for k in slots]
    if not batched:
        got = torch.autograd.grad(outs, wrt, tans, retain_graph=True, allow_unused=True)
    else:
        try:
            got = torch.autograd.grad(
                outs, wrt, tans, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:  # no batching rule for this double backward: one column at a time
            cols = [
                torch.autograd.grad(
                    outs, wrt, [t[k] for t in tans], retain_graph=True, allow_unused=True
                )
                for k in range(tans[0].shape[0])
            ]
            got = tuple(
                None if any(c[i] is None for c in cols) else torch.stack([c[i] for c in cols])  # type: ignore[misc]
                for i in range(len(wrt))
            )
    rx = None
    for k, r in zip(slots, got):
        if r is None:
            continue
        if k == 0:
            rx = r
        else:
            grads[names[k - 1]].add_(r)
    return rx
