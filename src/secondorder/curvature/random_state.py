r"""One draw of a random forward pass per batch, for every pass of a block (an optimizer step).

A model with dropout in training mode draws new masks on every forward pass. Inside
:func:`one_draw_per_batch`, every forward pass on the same batch (the same input tensors)
starts from the same state of the default generators (CPU, and the CUDA device of the
parameters): the loss, the gradient, every curvature product, and the losses at trial points
of one step all see the network with one fixed mask per batch. The first pass on a batch records
the state it starts from; later passes on that batch restore it. When the block ends, the
generators are left where the first passes left them, so the next block draws new masks (as
one forward pass per batch would).

Forward passes announce themselves with :func:`replay` (``FunctionalModel.__call__``, the graph
engine's linearisation, the optimizers' running-statistics pass); outside the block it does
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

__all__ = ["GeneratorState", "alias", "one_draw_per_batch", "replay"]


@dataclass
class GeneratorState:
    """The default generators' state: CPU, and CUDA on ``device`` (:meth:`now`, :meth:`restore`)."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def now(cls, device: torch.device) -> GeneratorState:
        """The state now (the CUDA generator of ``device`` where it is a CUDA device)."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        """Set the generators back to this state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class _Block:
    device: torch.device
    # batch key -> (the inputs, kept alive so their ids stay unique; state at the first start)
    starts: dict[tuple[int, ...], tuple[list[Tensor], GeneratorState]] = field(default_factory=dict)
    end: GeneratorState | None = None  # where the latest first pass left the generators
    # id of a cast copy of some inputs -> (the copy, kept alive; the tensor it was cast from)
    aliases: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


_BLOCK: ContextVar[_Block | None] = ContextVar("_BLOCK", default=None)


@contextmanager
def one_draw_per_batch(
    device: torch.device, drawn: tuple[Any, GeneratorState] | None = None
) -> Iterator[None]:
    """Every forward pass on one batch inside the block draws the same random numbers.

    Args:
        device: The parameters' device (its CUDA generator is replayed too).
        drawn: ``(inputs, state)`` of a forward pass that already ran on ``inputs`` from
            ``state`` (the training loop's own, for the preconditioner): passes on that batch
            replay it, and the generators are set back to where they were at the block's start.

    Yields:
        Nothing; the generators are left after the block where the batches' first passes
        left them.
    """
    if _BLOCK.get() is not None:  # nested: the outer block decides
        yield
        return
    block = _Block(device)
    if drawn is not None:
        tensors = [t for t in tree_leaves(drawn[0]) if isinstance(t, Tensor)]
        block.starts[tuple(map(id, tensors))] = (tensors, drawn[1])
        block.end = GeneratorState.now(device)
    token = _BLOCK.set(block)
    try:
        yield
    finally:
        _BLOCK.reset(token)
        if block.end is not None:
            block.end.restore()


@contextmanager
def replay(inputs: Any) -> Iterator[None]:
    """Wrap one forward pass on ``inputs``: inside a block, start it from the batch's state.

    Args:
        inputs: The model's inputs (any pytree of tensors).

    Yields:
        Nothing.
    """
    block = _BLOCK.get()
    if block is None:
        yield
        return
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    tensors = [block.aliases[id(t)][1] if id(t) in block.aliases else t for t in tensors]
    key = tuple(id(t) for t in tensors)
    entry = block.starts.get(key)
    first = entry is None
    if entry is None:
        block.starts[key] = (tensors, GeneratorState.now(block.device))
    else:
        entry[1].restore()
    try:
        yield
    finally:
        if first:
            block.end = GeneratorState.now(block.device)


def alias(copy: Any, original: Any) -> None:
    """Passes on ``copy`` (inputs cast from ``original``, same structure) replay ``original``'s.

    A low-precision model's passes run on float32 casts of its inputs, new tensors each time;
    inside a block they are the same batch. Outside a block it does nothing.
    """
    block = _BLOCK.get()
    if block is None:
        return
    for c, o in zip(tree_leaves(copy), tree_leaves(original)):
        if isinstance(c, Tensor) and isinstance(o, Tensor) and c is not o:
            root = block.aliases.get(id(o), (o, o))[1]  # a copy of a copy: the first original
            block.aliases[id(c)] = (c, root)
