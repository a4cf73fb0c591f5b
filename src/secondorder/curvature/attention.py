r"""Attention kernels whose derivatives exist, for every forward pass of a curvature computation.

PyTorch's fused attention kernels (the CPU flash kernel behind
:func:`torch.nn.functional.scaled_dot_product_attention`, the CUDA flash / memory-efficient /
cuDNN kernels) have a first derivative but no second one, and no forward-mode rule: a double
backward (Hessian, GGN products through the graph of :math:`J^\top w`) or a ``torch.func``
transform through them fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The "math"
kernel computes the same attention,

.. math::
    \operatorname{softmax}\!\big(Q K^\top / \sqrt{d} + M\big) V,

from ordinary operations, so every derivative of any order exists. The fused fast paths of
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval mode
(``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``, taken without
gradient tracking) have no derivatives either, and round differently from the composite path.

:func:`differentiable_attention` selects the math kernel and turns the fast path off for the
duration of a block. :meth:`~secondorder.curvature.model.FunctionalModel.__call__`, through
which every curvature, gradient and loss evaluation of this library calls the model, enters it,
so attention works as the user wrote it without the user naming a kernel. Outside those calls
(the user's own training code) the kernels PyTorch picks are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["differentiable_attention"]


def _kernel_flags() -> list[tuple[Any, Any, bool]] | None:
    """``(get, set, wanted)`` for each scaled-dot-product-attention backend flag, or ``None``.

    The same flags :func:`torch.nn.attention.sdpa_kernel` sets, read and written directly
    (a tenth of its cost): the math kernel on, every fused kernel off.
    """
    names = {"cudnn": False, "flash": False, "mem_efficient": False, "overrideable": False}
    names["math"] = True
    try:
        return [
            (getattr(torch._C, f"_get_{n}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{n}"), w)
            for n, w in names.items()
        ]
    except AttributeError:  # pragma: no cover - another torch: no switch (first-order only)
        return None


_FLAGS = _kernel_flags()
_MHA = getattr(torch.backends, "mha", None)


class _DifferentiableAttention:
    """Context manager behind :func:`differentiable_attention` (reentrant, restores on exit)."""

    def __init__(self) -> None:
        self._depth = 0  # only the outermost block switches the (process-wide) flags
        self._saved: list[bool] = []
        self._fastpath = False

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        if _FLAGS is not None:
            self._saved = [get() for get, _, _ in _FLAGS]
            for (_, set_, wanted), now in zip(_FLAGS, self._saved):
                if now != wanted:
                    set_(wanted)
        self._fastpath = bool(_MHA.get_fastpath_enabled()) if _MHA is not None else False
        if self._fastpath:
            _MHA.set_fastpath_enabled(False)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if _FLAGS is not None:
            for (_, set_, wanted), before in zip(_FLAGS, self._saved):
                if before != wanted:
                    set_(before)
        if self._fastpath:
            _MHA.set_fastpath_enabled(True)  # type: ignore[union-attr]


_CONTEXT = _DifferentiableAttention()


def differentiable_attention() -> _DifferentiableAttention:
    """Run a ``with`` block with the math attention kernel and without the fused fast paths.

    Nested blocks cost nothing; the previous settings are restored when the outermost block
    exits (also on an exception).

    Returns:
        The context manager.
    """
    return _CONTEXT
