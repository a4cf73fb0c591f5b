r"""The model as a pure function of its parameters, and the data it is evaluated on.

:class:`FunctionalModel` selects the trainable parameters of any ``nn.Module`` (tied parameters
once, parameters without ``requires_grad`` left out), flattens them into the vector
:math:`\theta \in \mathbb{R}^n` that curvature operators act on, and calls the module through
:func:`torch.func.functional_call` with other values for them. Unflattening is a view.

**Data.** ``data`` is one batch ``(inputs, targets)`` or an iterable of batches
(:func:`as_batches`). ``inputs`` is a tensor, a tuple or list of model arguments (the model is
called as ``model(*inputs)``), or a mapping such as a Hugging-Face style
``{"input_ids": ..., "attention_mask": ...}``, which is passed as the model's one positional
argument, ``model(inputs)`` (wrap a model that takes keyword arguments in a module whose
``forward(inputs)`` calls ``model(**inputs)``). ``targets`` is whatever the loss takes as its
second argument (a tensor, a tuple of tensors, ...). A pair is read as one batch unless both its
elements could be batches themselves (pairs), see :func:`as_batches`; :class:`Batch` says it
without ambiguity. A batch holds at least one sample: the leading dimension of its first
tensor input (or of its targets) is its size.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

from ..linalg.precision import autocast_disabled
from .attention import differentiable_attention
from .low_precision import LOW_PRECISION, cast_copy, cast_tensor, compute_dtype
from .random_state import alias, replay
from .twice_differentiable import TwiceDifferentiable, needs_twice_differentiable

try:  # torch's C++ helper behind torch._utils._unflatten_dense_tensors: all views in one call
    _unflatten_views: Any = torch._C._nn.unflatten_dense_tensors
except AttributeError:  # pragma: no cover - older or future torch without it
    _unflatten_views = None

__all__ = [
    "LOW_PRECISION",
    "Batch",
    "FunctionalModel",
    "as_batches",
    "compute_dtype",
    "unwrap_compiled",
]


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module underneath ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``).

    A compiled module shares its ``Parameter`` objects, buffers and submodules with the module it
    wraps; only its forward is compiled. Curvature products need derivatives that compiled
    graphs do not provide (double backward), so every operator and optimizer evaluates the
    module underneath. Any other module is returned as it is.

    Args:
        model: An ``nn.Module``, compiled or not.

    Returns:
        ``model._orig_mod`` (repeatedly, for a module compiled twice), else ``model``.
    """
    # no OptimizedModule can exist before torch._dynamo is imported: no import needed here
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while compiled is not None and isinstance(model, compiled):
        model = model._orig_mod
    return model


@dataclass(frozen=True)
class Batch:
    """One batch: the model is called as ``model(*inputs)`` and the loss as ``loss(out, targets)``.

    Attributes:
        inputs: The positional inputs of the model (a mapping is one positional input).
        targets: The targets handed to the loss.
    """

    inputs: tuple[Any, ...]
    targets: Any

    @property
    def size(self) -> int:
        """Number of samples: the leading dimension of the first tensor in the inputs.

        Tensors nested in tuples, lists or mappings count; without an input tensor of at least
        one dimension, the targets' leading dimension, else 1 (an objective without data).
        """
        for x in tree_leaves(self.inputs):
            if isinstance(x, Tensor) and x.ndim > 0:
                return int(x.shape[0])
        for t in tree_leaves(self.targets):
            if isinstance(t, Tensor) and t.ndim > 0:
                return int(t.shape[0])
        return 1


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)[:6]}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _as_batch(item: Any, what: str) -> Batch:
    if isinstance(item, Batch):
        batch = item
    else:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"{what}: expected a batch (inputs, targets), got {_describe(item)}. A pair "
                "(inputs, targets) is read as one batch unless both of its elements are pairs "
                "themselves; otherwise data is an iterable of batches (use "
                "secondorder.curvature.Batch(inputs, targets) to mark one batch)"
            )
        inputs, targets = item
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        batch = Batch(inputs, targets)
    if batch.size == 0:
        shapes = [tuple(x.shape) for x in tree_leaves(batch.inputs) if isinstance(x, Tensor)]
        raise ValueError(
            f"{what}: the batch has no samples (inputs of shapes {shapes}); expected at least "
            "one sample along the leading dimension"
        )
    return batch


def _could_be_batch(value: Any) -> bool:
    """A :class:`Batch` or a pair: what an element of an iterable of batches looks like."""
    return isinstance(value, Batch) or (isinstance(value, (tuple, list)) and len(value) == 2)


def _looks_like_single_batch(data: Any) -> bool:
    """A pair ``(inputs, targets)`` of which at least one element cannot be a batch.

    Inputs that are a tensor or a mapping, or targets that are a tensor, make the pair one
    batch; so do tuple targets with tensor inputs (``(x, (y1, y2))``). Only a pair of pairs,
    e.g. ``[(x1, y1), (x2, y2)]``, is read as two batches.
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return False
    return not all(_could_be_batch(element) for element in data)


def as_batches(data: Any) -> list[Batch] | Iterable[Batch]:
    """Normalise ``data`` to batches.

    ``data`` is one batch ``(inputs, targets)`` or an iterable of such batches. A pair is one
    batch when ``inputs`` or ``targets`` cannot be a batch itself, i.e. is not a pair: a
    tensor, a mapping (a dict of named inputs), a tuple of another length. A pair of pairs,
    ``[(x1, y1), (x2, y2)]``, is two batches; a single batch of two inputs and two targets,
    ``((x1, x2), (y1, y2))``, reads the same and must be marked as one, by
    :class:`Batch` ``(inputs=(x1, x2), targets=(y1, y2))`` or a one-element list
    ``[((x1, x2), (y1, y2))]``. A one-shot iterator (a generator) is read once into a list,
    since curvature products pass over the data many times; a re-iterable (a ``DataLoader``)
    is kept and re-iterated.

    Args:
        data: One batch or an iterable of batches.

    Returns:
        A list of :class:`Batch`, or a re-iterable yielding them.

    Raises:
        ValueError: If ``data`` is empty, an element is not a batch, or a batch has no samples
            (the message names the batch).
    """
    if isinstance(data, Batch) or _looks_like_single_batch(data):
        return [_as_batch(data, "data")]
    if isinstance(data, Mapping) or isinstance(data, Tensor) or not hasattr(data, "__iter__"):
        raise ValueError(
            f"data: expected a batch (inputs, targets) or an iterable of batches, "
            f"got {_describe(data)}"
        )
    if isinstance(data, Iterator) or isinstance(data, (list, tuple)):
        batches = [_as_batch(item, f"data: batch {i}") for i, item in enumerate(data)]
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
        for i, item in enumerate(self.source):
            empty = False
            yield _as_batch(item, f"data: batch {i}")
        if empty:
            raise ValueError("data: expected at least one batch, got an empty iterable")


class FunctionalModel:
    r"""A module seen as a function :math:`f(\theta, x)` of its flattened trainable parameters.

    A module compiled by ``torch.compile`` is evaluated through the module underneath
    (:func:`unwrap_compiled`): the same parameters, named without the wrapper's ``_orig_mod.``
    prefix, and derivatives of every order. :attr:`model` is that module, :attr:`compiled` the
    wrapper (``None`` for a module that was not compiled).

    Args:
        model: Any ``nn.Module``, compiled or not.
        params: Optional subset of ``model``'s parameters to differentiate with respect to; by
            default every parameter with ``requires_grad``, in the order of
            ``model.named_parameters()``. Given ``params`` keep their order: the flat vector
            (and every operator's rows and columns) lists them as given. Tied parameters count
            once.
        dtype: The dtype the model is evaluated in and flat vectors are held in
            (:func:`compute_dtype`; default float32 for bfloat16/float16 parameters, else the
            parameters' dtype). When it differs from the parameters' dtype, :attr:`model` is a
            copy of the module cast to ``dtype`` (:attr:`source` is the module itself): every
            forward pass, linearisation and product runs in ``dtype`` at the values of the
            module's parameters, whose trainable ones are read anew at every pass.

    Raises:
        ValueError: If no trainable parameter remains, or ``params`` holds a tensor that is not
            a parameter of ``model`` or the same tensor twice.
        TypeError: For a ``dtype`` that is not a real floating-point dtype.
    """

    def __init__(
        self, model: nn.Module, params: Sequence[Tensor] | None = None, dtype: Any = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        inner = unwrap_compiled(model)
        self.compiled: nn.Module | None = model if inner is not model else None
        self.model = model = self.source = inner
        self._stand_ins = needs_twice_differentiable(model)
        named = list(model.named_parameters())  # tied parameters appear once
        chosen: list[tuple[str, Tensor]]
        if params is None:
            chosen = [(name, p) for name, p in named if p.requires_grad]
        else:
            params = list(params)
            name_of = {id(p): name for name, p in named}
            unknown = [i for i, p in enumerate(params) if id(p) not in name_of]
            if unknown:
                raise ValueError(
                    f"params: entries {unknown} are not parameters of the model "
                    f"({type(model).__name__})"
                )
            first: dict[int, int] = {}
            repeated = [i for i, p in enumerate(params) if first.setdefault(id(p), i) != i]
            if repeated:
                raise ValueError(
                    f"params: entries {repeated} repeat an earlier entry (the same tensor, e.g. "
                    "a tied parameter); list every parameter once"
                )
            # the user's order: the flat vector is theirs
            chosen = [(name_of[id(p)], p) for p in params]
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
        self.param_dtype = self.params[0].dtype
        self.dtype = compute_dtype(self.param_dtype, dtype)
        self.device = self.params[0].device
        self.mixed = self.dtype != self.param_dtype
        if self.mixed:
            self.model = model = cast_copy(model, self.dtype)
            self._pairs = list(zip(self.source.modules(), model.modules()))
        chosen_ids = {id(p) for p in self.params}
        # every other parameter and buffer is passed as a constant
        copied = dict(model.named_parameters())
        self._frozen = {
            name: copied[name].detach()
            for name, p in self.source.named_parameters()
            if id(p) not in chosen_ids
        }
        # all names (tied duplicates included) of each chosen parameter, for module-wise engines
        self.alias: dict[str, int] = {}
        index = {id(p): i for i, p in enumerate(self.params)}
        for name, p in self.source.named_parameters(remove_duplicate=False):
            if id(p) in index:
                self.alias[name] = index[id(p)]
        # torch.func.functional_call leaves plain tensors in place of tied parameters (one
        # Parameter under two names; torch 2.13): the originals are put back after each call
        tied = len(list(model.named_parameters(remove_duplicate=False))) > len(
            list(model.parameters())
        )
        self._tied_slots = (
            [
                (m, name, p)
                for m in model.modules()
                for name, p in m._parameters.items()
                if p is not None
            ]
            if tied
            else []
        )

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
        """Return the current parameters as one flat vector (a copy, in :attr:`dtype`)."""
        return self.flatten(self.values())

    def values(self) -> list[Tensor]:
        """The current parameters, detached, in :attr:`dtype` (views unless cast)."""
        self.refresh()
        return [p.detach().to(self.dtype) for p in self.params]

    def refresh(self) -> None:
        """Copy training flags, buffers and frozen parameters of :attr:`source` into :attr:`model`.

        A no-op unless the model is evaluated in another dtype than its parameters' (the
        trainable parameters' values come in with every pass).
        """
        if not self.mixed:
            return
        trainable = {id(p) for p in self.params}
        with torch.no_grad():
            for src, dst in self._pairs:
                dst.training = src.training
                for name, p in src._parameters.items():
                    copied = dst._parameters.get(name)
                    if p is not None and copied is not None and id(p) not in trainable:
                        copied.copy_(p)
                for name, buf in src._buffers.items():
                    held = dst._buffers.get(name)
                    if buf is None or held is None:
                        dst._buffers[name] = None if buf is None else cast_tensor(buf, self.dtype)
                    elif held.shape != buf.shape or held.device != buf.device:
                        dst._buffers[name] = cast_tensor(buf, self.dtype)
                    else:
                        held.copy_(buf)

    def cast_inputs(self, value: Any) -> Any:
        """Floating-point tensors in ``value`` (any nesting) cast to :attr:`dtype`.

        A no-op unless the model is evaluated in another dtype than its parameters'; integer
        tensors (token ids, class labels) are left alone.

        Args:
            value: Inputs or targets of a batch.

        Returns:
            ``value`` with its floating-point tensors in :attr:`dtype`.
        """
        if not self.mixed:
            return value
        cast = tree_map(lambda t: cast_tensor(t, self.dtype) if isinstance(t, Tensor) else t, value)
        alias(cast, value)  # a pass on the cast copy is a pass on the batch (one dropout mask)
        return cast

    def cast_batch(self, batch: Batch) -> Batch:
        """``batch`` with floating-point inputs and targets in :attr:`dtype` (:meth:`cast_inputs`).

        Args:
            batch: A batch.

        Returns:
            ``batch`` itself unless the model is evaluated in another dtype.
        """
        if not self.mixed:
            return batch
        return Batch(self.cast_inputs(batch.inputs), self.cast_inputs(batch.targets))

    def leaves(self, point: Tensor | None = None) -> list[Tensor]:
        """Return fresh leaf tensors (``requires_grad=True``) holding the parameters.

        Args:
            point: A flat parameter vector to evaluate at; by default the module's current values.

        Returns:
            One leaf per selected parameter, in :attr:`dtype`; with no ``point`` they share the
            module's storage unless cast.
        """
        if point is None:
            return [t.requires_grad_(True) for t in self.values()]
        self.refresh()
        return [t.detach().to(self.dtype).requires_grad_(True) for t in self.unflatten(point)]

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

        Attention runs under :func:`~secondorder.curvature.attention.differentiable_attention`
        (the math kernel, no fused fast path), and functions without a second derivative in
        PyTorch under :class:`~secondorder.curvature.twice_differentiable.TwiceDifferentiable`
        (models that hold them only), so that every derivative of the output exists. Any
        ``torch.autocast`` is switched off (:func:`autocast_disabled`); ``tensors`` and
        floating-point inputs are cast to :attr:`dtype`.

        Args:
            tensors: Values of the selected parameters (in parameter shapes).
            inputs: Positional inputs of the module.

        Returns:
            The module's output.
        """
        if self.mixed:
            self.refresh()
            tensors = [t.to(self.dtype) for t in tensors]
            inputs = self.cast_inputs(inputs)
        try:
            with self.differentiable(), replay(inputs):  # one dropout mask per batch and step
                return functional_call(self.model, self.parameter_dict(tensors), inputs)
        finally:
            for module, name, p in self._tied_slots:
                if module._parameters.get(name) is not p:
                    module._parameters[name] = p

    def call_own(self, inputs: tuple[Any, ...]) -> Any:
        """``self(self.params, inputs)`` by a plain call (no ``functional_call``).

        Where the selected parameters are the module's own: not :attr:`mixed`, none tied.
        """
        if self.mixed or self._tied_slots:
            return self(self.params, inputs)
        with self.differentiable(), replay(inputs):  # as __call__
            return self.model(*inputs)

    def differentiable(self) -> ExitStack:
        """A ``with`` block in which every derivative of the model's forward exists.

        It runs attention under
        :func:`~secondorder.curvature.attention.differentiable_attention`. For models that
        hold functions without a second derivative in PyTorch it also enters
        :class:`~secondorder.curvature.twice_differentiable.TwiceDifferentiable`. Any
        ``torch.autocast`` is off inside (:func:`autocast_disabled`).

        Returns:
            The entered contexts, closed when the block exits.
        """
        stack = autocast_disabled()
        stack.enter_context(differentiable_attention())
        if self._stand_ins:
            stack.enter_context(TwiceDifferentiable())
        return stack
