r"""Fast path: a vocabulary head and the cross-entropy applied together, in chunks of rows.

Taken where :class:`~.sequence_loss.SequenceCrossEntropyLoss` is given a ``chunk_size``
(opt-in: it trades time for memory). For a model whose last step is an ``nn.Linear`` head
:math:`z = h W^\top + b` (``W`` tied to an input embedding or not) and that loss with
class-index targets, the reference path keeps the probabilities of all :math:`R = N T`
rows of :math:`V` logits and each GGN product builds the tangent :math:`J v` and its image
under the output Hessian, ``(R, V)`` tensors each. Here the head step is
split off the linearisation (which then ends at :math:`h`), and for each chunk of rows
:math:`c`

.. math::
    p_c = \operatorname{softmax}(h_c W^\top + b), \quad
    dz_c = dh_c W^\top + h_c\, dW^\top + db, \quad
    u_c = s\, t_c \odot \big(p_c \odot dz_c - p_c (p_c^\top dz_c)\big),

    \bar h_c = u_c W, \qquad \bar W \mathrel{+}= u_c^\top h_c, \qquad
    \bar b \mathrel{+}= \textstyle\sum_c u_c,

(:math:`t_c` 1 for kept and 0 for ignored tokens, :math:`s` the reduction's scale), then the
body's reverse pass runs from :math:`\bar h`; the gradient is the same with
:math:`u_c = s\,(t_c p_c - y_c)`. The logits are recomputed per chunk from :math:`h` and
the stored row log-normalisers, so no tensor of ``R V`` entries is kept or built:
at most ``chunk_size`` rows of ``V`` (``K`` columns) at a time; the price is one more head
matrix product (the logits) per chunk and product. The head's own layer rule
computes :math:`dz_c` and the cotangents, so the products are the reference's
(:class:`~.losses.LossTerms` on the full logits) up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .engines.graph import GraphLinearization
from .engines.steps import RuleStep
from .layers.linear import LinearRule
from .losses import check_targets
from .sequence_loss import SequenceCrossEntropyLoss
from .weighting import torch_loss_class

__all__ = ["FusedHead", "fused_head"]


def fused_head(lin: Any, loss_fn: Any, targets: Any) -> FusedHead | None:
    """Split the head off ``lin`` and return the fused head, or None where it does not apply.

    It applies to a :class:`~.engines.graph.GraphLinearization` whose last step is an
    ``nn.Linear`` on class-last outputs, with :class:`~.sequence_loss.SequenceCrossEntropyLoss`
    (its own ``forward``, a ``chunk_size``, no class weights, reduction ``"mean"`` or ``"sum"``)
    and class-index targets. ``lin`` is changed (it ends at the head's input) only where it applies.

    Args:
        lin: One batch's linearisation.
        loss_fn: The loss.
        targets: The batch's targets.

    Returns:
        The :class:`FusedHead`, or None.

    Raises:
        ValueError: For targets the loss refuses (:func:`~.losses.check_targets`).
    """
    if torch_loss_class(loss_fn) is not SequenceCrossEntropyLoss or loss_fn.chunk_size is None:
        return None
    if loss_fn.weight is not None or loss_fn.reduction not in ("mean", "sum"):
        return None
    if not isinstance(lin, GraphLinearization) or not isinstance(targets, torch.Tensor):
        return None
    check_targets(loss_fn, lin.z, targets)
    if targets.dtype.is_floating_point or lin.z.ndim < 2:
        return None
    last = lin.steps[-1][1] if lin.steps else None
    if not (isinstance(last, RuleStep) and isinstance(last.rule, LinearRule)):
        return None
    step = lin.split_output_step()
    if step is None:
        return None
    assert isinstance(step, RuleStep)
    return FusedHead(lin, step, loss_fn, targets)


class FusedHead:
    """The head ``step`` and the cross-entropy of one batch, applied in chunks (module doc).

    Args:
        body: The linearisation without the head (it ends at the head's input).
        step: The head's step (``nn.Linear``).
        loss_fn: The :class:`~.sequence_loss.SequenceCrossEntropyLoss`.
        targets: Class indices ``(N, *d)``.
    """

    is_psd = True
    has_likelihood = True

    def __init__(
        self, body: GraphLinearization, step: RuleStep, loss_fn: Any, targets: Tensor
    ) -> None:
        self.body, self.step = body, step
        h: Tensor = step.ctx["x"]
        self.h = h.reshape(-1, h.shape[-1])  # (R, d)
        self.lead = tuple(h.shape[:-1])
        W: Tensor = step.ctx["w"]
        self.V = W.shape[0]
        if "bias" in step.params:
            self.b: Tensor | None = body.leaves[step.params["bias"]].detach()
        else:
            bias = getattr(step.module, "bias", None)
            self.b = bias.detach() if isinstance(bias, Tensor) else None
        y = targets.reshape(-1).long().to(h.device)
        keep = y != loss_fn.ignore_index
        self.y = torch.where(keep, y, 0)
        self.keep = keep.to(h.dtype)  # (R,)
        count = float(self.keep.sum())
        self.scale = 1.0 / max(count, 1.0) if loss_fn.reduction == "mean" else 1.0
        self.eps = float(loss_fn.label_smoothing)
        self.chunk_size: int = loss_fn.chunk_size
        R = self.h.shape[0]
        self.lse = h.new_empty(R)  # log-normaliser of every row
        total = h.new_zeros(())
        for a, b in self._chunks():
            z = self._logits(a, b)
            lse = torch.logsumexp(z, -1)
            self.lse[a:b] = lse
            zy = z.gather(-1, self.y[a:b, None]).squeeze(-1)
            row = lse - (1 - self.eps) * zy - self.eps * z.mean(-1)
            total += (row * self.keep[a:b]).sum()
        self.value = total * self.scale

    # ------------------------------------------------------------------ pieces
    def _chunks(self) -> list[tuple[int, int]]:
        R, step = self.h.shape[0], self.chunk_size
        return [(a, min(a + step, R)) for a in range(0, R, step)]

    def _logits(self, a: int, b: int) -> Tensor:
        return F.linear(self.h[a:b], self.step.ctx["w"], self.b)

    def _probs(self, a: int, b: int) -> Tensor:
        return (self._logits(a, b) - self.lse[a:b, None]).exp_()

    def _chunk_step(self, a: int, b: int) -> RuleStep:
        s = self.step
        return RuleStep(s.module, s.rule, {**s.ctx, "x": self.h[a:b]}, s.inputs, s.params)

    def _run(
        self,
        cotangent: Any,
        tangents: Sequence[Tensor | None] | None,
        grads: dict[int, Tensor],
        batched: bool,
    ) -> None:
        """Add the head's cotangents into ``grads`` chunk by chunk, then the body's.

        ``cotangent(a, b, dz)`` gives the chunk's output cotangent (``dz`` the chunk's output
        tangent where ``tangents`` is given); a None cotangent adds nothing.
        """
        requested = 0
        for i in grads:
            requested |= 1 << i
        h_node = self.body.output_node
        need_h = h_node is not None and bool(self.body._mask[h_node] & requested)
        dh = None
        K = 1
        if tangents is not None:
            K = next(t.shape[0] for t in tangents if t is not None) if batched else 1
            if h_node is not None:
                dh = self.body.jvp(tangents, batched)
            if dh is not None:
                dh = dh.reshape(*dh.shape[: dh.ndim - len(self.lead) - 1], -1, dh.shape[-1])
        lead = (K,) if batched else ()
        cot_h = self.h.new_zeros(*lead, *self.h.shape) if need_h else None
        head_grads = {i: g for i, g in grads.items() if i in self.step.params.values()}
        for a, b in self._chunks():
            chunk = self._chunk_step(a, b)
            dz = None
            if tangents is not None:
                tin = [dh[..., a:b, :] if dh is not None else None] if chunk.inputs else []
                dz = chunk.jvp(tin, tangents, batched)
                if dz is None:
                    continue
            u = cotangent(a, b, dz)
            out = chunk.vjp(u, [need_h] if chunk.inputs else [], head_grads, batched)
            if need_h and out and out[0] is not None:
                assert cot_h is not None
                cot_h[..., a:b, :] = out[0]
        if need_h and cot_h is not None:
            cot = cot_h.reshape(*lead, *self.lead, self.h.shape[-1])
            self.body._reverse(cot, grads, batched)

    # ------------------------------------------------------------------ products
    def apply_into(
        self,
        tangents: Sequence[Tensor | None],
        grads: dict[int, Tensor],
        batched: bool,
        weight: float = 1.0,
    ) -> None:
        r"""Add ``weight`` times :math:`J^\top H J v` into ``grads`` (parameter index -> buffer).

        Args:
            tangents: One tangent per parameter (None for a zero block), ``(K, *shape)`` when
                ``batched``.
            grads: Buffers of the requested parameters (``(K, *shape)`` when ``batched``).
            batched: Whether tangents and buffers carry a leading column dimension.
            weight: The batch's weight.
        """
        coef = self.keep * (self.scale * weight)

        def hessian(a: int, b: int, dz: Tensor) -> Tensor:
            p = self._probs(a, b)
            pu = p * dz
            u = torch.addcmul(pu, p, pu.sum(-1, keepdim=True), value=-1.0)
            return u.mul_(coef[a:b, None])

        self._run(hessian, tangents, grads, batched)

    def loss_and_grad(self) -> tuple[Tensor, list[Tensor]]:
        """The batch's loss and gradient (parameter shapes), chunk by chunk.

        Returns:
            The loss value and one gradient per parameter.
        """
        grads = {i: leaf.new_zeros(leaf.shape) for i, leaf in enumerate(self.body.leaves)}
        coef = self.keep * self.scale

        def gradient(a: int, b: int, dz: Any) -> Tensor:
            g = self._probs(a, b)
            if self.eps:
                g.sub_(self.eps / self.V)
            idx = self.y[a:b, None]
            g.scatter_add_(-1, idx, torch.full_like(idx, self.eps - 1, dtype=g.dtype))
            return g.mul_(coef[a:b, None])

        self._run(gradient, None, grads, False)
        return self.value, [grads[i] for i in range(len(self.body.leaves))]
