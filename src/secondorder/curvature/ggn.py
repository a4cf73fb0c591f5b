r"""The generalised Gauss-Newton matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import CurvatureOperator
from .factored import FactoredLinearization
from .fused_head import FusedHead, fused_head
from .jacobian_factors import check_jacobian_factors_option
from .linearization import Linearization, linearize
from .losses import loss_terms
from .model import Batch

__all__ = ["GGN"]


@dataclass
class _GGNState:
    lin: Linearization | FactoredLinearization
    terms: Any  # LossTerms, or a FusedHead (the head and the loss applied in chunks)
    factor: Tensor | None = None  # (S, R, C) gradients for the Monte-Carlo/empirical Fisher
    factor_scale: float = 1.0


class GGN(CurvatureOperator):
    r"""Generalised Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top H_b J_b` (PSD, convex loss).

    .. math::
        G v = \sum_b w_b\, J_b^\top \big(\nabla_z^2 L_b\big) J_b v,

    with :math:`J_b = \partial z_b / \partial \theta` the Jacobian of batch :math:`b`'s outputs
    and :math:`\nabla_z^2 L_b` the Hessian of its loss (which carries the reduction's
    :math:`1/D_b` for ``"mean"``); :math:`w_b = D_b / D` as in :class:`CurvatureOperator`
    (:mod:`.weighting`). The output
    Hessian has a closed form for cross-entropy, MSE and BCE-with-logits; any other loss
    callable uses autograd. Each product costs one :math:`Jv` and one :math:`J^\top u`, reusing
    the forward pass made when the operator was built.

    Args:
        model: Any ``nn.Module``.
        loss_fn: The loss.
        data: One batch or an iterable of batches.
        jacobian_factors: For MLPs (``nn.Sequential`` of Linear layers and elementwise
            activations), compute products through the per-layer output-Jacobian factors
            (:mod:`~secondorder.curvature.jacobian_factors`): two matrix products per layer
            instead of four, after building factors that hold ``N C`` numbers per hidden unit.
            ``False`` (default) or ``True`` (the separate fast path
            :class:`~secondorder.curvature.factored.FactoredLinearization`, factors built at
            the first product; a ``ValueError`` for a network that does not qualify). The
            retired ``"auto"`` means ``False``. Measured gains: ``BENCHMARKS.md``.
        **kwargs: Forwarded to :class:`CurvatureOperator` (``params``, ``cache``, ...).

    With :class:`~secondorder.SequenceCrossEntropyLoss` given a ``chunk_size`` and a model ending
    in an ``nn.Linear`` head (the graph engine), products, loss and gradient apply head and loss
    together over chunks of tokens (:mod:`~secondorder.curvature.fused_head`): no ``(N T, V)``
    tensor is kept or built.

    Example:
        >>> import torch, secondorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> G = so.GGN(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> G.shape
        (26, 26)
        >>> v = torch.randn(26, dtype=torch.float64)
        >>> bool(torch.allclose(G @ v, G.to_dense() @ v))
        True
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        data: Any,
        *,
        jacobian_factors: bool | str = False,
        **kwargs: Any,
    ) -> None:
        check_jacobian_factors_option(jacobian_factors)
        self._psd = True
        self.jacobian_factors = jacobian_factors
        super().__init__(model, loss_fn, data, **kwargs)
        self.IS_PSD = self._psd

    #: whether the vocabulary head may be fused with the loss (:mod:`.fused_head`)
    _fuse_head = True

    def _prepare(self, batch: Batch) -> _GGNState:
        lin = linearize(
            self.fmodel, batch.inputs, self.fmodel.leaves(), self.engine, self.jacobian_factors
        )
        fused = fused_head(lin, self.loss_fn, batch.targets) if self._fuse_head else None
        if fused is not None:
            return _GGNState(lin, fused)
        terms = loss_terms(self.loss_fn, lin.z, batch.targets)
        if getattr(lin, "path", None) == "graph":  # its outputs serve only as a shape now
            lin.z = terms.z  # (cross-entropy: a placeholder; the logits are freed)
        self._psd = self._psd and terms.is_psd
        return _GGNState(lin, terms)

    def _output_matmat(self, state: Any, jv: Tensor) -> Tensor:
        return state.terms.hessian_matmat(jv)

    def _apply(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        batched: bool,
    ) -> list[Tensor]:
        if isinstance(state.terms, FusedHead):
            idx = range(len(tangents)) if indices is None else indices
            K = next(t.shape[0] for t in tangents if t is not None) if batched else None
            leaves = state.lin.leaves
            bufs = {i: leaves[i].new_zeros(*(K,) * batched, *leaves[i].shape) for i in idx}
            state.terms.apply_into(tangents, bufs, batched)
            return [bufs[i] for i in idx]
        jv = state.lin.jvp(tangents, batched)
        if jv is None:  # the requested tangent does not reach the outputs
            jv = state.lin.z.new_zeros(
                (next(t for t in tangents if t is not None).shape[0], *state.lin.z.shape)
                if batched
                else state.lin.z.shape
            )
        u = self._output_matmat(state, jv)
        del jv  # not alive during the reverse pass
        return state.lin.vjp(u, indices, batched)

    def _apply_into(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        out: Sequence[Tensor],
        weight: float,
    ) -> None:
        if isinstance(state.terms, FusedHead):
            idx = range(len(tangents)) if indices is None else indices
            state.terms.apply_into(tangents, dict(zip(idx, out)), False, weight)
            return
        jv = state.lin.jvp(tangents, False)
        if jv is None:  # the tangent does not reach the outputs: nothing to add
            return
        u = self._output_matmat(state, jv)
        del jv  # not alive during the reverse pass
        state.lin.vjp_into(u * weight if weight != 1.0 else u, out, indices)

    def _batch_loss_and_grad(self, state: Any) -> tuple[Tensor, list[Tensor]]:
        if isinstance(state.terms, FusedHead):
            return state.terms.loss_and_grad()
        return state.terms.value, state.lin.vjp(state.terms.grad_output)
