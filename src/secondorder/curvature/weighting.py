r"""Batch weights: the losses of several batches add up to the loss of their concatenation.

A loss with reduction ``"mean"`` divides the sum of its terms by a *normaliser* :math:`D`, and
what :math:`D` counts depends on the loss and its options (torch's own definitions):

=========================================  ====================================================
loss (torch's ``forward``, unchanged)      normaliser :math:`D_b` of one batch
=========================================  ====================================================
``CrossEntropyLoss``, ``NLLLoss``,         number of targets :math:`\ne` ``ignore_index``, or
class-index targets                        with ``weight`` the sum of ``weight[y]`` over them
``CrossEntropyLoss``, class probabilities  number of positions (``targets.numel() / C``)
``SequenceCrossEntropyLoss``               as ``CrossEntropyLoss`` (tokens, classes last)
``KLDivLoss(reduction="batchmean")``       ``targets.shape[0]``
``MSELoss``, ``L1Loss``, ``HuberLoss``,    number of elements, ``targets.numel()`` (targets
``SmoothL1Loss``, ``BCELoss``,             have the outputs' shape; ``label_smoothing`` and
``BCEWithLogitsLoss``, ``KLDivLoss``,      ``pos_weight`` do not change it)
``SoftMarginLoss``, ``PoissonNLLLoss``
any other callable                         the batch size :math:`N_b` (checked, see below)
=========================================  ====================================================

With :math:`L_b = S_b / D_b` the loss of batch :math:`b` (:math:`S_b` the sum of its terms), the
loss of the concatenated data is

.. math::
    L = \frac{\sum_b S_b}{\sum_b D_b} = \sum_b w_b L_b, \qquad w_b = \frac{D_b}{D}, \quad
    D = \sum_b D_b,

with :math:`D` summed over every batch on every rank of a process group; reduction ``"sum"``
gives :math:`w_b = 1`. Every curvature operator, diagonal and loss over several batches is
:math:`\sum_b w_b (\cdot)_b` with these weights. A batch with :math:`D_b = 0` (every target
ignored) has weight 0 and is skipped (its own mean is :math:`0/0`); data whose :math:`D` is 0
are refused with a ``ValueError``.

**Other callables** (functions, loss modules not listed, subclasses that override ``forward``)
are assumed to be a mean over the samples of the outputs' leading dimension
(:math:`w_b = N_b / N`) or a sum (:math:`w_b = 1`). With several batches (or a process group)
this is checked on the first batch with at least two samples: ``loss_fn(z, y)`` must equal the
sample-weighted mean of the loss on the batch's two halves (then: mean) or their sum (then: sum);
anything else raises a ``ValueError`` naming the three values. The result is remembered per
loss object.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .model import Batch
from .running_stats import frozen_running_stats
from .sequence_loss import SequenceCrossEntropyLoss

__all__ = ["BatchWeights", "batch_normaliser", "batch_weights", "torch_loss_class"]

# the library's own class-last cross-entropy first: it subclasses nn.CrossEntropyLoss
_CLASS_INDEX: tuple[type[nn.Module], ...] = (
    SequenceCrossEntropyLoss,
    nn.CrossEntropyLoss,
    nn.NLLLoss,
)
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.KLDivLoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
)
KNOWN_LOSSES = _CLASS_INDEX + _ELEMENTWISE

# the reduction found for generic callables: loss object -> (its `reduction` attribute, mean?)
_FOUND: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def torch_loss_class(loss_fn: Any) -> type[nn.Module] | None:
    """The torch loss class whose ``forward`` ``loss_fn`` runs unchanged, or None.

    The library's :class:`~.sequence_loss.SequenceCrossEntropyLoss` counts as such a class. A
    subclass that overrides ``forward`` is a generic callable (None): its closed forms and
    normaliser are unknown.

    Args:
        loss_fn: The loss.

    Returns:
        One of the classes in the module docstring's table, or None.
    """
    for cls in KNOWN_LOSSES:
        if isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward:
            return cls
    return None


def _reduction(loss_fn: Any, cls: type[nn.Module]) -> str:
    reduction = loss_fn.reduction
    allowed = ("mean", "sum", "batchmean") if cls is nn.KLDivLoss else ("mean", "sum")
    if reduction not in allowed:
        raise ValueError(
            f"{cls.__name__}(reduction={reduction!r}): curvature needs a scalar loss; expected "
            f"reduction in {allowed}"
        )
    return str(reduction)


def batch_normaliser(loss_fn: Any, targets: Any) -> float | None:
    r"""The normaliser :math:`D_b` of one batch's ``"mean"`` (see the module docstring).

    Args:
        loss_fn: The loss.
        targets: The batch's targets.

    Returns:
        :math:`D_b` for a listed loss (whatever its reduction), None for any other callable.

    Raises:
        ValueError: For reduction ``"none"``, or targets that are not a tensor.
    """
    cls = torch_loss_class(loss_fn)
    if cls is None:
        return None
    reduction = _reduction(loss_fn, cls)
    if not isinstance(targets, Tensor):
        raise ValueError(
            f"{cls.__name__}: expected targets as a tensor, got {type(targets).__name__}"
        )
    if cls in _CLASS_INDEX:
        if targets.dtype.is_floating_point:  # class probabilities, one row per position
            class_dim = -1 if cls is SequenceCrossEntropyLoss else 1
            C = targets.shape[class_dim] if targets.ndim >= 2 else targets.numel()
            return targets.numel() / max(C, 1)
        keep = targets != loss_fn.ignore_index
        weight = loss_fn.weight
        if weight is None:
            return float(keep.sum())
        kept = targets[keep].long()
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= weight.numel()):
            raise ValueError(
                f"{cls.__name__}: class-index targets must lie in [0, {weight.numel()}) (or equal "
                f"ignore_index={loss_fn.ignore_index}), got values in [{int(kept.min())}, "
                f"{int(kept.max())}]"
            )
        return float(weight.to(targets.device)[kept].sum())
    if reduction == "batchmean":
        return float(targets.shape[0]) if targets.ndim else 1.0
    return float(targets.numel())


class BatchWeights:
    r"""The batch weights :math:`w_b` of one loss on some data (see the module docstring).

    Attributes:
        loss_fn: The loss.
        mean: False for a sum (every weight is 1).
        total: The global normaliser :math:`D` (1 for a sum).
        local_samples: The number of samples in this rank's batches (counted in the same pass).
    """

    def __init__(self, loss_fn: Any, mean: bool, total: float, local_samples: int = 0) -> None:
        self.loss_fn = loss_fn
        self.mean = mean
        self.total = total
        self.local_samples = local_samples

    def normaliser(self, batch: Batch) -> float:
        r""":math:`D_b` of ``batch`` (the batch size for a generic callable)."""
        d = batch_normaliser(self.loss_fn, batch.targets)
        return float(batch.size) if d is None else d

    def weight(self, batch: Batch) -> float:
        r""":math:`w_b = D_b / D` (``"mean"``) or 1 (``"sum"``)."""
        return self.normaliser(batch) / self.total if self.mean else 1.0

    def weights(self, batches: Iterable[Batch]) -> list[float]:
        """The weights of ``batches``, in order."""
        return [self.weight(b) for b in batches]


def batch_weights(
    loss_fn: Any,
    batches: Iterable[Batch],
    fmodel: Any = None,
    process_group: Any = None,
) -> BatchWeights:
    """Count the normalisers of ``batches`` (one pass) and return their weights.

    Args:
        loss_fn: The loss.
        batches: This rank's batches (a re-iterable is iterated once).
        fmodel: The :class:`~secondorder.curvature.model.FunctionalModel`; its outputs on one
            batch check a generic callable's reduction (needed only for those, with several
            batches or a process group).
        process_group: A ``torch.distributed`` process group, or None.

    Returns:
        The weights.

    Raises:
        ValueError: If a generic callable is neither a mean over samples nor a sum, or if the
            normalisers of a ``"mean"`` add up to 0 (every target ignored).
    """
    cls = torch_loss_class(loss_fn)
    local, count, samples, candidate = 0.0, 0, 0, None
    for batch in batches:
        count += 1
        samples += batch.size
        if cls is not None:
            local += batch_normaliser(loss_fn, batch.targets)  # type: ignore[operator]
        else:
            local += batch.size
            if candidate is None and batch.size >= 2:
                candidate = batch
    error = ""
    if cls is not None:
        mean = _reduction(loss_fn, cls) != "sum"
    elif count > 1 or process_group is not None:
        try:
            mean = _generic_is_mean(loss_fn, candidate, fmodel)
        except ValueError as err:
            error, mean = str(err), True
    else:  # one batch: its weight is 1 either way
        mean = True
    total, failed = local, bool(error)
    if process_group is not None:
        from .base import allreduce_sum  # base imports this module

        (reduced,) = allreduce_sum(
            [torch.tensor([local, float(failed)], dtype=torch.float64)], process_group
        )
        total, failed = float(reduced[0]), bool(reduced[1] > 0)
    if failed:
        raise ValueError(error or "loss_fn: the reduction check failed on another rank")
    if mean and total == 0:
        raise ValueError(
            f"{type(loss_fn).__name__}: every target of the data is ignored "
            f"(ignore_index={getattr(loss_fn, 'ignore_index', None)!r}) or has weight 0: the "
            "mean loss is 0/0"
        )
    return BatchWeights(loss_fn, mean, total if mean else 1.0, samples)


def _split(obj: Any, n: int, k: int) -> tuple[Any, Any]:
    """Split tensors with leading dimension ``n`` at ``k``; other values go to both halves."""
    leaves, spec = tree_flatten(obj)
    cut = [
        (x[:k], x[k:]) if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n else (x, x)
        for x in leaves
    ]
    return tree_unflatten([a for a, _ in cut], spec), tree_unflatten([b for _, b in cut], spec)
    if isinstance(obj, (tuple, list)):
        parts = [_split(o, n, k) for o in obj]
        return type(obj)(p[0] for p in parts), type(obj)(p[1] for p in parts)
    if isinstance(obj, dict):
        parts_d = {key: _split(v, n, k) for key, v in obj.items()}
        return {k_: v[0] for k_, v in parts_d.items()}, {k_: v[1] for k_, v in parts_d.items()}
    return obj, obj


def _generic_is_mean(loss_fn: Any, batch: Batch | None, fmodel: Any) -> bool:
    """Check that a generic callable is a mean over samples (True) or a sum (False)."""
    declared = getattr(loss_fn, "reduction", None)
    try:
        found = _FOUND.get(loss_fn)
    except TypeError:  # not weak-referenceable
        found = None
    if found is not None and found[0] == declared:
        return found[1]
    if batch is None or fmodel is None:  # nothing to check on: the documented assumption
        return declared != "sum"
    n, k = batch.size, batch.size // 2
    with torch.no_grad(), frozen_running_stats(fmodel.model):  # the check moves no statistics
        z = fmodel([p.detach() for p in fmodel.params], batch.inputs)
    if not (isinstance(z, Tensor) and z.ndim > 0 and z.shape[0] == n):
        return declared != "sum"  # outputs without the batch's leading dimension: unchecked
    (za, zb), (ya, yb) = _split(z, n, k), _split(batch.targets, n, k)
    with torch.no_grad():
        values = [loss_fn(z, batch.targets), loss_fn(za, ya), loss_fn(zb, yb)]
    if not all(isinstance(v, Tensor) and v.numel() == 1 for v in values):
        raise ValueError(f"loss_fn {loss_fn!r} must return a scalar tensor")
    L, La, Lb = (float(v.detach().double()) for v in values)
    as_mean, as_sum = (k * La + (n - k) * Lb) / n, La + Lb
    tol = (1e-9 if z.dtype == torch.float64 else 1e-4) * (abs(L) + abs(La) + abs(Lb)) + 1e-30
    is_mean, is_sum = abs(L - as_mean) <= tol, abs(L - as_sum) <= tol
    if not math.isfinite(L):  # nothing to compare (a finite mean has finite halves)
        is_mean, is_sum = declared != "sum", declared == "sum"
    if not (is_mean or is_sum):
        raise ValueError(
            f"loss_fn {loss_fn!r}: with several batches each batch is weighted assuming the loss "
            "is a mean over the samples of the outputs' leading dimension (or a sum over them), "
            f"but on a batch of {n} samples it gives {L:.10g}, while its halves of {k} and "
            f"{n - k} samples give {La:.10g} and {Lb:.10g}: sample-weighted mean {as_mean:.10g}, "
            f"sum {as_sum:.10g}. Pass the data as one batch, or a loss that is a mean or a sum "
            "over samples (or a torch loss module with torch's own forward, whose normaliser "
            "is known)"
        )
    mean = is_mean if not (is_mean and is_sum) else declared != "sum"
    try:
        _FOUND[loss_fn] = (declared, mean)
    except TypeError:
        pass
    return mean
