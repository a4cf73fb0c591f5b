r"""Output-space second-order quantities of losses.

For a batch with network outputs :math:`z` and a scalar loss :math:`L(z)` we need, without
materialising any matrix:

- the output Hessian product :math:`U \mapsto \nabla_z^2 L \, U` (GGN, exact Fisher);
- the output gradient :math:`\nabla_z L` (the parameter gradient is :math:`J^\top \nabla_z L`);
- for the core losses, which decompose as :math:`L = s \sum_r \ell_r(z_r)` over independent
  *rows* :math:`z_r \in \mathbb{R}^C` with a likelihood :math:`\ell_r = -\log p(y_r \mid z_r)`
  (up to constants), the unreduced per-row gradients :math:`\nabla \ell_r` with the true
  targets (empirical Fisher), gradients with targets sampled from the model's predictive
  distribution (Monte-Carlo Fisher), and symmetric factors :math:`S_r S_r^\top = \nabla^2 \ell_r`.

**Rows.** One row is one prediction: one position of one sample. For ``CrossEntropyLoss`` on
outputs ``(N, C, *d)`` a row is every index except the class dimension 1 (``N prod(d)`` rows of
``C`` entries), for :class:`~.sequence_loss.SequenceCrossEntropyLoss` on class-last logits
``(N, *d, C)`` likewise every index except the last (one row per token); for ``MSELoss`` and
``BCEWithLogitsLoss`` on outputs ``(N, *d, D)`` a row is every index except the last (feature)
dimension (``N prod(d)`` rows of ``D`` entries), so ``(N, D)`` outputs give ``N`` rows and
``(N,)`` outputs ``N`` rows of one entry. The empirical
Fisher :math:`s \sum_r J_r^\top \nabla\ell_r \nabla\ell_r^\top J_r`, its diagonal, the
Monte-Carlo Fisher and the low-rank GGN's factors all use these rows (as curvlinops does).

The scale :math:`s` follows the loss's ``reduction``: ``"sum"`` gives 1, ``"mean"`` gives one
over the batch's normaliser (cross-entropy: non-ignored rows, or rows for class probabilities;
MSE, BCE: output entries; see :mod:`.weighting`), so every quantity is the exact derivative of
the loss the user minimises.

**Closed forms** apply only to the torch classes themselves and to subclasses that keep their
``forward`` (:func:`~secondorder.curvature.weighting.torch_loss_class`); a subclass with its own
``forward``, like any other callable, goes through autograd (:class:`LossTerms`).

Tangents ``U`` have the shape of ``z`` or carry a leading column dimension ``(K, *z.shape)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .sequence_loss import SequenceCrossEntropyLoss, check_sequence_targets
from .weighting import torch_loss_class

__all__ = ["LossTerms", "check_targets", "loss_terms", "supports_likelihood"]

#: entries of U above which a cross-entropy Hessian product runs in chunks of samples
_CHUNK_ELEMENTS = 2**20
#: entries above which the (R, C, C) symmetric factor of the cross-entropy is refused
_FACTOR_ELEMENTS = 2**30


class LossTerms:
    r"""Output-space quantities of one batch's loss at outputs ``z`` (base class: autograd).

    Works for any callable ``loss_fn(outputs, targets)`` returning a scalar: the output Hessian
    product is computed by differentiating the output gradient once more.

    Attributes:
        value: The loss value (detached scalar tensor).
        grad_output: :math:`\nabla_z L`, shape of ``z``.
        is_psd: Whether the output Hessian is known to be positive semi-definite.
        has_likelihood: Whether per-row gradients, sampling and factors are available.
    """

    is_psd = False
    has_likelihood = False

    def __init__(self, loss_fn: Any, z: Tensor, targets: Any) -> None:
        self.z = z.detach()
        zleaf = self.z.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(zleaf, targets)
            _check_scalar(loss, loss_fn)
            (grad,) = torch.autograd.grad(loss, zleaf, create_graph=True)
        self.value = loss.detach()
        self._zleaf = zleaf
        self._grad_graph = grad
        self.grad_output = grad.detach()

    def hessian_matmat(self, U: Tensor) -> Tensor:
        r"""Apply the output Hessian :math:`\nabla_z^2 L` to ``U`` (``z``-shaped, or ``(K, *z)``).

        Args:
            U: Output-space tangent(s).

        Returns:
            The product, same shape as ``U``.
        """
        if not self._grad_graph.requires_grad:  # loss is linear in z
            return torch.zeros_like(U)
        if U.shape == self.z.shape:
            (out,) = torch.autograd.grad(self._grad_graph, self._zleaf, U, retain_graph=True)
            return out
        (out,) = torch.autograd.grad(
            self._grad_graph, self._zleaf, U, retain_graph=True, is_grads_batched=True
        )
        return out

    # -- likelihood-based quantities (core losses only) ----------------------------------
    def _no_likelihood(self, what: str) -> Exception:
        return ValueError(
            f"{what} needs a loss with a known likelihood (nn.CrossEntropyLoss, nn.MSELoss or "
            f"nn.BCEWithLogitsLoss without class weights); got a generic loss function"
        )

    @property
    def scale(self) -> float:
        r"""The reduction factor :math:`s` in :math:`L = s \sum_r \ell_r`."""
        raise self._no_likelihood("a per-sample decomposition")

    def per_row_gradients(self) -> Tensor:
        r"""Unreduced per-row gradients :math:`\nabla_{z_r} \ell_r` with the true targets."""
        raise self._no_likelihood("the empirical Fisher")

    def sampled_gradients(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Per-row gradients with targets drawn from the model, shape ``(S, *z.shape)``."""
        raise self._no_likelihood("the Monte-Carlo Fisher")

    def symmetric_factor(self) -> Tensor:
        r"""Factors :math:`S_r` with :math:`S_r S_r^\top = \nabla^2 \ell_r`, shape (R, C, C')."""
        raise self._no_likelihood("a symmetric factorization of the loss Hessian")

    def to_rows(self, U: Tensor) -> Tensor:
        """Reshape ``z``-shaped ``U`` (optionally with a leading K) to rows ``(.., R, C)``."""
        raise self._no_likelihood("a row decomposition")

    def from_rows(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`to_rows`."""
        raise self._no_likelihood("a row decomposition")


def _check_scalar(loss: Any, loss_fn: Any) -> None:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn {loss_fn!r} must return a scalar tensor (reduction 'mean' or 'sum'), "
            f"got {shape}"
        )


class _RowLoss(LossTerms):
    """Shared machinery of losses that decompose over independent rows."""

    is_psd = True
    has_likelihood = True
    _row_grad: Tensor

    def __init__(self, z: Tensor) -> None:
        self.z = z.detach()
        self._scale = 1.0

    @property
    def scale(self) -> float:
        return self._scale

    def to_rows(self, U: Tensor) -> Tensor:
        lead = U.shape[: U.ndim - self.z.ndim]
        width = self.z.shape[-1] if self.z.ndim >= 2 else 1  # one row per position
        return U.reshape(*lead, -1, width)

    def from_rows(self, rows: Tensor) -> Tensor:
        lead = rows.shape[:-2]
        return rows.reshape(*lead, *self.z.shape)

    def per_row_gradients(self) -> Tensor:
        return self._row_grad

    def hessian_matmat(self, U: Tensor) -> Tensor:
        return self.from_rows(self._row_hessian(self.to_rows(U)) * self._scale)

    def _row_hessian(self, rows: Tensor) -> Tensor:
        raise NotImplementedError


class _CrossEntropy(_RowLoss):
    r"""Softmax cross-entropy, :math:`\nabla^2\ell_r = t_r(\operatorname{diag}p_r - p_r p_r^\top)`.

    :math:`t_r = \sum_c y_{rc}` is 1 for class-index targets (0 for ignored rows). Classes lie
    on dimension 1 (torch's ``CrossEntropyLoss``) or, with ``class_last``, on the last dimension
    (:class:`~.sequence_loss.SequenceCrossEntropyLoss`); both give the same rows.
    """

    def __init__(
        self, loss_fn: nn.CrossEntropyLoss, z: Tensor, targets: Tensor, class_last: bool = False
    ) -> None:
        super().__init__(z)
        self._class_last = class_last
        self._classdim_last = z.ndim > 2 and not class_last  # classes on dim 1 move last
        rows = self.to_rows(self.z)
        C = rows.shape[-1]
        logp = rows.log_softmax(-1)
        self.p = logp.exp()
        eps = float(loss_fn.label_smoothing)
        self._eps, self._t_probs, self._y = eps, None, None  # the targets, for the gradients
        if targets.dtype.is_floating_point:  # class probabilities
            t = self.to_rows(targets.to(z.dtype))
            weight = t.sum(-1, keepdim=True)
            t = (1 - eps) * t + eps / C * weight
            self._t_probs = t
            total = -(t * logp).sum()
        else:
            y = targets.reshape(-1).long()  # uint8 indices too, as torch
            keep = y != loss_fn.ignore_index
            weight = keep.to(z.dtype).unsqueeze(-1)
            self._y = torch.where(keep, y, 0).unsqueeze(-1)  # (R, 1)
            picked = logp.gather(-1, self._y)
            total = -(((1 - eps) * picked + eps / C * logp.sum(-1, keepdim=True)) * weight).sum()
        del logp
        self.row_weight = weight  # (R, 1)
        n_rows = float(weight.sum()) if not targets.dtype.is_floating_point else rows.shape[0]
        self._scale = 1.0 / max(n_rows, 1.0) if loss_fn.reduction == "mean" else 1.0
        self._row_scale = weight * self._scale  # (R, 1): t_r s
        self.value = total * self._scale
        # from here on only the outputs' shape is needed (p is kept): a placeholder that holds
        # no (R, C) storage, so an owner that drops its own reference frees the logits
        self.z = self.z.new_zeros(()).expand(self.z.shape)

    # the per-row gradients are built when asked for, not kept beside p: (R, C) entries each
    def per_row_gradients(self) -> Tensor:
        r"""Unreduced :math:`\nabla\ell_r = t_r p_r - y_r` (smoothed targets), shape (R, C)."""
        g = self.p * self.row_weight
        if self._t_probs is not None:
            return g.sub_(self._t_probs)
        assert self._y is not None
        C = g.shape[-1]
        if self._eps:
            g.sub_(self.row_weight * (self._eps / C))
        return g.scatter_add_(-1, self._y, self.row_weight * (self._eps - 1.0))

    @property
    def grad_output(self) -> Tensor:  # type: ignore[override]
        r""":math:`\nabla_z L`, shape of ``z`` (built when asked for)."""
        return self.from_rows(self.per_row_gradients().mul_(self._scale))

    def to_rows(self, U: Tensor) -> Tensor:
        if self._class_last:
            return super().to_rows(U)
        if self.z.ndim == 1:  # unbatched (C,): one row
            return U.unsqueeze(-2)
        if not self._classdim_last:
            return U
        lead = U.ndim - self.z.ndim
        return U.movedim(lead + 1, -1).reshape(*U.shape[:lead], -1, self.z.shape[1])

    def from_rows(self, rows: Tensor) -> Tensor:
        if self._class_last:
            return super().from_rows(rows)
        if self.z.ndim == 1:
            return rows.squeeze(-2)
        if not self._classdim_last:
            return rows
        lead = rows.shape[:-2]
        shape = (self.z.shape[0], *self.z.shape[2:], self.z.shape[1])
        return rows.reshape(*lead, *shape).movedim(-1, len(lead) + 1)

    def _row_hessian(self, rows: Tensor) -> Tensor:
        pu = self.p * rows
        return (pu - self.p * pu.sum(-1, keepdim=True)) * self.row_weight

    def hessian_matmat(self, U: Tensor) -> Tensor:
        lead = U.ndim - self.z.ndim
        n = self.z.shape[0] if self.z.ndim >= 2 else 1
        step = max(1, _CHUNK_ELEMENTS * n // max(1, U.numel()))  # samples per chunk
        if step >= n:
            return self.from_rows(self._row_product(self.to_rows(U), self.p, self._row_scale))
        # large outputs: chunks of samples written into one result in U's layout, so no
        # temporary of U's size besides the result (the rows of a sample are consecutive)
        out = torch.empty_like(U)
        per = self.p.shape[0] // n  # rows per sample
        for a in range(0, n, step):
            b = min(a + step, n)
            part = U[(slice(None),) * lead + (slice(a, b),)]
            rows = self._chunk_rows(part, lead)
            res = self._row_product(
                rows, self.p[a * per : b * per], self._row_scale[a * per : b * per]
            )
            out[(slice(None),) * lead + (slice(a, b),)] = self._chunk_unrows(res, part.shape, lead)
        return out

    @staticmethod
    def _row_product(rows: Tensor, p: Tensor, row_scale: Tensor) -> Tensor:
        # s t_r (p_r * u_r - p_r (p_r . u_r)) in four operations (the products' inner loop)
        pu = p * rows
        out = torch.addcmul(pu, p, pu.sum(-1, keepdim=True), value=-1.0)
        return out.mul_(row_scale)

    def _chunk_rows(self, part: Tensor, lead: int) -> Tensor:
        """Rows ``(.., r, C)`` of ``part``, a slice of samples of a ``z``-shaped tensor."""
        if self._classdim_last:  # classes on dim 1
            part = part.movedim(lead + 1, -1)
        return part.reshape(*part.shape[:lead], -1, part.shape[-1])

    def _chunk_unrows(self, rows: Tensor, shape: torch.Size, lead: int) -> Tensor:
        """Inverse of :meth:`_chunk_rows` for a slice of shape ``shape``."""
        if not self._classdim_last:
            return rows.reshape(shape)
        moved = (*shape[:lead], shape[lead], *shape[lead + 2 :], shape[lead + 1])
        return rows.reshape(moved).movedim(-1, lead + 1)

    def sampled_gradients(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        C = self.p.shape[-1]
        if not bool(torch.isfinite(self.p).all()):  # non-finite outputs: nothing to sample
            return self.p.new_full((num_samples, *self.z.shape), float("nan"))
        probs = self.p.to(generator.device) if generator is not None else self.p
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(draws.T.to(self.p.device), C).to(self.p.dtype)  # (S, R, C)
        return self.from_rows((self.p - onehot) * self.row_weight)

    def symmetric_factor(self) -> Tensor:
        R, C = self.p.shape
        if R * C * C > _FACTOR_ELEMENTS:  # (R, C, C): O(N T V^2) for a language model
            raise ValueError(
                f"the symmetric factor of the cross-entropy's output Hessian has (rows, C, C) = "
                f"({R}, {C}, {C}) entries, more than {_FACTOR_ELEMENTS}: exact diagonals and "
                "the low-rank GGN's factors cost C backward passes per row at this number of "
                "classes. Use products (GGN, Fisher(kind='exact' or 'mc')), a stochastic diagonal "
                "(so.diagonal_estimate) or empirical_fisher_diagonal"
            )
        sq = self.p.sqrt()
        return (torch.diag_embed(sq) - self.p.unsqueeze(-1) * sq.unsqueeze(-2)) * (
            self.row_weight.sqrt().unsqueeze(-1)
        )


class _MSE(_RowLoss):
    r"""Squared error :math:`\ell_r = \lVert z_r - y_r \rVert^2`, :math:`\nabla^2 \ell_r = 2I`.

    The matching likelihood is :math:`\mathcal{N}(y_r \mid z_r, \tfrac12 I)`.
    """

    def __init__(self, loss_fn: nn.MSELoss, z: Tensor, targets: Tensor) -> None:
        super().__init__(z)
        self._scale = 1.0 / z.numel() if loss_fn.reduction == "mean" else 1.0
        diff = self.z - targets.to(z.dtype)
        self.value = diff.square().sum() * self._scale
        self._row_grad = self.to_rows(2 * diff)
        self.grad_output = 2 * diff * self._scale

    def _row_hessian(self, rows: Tensor) -> Tensor:
        return 2 * rows

    def sampled_gradients(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.z.device
        xi = torch.randn(
            (num_samples, *self.z.shape), generator=generator, dtype=self.z.dtype, device=device
        )
        return xi.to(self.z.device) * math.sqrt(2.0)

    def symmetric_factor(self) -> Tensor:
        R, C = self.to_rows(self.z).shape
        eye = torch.eye(C, dtype=self.z.dtype, device=self.z.device) * math.sqrt(2.0)
        return eye.expand(R, C, C)


class _BCEWithLogits(_RowLoss):
    r"""Sigmoid cross-entropy with logits.

    :math:`\nabla^2 \ell_r = \operatorname{diag}(\sigma(z_r)(1 - \sigma(z_r)))`.
    """

    def __init__(self, loss_fn: nn.BCEWithLogitsLoss, z: Tensor, targets: Tensor) -> None:
        super().__init__(z)
        self._scale = 1.0 / z.numel() if loss_fn.reduction == "mean" else 1.0
        y = targets.to(z.dtype)
        self.sigma = torch.sigmoid(self.z)
        self.value = F.binary_cross_entropy_with_logits(self.z, y, reduction="sum") * self._scale
        self._row_grad = self.to_rows(self.sigma - y)
        self._curv = self.to_rows(self.sigma * (1 - self.sigma))
        self.grad_output = (self.sigma - y) * self._scale

    def _row_hessian(self, rows: Tensor) -> Tensor:
        return self._curv * rows

    def sampled_gradients(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.z.device
        u = torch.rand(
            (num_samples, *self.z.shape), generator=generator, dtype=self.z.dtype, device=device
        )
        draws = (u.to(self.z.device) < self.sigma).to(self.z.dtype)
        return self.sigma - draws

    def symmetric_factor(self) -> Tensor:
        return torch.diag_embed(self._curv.sqrt())


def check_targets(loss_fn: Any, z: Any, targets: Any) -> None:
    """Refuse targets a listed torch loss would refuse or broadcast, naming what it expects.

    Cross-entropy and NLL take class indices of dtype ``torch.int64`` (or ``torch.uint8``) and
    the outputs' shape without the class dimension 1 (``(N, *d)`` for outputs ``(N, C, *d)``,
    ``()`` for ``(C,)``), or (cross-entropy only) class probabilities of the outputs' shape and
    a floating dtype; indices lie in ``[0, C)`` unless equal to ``ignore_index``. The elementwise
    losses take targets of the outputs' shape (no broadcasting); the BCE and KL losses a
    floating dtype. Generic callables are not checked.

    Args:
        loss_fn: The loss.
        z: The batch's outputs.
        targets: The batch's targets.

    Raises:
        ValueError: If the targets do not fit, naming the expected shape and dtype.
    """
    cls = torch_loss_class(loss_fn)
    if cls is None or not isinstance(z, Tensor):
        return
    name = cls.__name__
    if cls is SequenceCrossEntropyLoss:
        check_sequence_targets(z, targets)
        _check_class_range(name, loss_fn, targets, z.shape[-1])
        return
    got = f"got {type(targets).__name__}"
    if isinstance(targets, Tensor):
        got = f"got shape {tuple(targets.shape)} and dtype {targets.dtype}"
    if cls in (nn.CrossEntropyLoss, nn.NLLLoss):
        if z.ndim == 0:
            raise ValueError(f"{name}: expected outputs (C,) or (N, C, *d), got shape ()")
        index_shape = (*z.shape[:1], *z.shape[2:]) if z.ndim >= 2 else ()
        C = z.shape[1] if z.ndim >= 2 else z.shape[0]
        probs = cls is nn.CrossEntropyLoss
        expected = (
            f"class indices of shape {index_shape} and dtype torch.int64 (or torch.uint8)"
            + (
                f", or class probabilities of shape {tuple(z.shape)} and a floating dtype"
                if probs
                else ""
            )
        )
        if isinstance(targets, Tensor) and targets.dtype in (torch.int64, torch.uint8):
            if tuple(targets.shape) != index_shape:
                raise ValueError(f"{name}: expected targets as {expected}; {got}")
            _check_class_range(name, loss_fn, targets, C)
            return
        if probs and isinstance(targets, Tensor) and targets.dtype.is_floating_point:
            if targets.shape == z.shape:
                return
        raise ValueError(f"{name}: expected targets as {expected}; {got}")
    floating = cls in (nn.BCELoss, nn.BCEWithLogitsLoss, nn.KLDivLoss)
    if (
        not isinstance(targets, Tensor)
        or targets.shape != z.shape
        or (floating and not targets.dtype.is_floating_point)
        or targets.is_complex()
    ):
        dtype = "a floating dtype" if floating else "a real dtype"
        raise ValueError(
            f"{name}: expected targets of the outputs' shape {tuple(z.shape)} and {dtype}; {got}"
        )


def _check_class_range(name: str, loss_fn: Any, targets: Tensor, C: int) -> None:
    """Refuse class indices outside ``[0, C)`` other than ``ignore_index``."""
    if targets.dtype.is_floating_point:
        return
    kept = targets[targets != loss_fn.ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= C):
        raise ValueError(
            f"{name}: class indices must lie in [0, {C}) or equal ignore_index="
            f"{loss_fn.ignore_index}; got values in [{int(kept.min())}, {int(kept.max())}]"
        )


def supports_likelihood(loss_fn: Any, targets: Any = None) -> bool:
    """Whether ``loss_fn`` is a core loss with a known likelihood (for Fisher kinds).

    Args:
        loss_fn: The loss.
        targets: Optional targets of one batch (cross-entropy with class weights is generic).

    Returns:
        True for ``CrossEntropyLoss`` and
        :class:`~.sequence_loss.SequenceCrossEntropyLoss` (no class weights), ``MSELoss`` and
        ``BCEWithLogitsLoss`` (no ``weight``/``pos_weight``), each with reduction ``"mean"`` or
        ``"sum"`` and its own class's ``forward`` (a subclass overriding it gets False).
    """
    cls = torch_loss_class(loss_fn)  # a subclass with its own forward is generic
    if cls is None or getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
        return False
    if cls in (nn.CrossEntropyLoss, SequenceCrossEntropyLoss):
        return loss_fn.weight is None
    if cls is nn.MSELoss:
        return True
    if cls is nn.BCEWithLogitsLoss:
        return loss_fn.weight is None and loss_fn.pos_weight is None
    return False


def loss_terms(loss_fn: Any, z: Tensor, targets: Any) -> LossTerms:
    """Build the output-space quantities of ``loss_fn`` at outputs ``z``.

    Core losses get closed forms (only with torch's own ``forward``); any other callable,
    including a subclass that overrides ``forward``, falls back to autograd. Targets of a
    listed torch loss are checked first (:func:`check_targets`).

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        z: The network outputs of the batch.
        targets: The batch's targets.

    Returns:
        The :class:`LossTerms` of the batch.

    Raises:
        ValueError: If the loss uses ``reduction="none"``, or for targets that do not fit.
    """
    if getattr(loss_fn, "reduction", "mean") == "none":
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction='none') returns per-sample losses; curvature "
            "needs a scalar loss: use reduction 'mean' or 'sum'"
        )
    check_targets(loss_fn, z, targets)
    if supports_likelihood(loss_fn) and isinstance(targets, Tensor):
        if type(loss_fn).forward is nn.CrossEntropyLoss.forward:
            return _CrossEntropy(loss_fn, z, targets)
        if type(loss_fn).forward is SequenceCrossEntropyLoss.forward:
            return _CrossEntropy(loss_fn, z, targets, class_last=True)
        if type(loss_fn).forward is nn.MSELoss.forward:
            return _MSE(loss_fn, z, targets)
        return _BCEWithLogits(loss_fn, z, targets)  # type: ignore[arg-type]
    return LossTerms(loss_fn, z, targets)
