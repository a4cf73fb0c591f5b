r"""The standardisation shared by LayerNorm, GroupNorm, RMSNorm and BatchNorm (batch statistics).

With :math:`r` the inverse standard deviation and :math:`\hat x` the standardised input over
some dimensions (:math:`\langle\cdot\rangle` the mean over them), the Jacobian of
:math:`\hat x` is symmetric, :math:`d\hat x = r\,(dx - \langle dx\rangle - \hat x
\langle \hat x\, dx\rangle)` (:func:`normalised_tangent`; RMSNorm drops the means).

The standardisations (LayerNorm, GroupNorm, RMSNorm, BatchNorm by batch statistics) have closed
forms (:func:`standardised_residual`). With :math:`g = \gamma\delta`,
:math:`c = \langle \hat x g\rangle`, :math:`p = g - \langle g\rangle - \hat x c`,
:math:`a = \langle \hat x\, dx\rangle` and :math:`e = dx - \langle dx\rangle - \hat x a`
(so :math:`d\hat x = r e`; RMSNorm drops the means :math:`\langle g\rangle`,
:math:`\langle dx\rangle`), differentiating :math:`J_x^\top g = r p` along :math:`dx` with
:math:`dr = -r^2 a` gives

.. math::
    r_x = -r^2\,\big(a\, p + c\, e + \hat x\, \langle e\, g\rangle\big)
    + J_{\hat x}^\top (d\gamma\, \delta), \qquad
    r_\gamma = \textstyle\sum \delta\, r e, \qquad r_\beta = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "affine_prepare",
    "normalised_tangent",
    "per_channel_cotangents",
    "standardised_prepare",
    "standardised_residual",
    "sum_dims",
]


def normalised_tangent(t: Tensor, xhat: Tensor, r: Tensor, dims: tuple[int, ...]) -> Tensor:
    r"""The derivative of standardisation over ``dims`` applied to ``t`` (forward or reverse).

    :math:`r\,(t - \bar t - \hat x\, \overline{t \hat x})` with means over ``dims``,
    :math:`\hat x` the standardised input and :math:`r` the inverse standard deviation; the
    map is symmetric, so the same expression serves jvp and vjp.
    """
    inner = (t * xhat).mean(dims, keepdim=True)
    return (t - t.mean(dims, keepdim=True)).sub_(xhat * inner).mul_(r)


def standardised_prepare(
    xhat: Tensor, g: Tensor, dims: tuple[int, ...], centre: bool = True
) -> dict[str, Tensor]:
    r"""What :func:`standardised_residual` needs at the scaled cotangent :math:`g = \gamma\delta`.

    Args:
        xhat: The standardised input.
        g: :math:`\gamma \delta` (:math:`\delta` without an affine weight), shape of ``xhat``.
        dims: The dimensions the statistics reduce over.
        centre: Whether the mean is subtracted (False: RMSNorm).

    Returns:
        ``{"g", "c", "p"}``: :math:`g`, :math:`c = \langle\hat x g\rangle`,
        :math:`p = g - \langle g\rangle - \hat x c` (module docstring).
    """
    c = (xhat * g).mean(dims, keepdim=True)
    p = g - xhat * c
    if centre:
        p = p.sub_(g.mean(dims, keepdim=True))
    return {"g": g, "c": c, "p": p}


def affine_prepare(ctx: Mapping[str, Any], delta: Tensor, centre: bool = True) -> dict[str, Tensor]:
    r"""A rule's residual context for :math:`y = \gamma \hat x + \beta` at the cotangent ``delta``.

    Args:
        ctx: The forward context: ``xhat``, ``r``, ``dims`` and ``w`` (:math:`\gamma` viewed
            for broadcasting, or None).
        delta: The output cotangent :math:`\delta`.
        centre: Whether the mean is subtracted (False: RMSNorm).

    Returns:
        :func:`standardised_prepare`'s output with ``delta`` and ``dr`` (:math:`\delta r`).
    """
    w = ctx["w"]
    g = delta * w if w is not None else delta
    rctx = standardised_prepare(ctx["xhat"], g, ctx["dims"], centre)
    return {**rctx, "delta": delta, "dr": delta * ctx["r"]}


def standardised_residual(
    dx: Tensor,
    xhat: Tensor,
    r: Tensor,
    dims: tuple[int, ...],
    rctx: Mapping[str, Tensor],
    centre: bool = True,
    need_input: bool = True,
) -> tuple[Tensor | None, Tensor]:
    r"""The input residual of :math:`\langle g, \hat x(x)\rangle` along ``dx``, and :math:`e`.

    :math:`r_x = -r^2 (a p + c e + \hat x \langle e g\rangle)` with
    :math:`a = \langle\hat x\, dx\rangle`, :math:`e = dx - \langle dx\rangle - \hat x a`
    (module docstring); :math:`r e` is :math:`d\hat x`, which the weight's residual needs.

    Args:
        dx: The input tangent (``(K, *x.shape)`` with ``dims`` counted accordingly).
        xhat: The standardised input.
        r: The inverse standard deviation (reduced dimensions kept).
        dims: The dimensions the statistics reduce over, in ``dx``'s numbering.
        rctx: :func:`standardised_prepare`'s output.
        centre: Whether the mean is subtracted (False: RMSNorm).
        need_input: Whether :math:`r_x` is computed (False: ``None``).

    Returns:
        ``(r_x, e)``.
    """
    a = (xhat * dx).mean(dims, keepdim=True)
    e = dx - xhat * a
    if centre:
        e = e.sub_(dx.mean(dims, keepdim=True))
    if not need_input:
        return None, e
    q = (e * rctx["g"]).mean(dims, keepdim=True)
    rx = (a * rctx["p"]).add_(e * rctx["c"]).add_(xhat * q).mul_(r.square().neg_())
    return rx, e


def per_channel_cotangents(xhat: Tensor, u: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample cotangents ``(N, K, C)`` of a per-channel affine map on ``(N, C, *S)``."""
    spatial = tuple(range(3, u.ndim))
    out = {}
    if "weight" in names:
        out["weight"] = sum_dims(u * xhat, spatial).transpose(0, 1)
    if "bias" in names:
        out["bias"] = sum_dims(u, spatial).transpose(0, 1)
    return out


def sum_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``dims`` (none: ``t`` itself, where ``Tensor.sum(())`` sums all)."""
    return t.sum(dims) if dims else t
