r"""The model as a pure function of its parameters, and the data it is evaluated on.

:class:`FunctionalModel` selects the trainable parameters of any ``nn.Module`` (tied parameters
once, parameters without ``requires_grad`` left out), flattens them into the vector
:math:`\theta \in \mathbb{R}^n` that curvature operators act on, and calls the module through
:func:`torch.func.functional_call` with other values for them. Unflattening is a view.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

try:  # torch's C++ helper behind torch._utils._unflatten_dense_tensors: all views in one call
    _unflatten_views: Any = torch._C._nn.unflatten_dense_tensors
except AttributeError:  # pragma: no cover - older or future torch without it
    _unflatten_views = None

__all__ = ["Batch", "FunctionalModel", "as_batches"]


@dataclass(frozen=True)
class Batch:
    """One batch: the model is called as ``model(*inputs)`` and the loss as ``loss(out, targets)``.

    Attributes:
        inputs: The positional inputs of the model.
        targets: The targets handed to the loss.
    """

    inputs: tuple[Any, ...]
    targets: Any

    @property
    def size(self) -> int:
        """Number of samples: the leading dimension of the first input tensor."""
        for x in self.inputs:
            if isinstance(x, Tensor) and x.ndim > 0:
                return int(x.shape[0])
        if isinstance(self.targets, Tensor) and self.targets.ndim > 0:
            return int(self.targets.shape[0])
        return 1


def _as_batch(item: Any, what: str) -> Batch:
    if isinstance(item, Batch):
        return item
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"{what}: expected a batch (inputs, targets), got "
            f"{type(item).__name__}"
            + (f" of length {len(item)}" if hasattr(item, "__len__") else "")
        )
    inputs, targets = item
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return Batch(inputs, targets)


def _looks_like_single_batch(data: Any) -> bool:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return False
    inputs, targets = data
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    # a batch holds tensors; a list of two batches holds pairs
    return isinstance(first, Tensor) and not isinstance(targets, (tuple, list))


def as_batches(data: Any) -> list[Batch] | Iterable[Batch]:
    """Normalise ``data`` to batches.

    ``data`` is one batch ``(inputs, targets)`` (``inputs`` a tensor or a tuple of tensors) or an
    iterable of such batches. A one-shot iterator (a generator) is read once into a list, since
    curvature products pass over the data many times; a re-iterable (a list, a ``DataLoader``)
    is kept and re-iterated.

    Args:
        data: One batch or an iterable of batches.

    Returns:
        A list of :class:`Batch`, or a re-iterable yielding them.

    Raises:
        ValueError: If ``data`` is empty or an element is not a batch.
    """
    if isinstance(data, Batch):
        return [data]
    if _looks_like_single_batch(data):
        return [_as_batch(data, "data")]
    if isinstance(data, Iterator) or not hasattr(data, "__iter__"):
        if not hasattr(data, "__iter__"):
            raise ValueError(
                f"data: expected a batch (inputs, targets) or an iterable of batches, "
                f"got {type(data).__name__}"
            )
        batches = [_as_batch(item, "data") for item in data]
    elif isinstance(data, (list, tuple)):
        batches = [_as_batch(item, "data") for item in data]
    else:
        return _ReIterable(data)
    if not batches:
        raise ValueError("data: expected at least one batch, got an empty iterable")
    return batches


class _ReIterable:
    """Wraps a re-iterable of raw batches (e.g. a ``DataLoader``) and yields :class:`Batch`."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Batch]:
        empty = True
        for item in self.source:
            empty = False
            yield _as_batch(item, "data")
        if empty:
            raise ValueError("data: expected at least one batch, got an empty iterable")


class FunctionalModel:
    r"""A module seen as a function :math:`f(\theta, x)` of its flattened trainable parameters.

    Args:
        model: Any ``nn.Module``.
        params: Optional subset of ``model``'s parameters to differentiate with respect to; by
            default every parameter with ``requires_grad``. Tied parameters count once.

    Raises:
        ValueError: If no trainable parameter remains, or ``params`` holds a tensor that is not
            a parameter of ``model``.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        named = list(model.named_parameters())  # tied parameters appear once
        if params is None:
            chosen = [(name, p) for name, p in named if p.requires_grad]
        else:
            wanted = {id(p) for p in params}
            known = {id(p) for _, p in named}
            unknown = [i for i, p in enumerate(params) if id(p) not in known]
            if unknown:
                raise ValueError(
                    f"params: entries {unknown} are not parameters of the model "
                    f"({type(model).__name__})"
                )
            chosen = [(name, p) for name, p in named if id(p) in wanted]
        if not chosen:
            raise ValueError(
                f"model {type(model).__name__} has no trainable parameters "
                "(none with requires_grad=True, or an empty `params`)"
            )
        dtypes = {p.dtype for _, p in chosen}
        devices = {p.device for _, p in chosen}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all trainable parameters must share one dtype and device, got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}"
            )
        self.names = [name for name, _ in chosen]
        self.params = [p for _, p in chosen]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        # shape templates for the native unflatten (meta tensors: shapes without storage)
        self._shape_templates = [torch.empty(s, device="meta") for s in self.shapes]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        chosen_ids = {id(p) for p in self.params}
        # every other parameter and buffer is passed as a constant
        self._frozen = {
            name: p.detach() for name, p in model.named_parameters() if id(p) not in chosen_ids
        }
        # all names (tied duplicates included) of each chosen parameter, for module-wise engines
        self.alias: dict[str, int] = {}
        index = {id(p): i for i, p in enumerate(self.params)}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in index:
                self.alias[name] = index[id(p)]

    # ------------------------------------------------------------ vectors
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate tensors in parameter shapes into one flat vector of length ``dim``.

        Args:
            tensors: One tensor per selected parameter, in parameter shapes.

        Returns:
            The flat vector.
        """
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector (or ``(dim, k)`` matrix) into views in parameter shapes.

        Args:
            vector: Shape ``(dim,)`` or ``(dim, k)``.

        Returns:
            Views of ``vector`` of shapes ``p.shape`` (or ``(*p.shape, k)`` for a matrix).
        """
        if vector.ndim == 1 and _unflatten_views is not None and vector.numel() == self.dim:
            return list(_unflatten_views(vector, self._shape_templates))  # one native call
        parts = vector.split(self.numels, dim=0)
        if vector.ndim == 1:
            return [part.view(shape) for part, shape in zip(parts, self.shapes)]
        k = vector.shape[1]
        return [part.view(*shape, k) for part, shape in zip(parts, self.shapes)]

    def current(self) -> Tensor:
        """Return the current parameters as one flat vector (a copy)."""
        return self.flatten([p.detach() for p in self.params])

    def leaves(self, point: Tensor | None = None) -> list[Tensor]:
        """Return fresh leaf tensors (``requires_grad=True``) holding the parameters.

        Args:
            point: A flat parameter vector to evaluate at; by default the module's current values.

        Returns:
            One leaf per selected parameter; with no ``point`` they share the module's storage.
        """
        if point is None:
            return [p.detach().requires_grad_(True) for p in self.params]
        return [t.detach().requires_grad_(True) for t in self.unflatten(point)]

    # ------------------------------------------------------------- calling
    def parameter_dict(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """Map parameter names to ``tensors`` (selected ones) and to constants (the rest).

        Args:
            tensors: Values of the selected parameters.

        Returns:
            A dictionary for :func:`torch.func.functional_call`.
        """
        values = dict(self._frozen)
        values.update(zip(self.names, tensors))
        return values

    def __call__(self, tensors: Sequence[Tensor], inputs: tuple[Any, ...]) -> Any:
        """Evaluate the model at the parameter values ``tensors`` on ``inputs``.

        Args:
            tensors: Values of the selected parameters (in parameter shapes).
            inputs: Positional inputs of the module.

        Returns:
            The module's output.
        """
        return functional_call(self.model, self.parameter_dict(tensors), inputs)
