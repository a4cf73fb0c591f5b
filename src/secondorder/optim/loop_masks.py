r"""Check that the library's pass replays the random numbers of a training loop's forward pass.

In the preconditioner mode the loop computes ``.grad`` with its own forward pass; the curvature
must be that of the same thinned network (the loop's dropout masks). The library's passes start
from the generator state the loop's pass started from
(:func:`~secondorder.curvature.random_state.one_draw_per_batch` with ``drawn``), which
reproduces every mask drawn from the default generators in the same order by the same kernels.
It does not where the loop's pass drew its numbers differently: a fused attention kernel
(flash or memory-efficient ``scaled_dot_product_attention`` with dropout on CUDA, whose masks
differ from those of the math kernel the library runs), a compiled forward (inductor draws its
own random numbers), or a generator of the model's own.
:func:`check_loop_draw` compares the library's output at the replayed state with the loop's
output, when the loop's pass drew any random number, and refuses a mismatch naming the random
modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..curvature.model import Batch, FunctionalModel
from ..curvature.per_sample import outputs_agree
from ..curvature.random_state import GeneratorState, one_draw_per_batch
from ..curvature.running_stats import frozen_running_stats
from .closure import BatchRecorder

__all__ = ["check_loop_draw", "loop_batch_block", "random_modules"]


def random_modules(model: nn.Module) -> list[str]:
    """``name (Type, p)`` of the modules that draw random numbers in training mode.

    Dropout modules with ``p > 0`` and modules with a ``dropout`` probability > 0
    (``nn.MultiheadAttention``, which draws its masks inside the attention kernel).
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        p = getattr(module, "p", None) if isinstance(module, _DropoutNd) else None
        if p is None:
            value = getattr(module, "dropout", None)
            p = value if isinstance(value, float) else None
        if p:
            found.append(f"{name or type(model).__name__} ({type(module).__name__}, p={p})")
    return found


def _same(a: GeneratorState, b: GeneratorState) -> bool:
    cuda = (a.cuda is None and b.cuda is None) or (
        a.cuda is not None and b.cuda is not None and torch.equal(a.cuda, b.cuda)
    )
    return cuda and torch.equal(a.cpu, b.cpu)


def check_loop_draw(
    model: nn.Module,
    params: list[Tensor],
    batch: Batch,
    start: GeneratorState,
    output: Any,
    who: str,
) -> None:
    """Refuse if the loop's forward drew random numbers the library's pass does not replay.

    Call inside the ``one_draw_per_batch(device, (batch.inputs, start))`` block, before the
    library's passes and with the running statistics frozen. Does nothing (and costs nothing)
    when the generators did not move since ``start`` (the loop's pass drew nothing) or the
    loop's output is not a tensor; else one forward pass without gradients.

    Args:
        model: The loop's model.
        params: The parameters the library differentiates.
        batch: The recorded batch.
        start: The generator state at the start of the loop's forward pass.
        output: The loop's model output.
        who: The caller, for the message.

    Raises:
        ValueError: If the library's output at the replayed state differs from the loop's
            beyond rounding, naming the modules that draw random numbers.
    """
    if not isinstance(output, Tensor) or _same(start, GeneratorState.now(start.device)):
        return
    fm = FunctionalModel(model, params)
    with torch.no_grad():
        z = fm(fm.values(), batch.inputs)
    loop = output.detach()
    if isinstance(z, Tensor) and z.shape == loop.shape and outputs_agree(z.to(loop.dtype), loop):
        return
    gap = (
        f"max difference {float((z.to(loop.dtype) - loop).abs().max()):.3g}"
        if isinstance(z, Tensor) and z.shape == loop.shape
        else "another output"
    )
    found = random_modules(model)
    what = (
        ", ".join(found)
        if found
        else "a random function in the model's forward (no dropout module; e.g. "
        "F.scaled_dot_product_attention with dropout_p > 0, or a generator of its own)"
    )
    raise ValueError(
        f"{who}: the library's forward pass from the generator state of your loop's forward "
        f"pass does not reproduce its output ({gap}), so the curvature would belong to other "
        f"dropout masks than your .grad. Random here: {what}. Masks drawn by a fused attention "
        "kernel (flash or memory-efficient scaled_dot_product_attention on CUDA), by a "
        "torch.compile'd forward (inductor's own random numbers) or from a generator other "
        "than the default ones cannot be replayed; run the loop's forward with the math "
        "kernel (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)) and uncompiled, or set "
        "that dropout to 0"
    )


@contextmanager
def loop_batch_block(
    recorder: BatchRecorder,
    model: nn.Module,
    params: list[Tensor],
    batch: Batch,
    recorded: bool,
    who: str,
) -> Iterator[None]:
    """The block in which a preconditioner builds the curvature of the loop's batch.

    The loop's recording hooks are off (:meth:`~.closure.BatchRecorder.paused`), running
    statistics frozen, and every pass on ``batch`` draws one set of masks: for a ``recorded``
    batch the loop's own (:func:`check_loop_draw` refuses masks that cannot be replayed),
    else masks of its own.
    """
    start = recorder.random_state if recorded else None
    drawn = (batch.inputs, start) if start is not None else None
    with (
        recorder.paused(),
        frozen_running_stats(model),
        one_draw_per_batch(params[0].device, drawn),
    ):
        if start is not None:
            check_loop_draw(model, params, batch, start, recorder.output, who)
        yield
