r"""Fisher information matrices: exact (type-2), Monte-Carlo and empirical."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import LIKELIHOOD_LOSSES, check_choice, check_int
from .ggn import GGN
from .losses import supports_likelihood
from .model import Batch
from .vocabulary import FISHER_KINDS

__all__ = ["Fisher"]

_KINDS = FISHER_KINDS


class Fisher(GGN):
    r"""Fisher information of the model's predictive distribution, in one of three kinds.

    With the loss written as :math:`L = s \sum_r \ell_r` over independent rows,
    :math:`\ell_r = -\log p(y_r\mid z_r)` and :math:`J_r = \partial z_r / \partial\theta`. One
    row is one prediction, one position of one sample, for every loss (:mod:`.losses`):
    cross-entropy on outputs ``(N, C, *d)`` has ``N prod(d)`` rows of ``C`` logits (every index
    but the class dimension 1), MSE and BCE-with-logits on outputs ``(N, *d, D)`` have
    ``N prod(d)`` rows of ``D`` entries (every index but the last); ``(N, D)`` outputs give ``N``
    rows.

    - ``"exact"``: :math:`F = s \sum_r J_r^\top \mathbb{E}_{\hat y\sim p(\cdot\mid z_r)}
      [\nabla\ell_r(\hat y) \nabla\ell_r(\hat y)^\top] J_r = s \sum_r J_r^\top \nabla^2 \ell_r
      J_r`, equal to the GGN for these exponential-family losses;
    - ``"mc"``: the expectation replaced by the mean over ``num_samples`` targets drawn from the
      model's predictive distribution (categorical for cross-entropy, Bernoulli for
      BCE-with-logits, :math:`\mathcal{N}(z, \tfrac12 I)` for MSE) with ``generator``; drawn
      once when the operator is built, so the operator is a fixed matrix;
    - ``"empirical"``: the true targets instead of samples,
      :math:`s \sum_r J_r^\top \nabla\ell_r(y_r) \nabla\ell_r(y_r)^\top J_r`.

    The rows matter for the empirical and Monte-Carlo kinds (the exact Fisher is the same for
    any grouping): the empirical Fisher sums the outer products of per-position gradients, and
    the Monte-Carlo Fisher draws targets per position, so positions of one sample add no
    cross terms. Over several batches the operators combine as in :class:`CurvatureOperator`
    (weights :math:`D_b / D`, :mod:`.weighting`).

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``nn.CrossEntropyLoss`` (no class weights), ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` (no weights), reduction "mean" or "sum".
        data: One batch or an iterable of batches.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        num_samples: Targets drawn per row for ``"mc"``.
        generator: Random generator for ``"mc"`` (default: a fresh one seeded with 0).
        **kwargs: Forwarded to :class:`CurvatureOperator` (``params``, ``cache``, ...).

    Raises:
        ValueError: For an unknown kind, ``num_samples < 1``, or a loss without a likelihood.
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        data: Any,
        kind: str = "exact",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("kind", kind, _KINDS)
        check_int("num_samples", num_samples)
        if not supports_likelihood(loss_fn):
            raise ValueError(
                f"Fisher(kind={kind!r}) needs a loss with a likelihood: {LIKELIHOOD_LOSSES}; "
                f"got {loss_fn!r} (use GGN or Hessian for other losses)"
            )
        self.kind = kind
        self._fuse_head = kind == "exact"  # the other kinds need the per-row loss terms
        self.num_samples_mc = num_samples
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        super().__init__(model, loss_fn, data, **kwargs)

    def _prepare(self, batch: Batch) -> Any:
        state = super()._prepare(batch)
        terms = state.terms
        if not terms.has_likelihood:
            raise ValueError(
                f"Fisher(kind={self.kind!r}): the loss on this batch has no likelihood "
                "(cross-entropy with class weights or targets of an unsupported type)"
            )
        if self.kind == "mc":
            g = terms.sampled_gradients(self.num_samples_mc, self.generator)  # (S, *z)
            state.factor = terms.to_rows(g)  # (S, R, C)
            state.factor_scale = terms.scale / self.num_samples_mc
        elif self.kind == "empirical":
            state.factor = terms.per_row_gradients().unsqueeze(0)  # (1, R, C)
            state.factor_scale = terms.scale
        return state

    def _output_matmat(self, state: Any, jv: Tensor) -> Tensor:
        if self.kind == "exact":
            return state.terms.hessian_matmat(jv)
        terms, g = state.terms, state.factor  # g: (S, R, C)
        rows = terms.to_rows(jv)  # (R, C) or (K, R, C)
        if rows.ndim == 2:
            coef = (g * rows).sum(-1, keepdim=True)  # (S, R, 1)
            return terms.from_rows((g * coef).sum(0) * state.factor_scale)
        coef = torch.einsum("src,krc->ksr", g, rows)
        return terms.from_rows(torch.einsum("src,ksr->krc", g, coef) * state.factor_scale)
