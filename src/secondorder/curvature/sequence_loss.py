r"""Token-level cross-entropy on class-last logits ``(N, T, V)``: :class:`SequenceCrossEntropyLoss`.

A language model returns logits ``(N, T, V)`` (``N`` sequences of ``T`` tokens, vocabulary
``V``) and targets ``(N, T)``. torch's ``nn.CrossEntropyLoss`` wants the classes on dimension
1, so the logits must be transposed (``logits.transpose(1, 2)``) or flattened
(``logits.view(-1, V)``, targets ``.view(-1)``). :class:`SequenceCrossEntropyLoss` takes the
class-last logits as they come and computes exactly the same number:

.. math::
    L = s \sum_{n, t} \ell_{nt}, \qquad
    \ell_{nt} = -\sum_v y_{ntv} \log \operatorname{softmax}(z_{nt})_v,

with :math:`y_{nt}` the one-hot target (smoothed by ``label_smoothing``, zero for a token equal
to ``ignore_index``) or the given class probabilities, and :math:`s` the reduction: ``"sum"``
gives 1, ``"mean"`` one over the number of non-ignored tokens (class probabilities: over
``N T``), as torch.

**Rows and samples.** The curvature library sees the same decomposition as for
``nn.CrossEntropyLoss`` on the transposed logits (:mod:`.losses`): one *row* is one token (``N T``
rows of ``V`` logits); the Monte-Carlo Fisher draws one target per token, and the empirical
Fisher, its diagonal and the low-rank GGN's factors sum outer products of per-token gradients.
One *sample* is one sequence: data are split into batches along ``N``, batch weights count the
non-ignored tokens of each batch (:mod:`.weighting`), and per-sample gradients
(:func:`~secondorder.curvature.diagonal.per_sample_gradient_diagonal`) are the gradients of this
loss on one sequence (for ``"mean"``: that sequence's own mean over its tokens, as torch would
compute it on a batch of one; a sequence of padding only adds a zero gradient, torch's
gradient of its ``nan`` mean, and still counts in the number of samples).

**Bad inputs.** Logits must have at least two dimensions with the vocabulary last; targets are
class indices of shape ``logits.shape[:-1]`` and dtype ``torch.int64`` (or ``torch.uint8``), or
class probabilities of the logits' shape and dtype class. Anything else raises a ``ValueError``
naming the expected and the given shapes. A ``"mean"`` over a batch whose every target is
ignored is :math:`0/0`: torch returns ``nan``, and so does this loss; the curvature operators
skip such a batch (weight 0) and refuse data whose every target is ignored.

**Large vocabularies.** No curvature product forms a ``(V, V)`` matrix: the output Hessian
:math:`s\,t(\operatorname{diag} p - p p^\top)` is applied in closed form, keeping the
probabilities ``(N T, V)``. With a ``chunk_size`` and a model that ends with an ``nn.Linear``
head (tied to the input embedding or not), the GGN and the exact Fisher apply head and loss
together over chunks of ``chunk_size`` tokens (:mod:`.fused_head`): nothing of ``N T V``
entries is kept or built, for one more head matrix product per chunk. Exact diagonals and
the low-rank GGN's factors need :math:`V` backward passes per token and an ``(N T, V, V)``
factor: they are refused with a ``ValueError`` above :math:`2^{30}` entries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SequenceCrossEntropyLoss", "check_sequence_targets"]


def check_sequence_targets(logits: Tensor, targets: Tensor) -> None:
    """Refuse logits and targets that do not fit a class-last cross-entropy.

    Args:
        logits: ``(N, *d, V)`` logits, at least two dimensions.
        targets: Class indices ``(N, *d)`` (``torch.int64`` or ``torch.uint8``), or class
            probabilities ``(N, *d, V)`` of a floating dtype.

    Raises:
        ValueError: Naming the expected shapes and dtypes and what came.
    """
    if not isinstance(logits, Tensor) or logits.ndim < 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            "SequenceCrossEntropyLoss: expected logits (N, T, V) (or (N, *d, V), classes last), "
            f"got {got}"
        )
    index_shape = tuple(logits.shape[:-1])
    expected = (
        f"class indices of shape {index_shape} and dtype torch.int64 (or torch.uint8), or "
        f"class probabilities of shape {tuple(logits.shape)} and a floating dtype"
    )
    if not isinstance(targets, Tensor):
        raise ValueError(
            f"SequenceCrossEntropyLoss: expected targets as {expected}; got "
            f"{type(targets).__name__}"
        )
    ok_index = targets.dtype in (torch.int64, torch.uint8) and tuple(targets.shape) == index_shape
    ok_probs = targets.dtype.is_floating_point and targets.shape == logits.shape
    if not (ok_index or ok_probs):
        raise ValueError(
            f"SequenceCrossEntropyLoss: expected targets as {expected}; got shape "
            f"{tuple(targets.shape)} and dtype {targets.dtype}"
        )


class SequenceCrossEntropyLoss(nn.CrossEntropyLoss):
    r"""Cross-entropy on class-last logits ``(N, T, V)`` with targets ``(N, T)``.

    The same loss as ``nn.CrossEntropyLoss`` applied to ``logits.transpose(1, 2)`` (module
    docstring: the formula, what a row and a sample are, bad inputs); every curvature operator,
    diagonal and optimizer of the library knows its closed forms.

    Args:
        weight: Class weights ``(V,)`` (as torch; the loss then has no likelihood: no Fisher
            kinds, diagonals or low-rank GGN, but GGN, Hessian and the optimizers work).
        ignore_index: Target value of padding tokens, which add nothing.
        reduction: ``"mean"`` (over non-ignored tokens), ``"sum"`` or ``"none"`` (per token,
            shape ``(N, T)``; curvature needs a scalar).
        label_smoothing: As torch.
        chunk_size: Tokens per chunk in the fused head products of the GGN and the exact
            Fisher (module docstring); None (default) keeps the probabilities instead. It
            changes the memory and time of curvature products, not their value.

    Example:
        >>> import torch
        >>> loss_fn = SequenceCrossEntropyLoss(ignore_index=-100)
        >>> logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
        >>> ref = torch.nn.CrossEntropyLoss()(logits.transpose(1, 2), y)
        >>> bool(torch.allclose(loss_fn(logits, y), ref))
        True
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``input`` ``(N, *d, V)`` against ``target`` (module docstring).

        Args:
            input: Class-last logits.
            target: Class indices ``(N, *d)`` or probabilities ``(N, *d, V)``.

        Returns:
            A scalar (``"mean"``, ``"sum"``) or the per-token losses ``(N, *d)``.
        """
        check_sequence_targets(input, target)
        out = F.cross_entropy(
            input.movedim(-1, 1),
            target.movedim(-1, 1) if target.shape == input.shape else target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
        return out
