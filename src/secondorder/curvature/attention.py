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

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["differentiable_attention"]

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch without torch.nn.attention
    SDPBackend = None  # type: ignore[assignment,misc]
    sdpa_kernel = None  # type: ignore[assignment]

_depth = 0  # nesting depth: only the outermost block switches the (process-wide) flags


def _fastpath_enabled() -> bool:
    mha = getattr(torch.backends, "mha", None)
    return bool(mha.get_fastpath_enabled()) if mha is not None else False


def _set_fastpath(enabled: bool) -> None:
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run the block with the math attention kernel and without the fused attention fast paths.

    Nested blocks cost nothing; the previous settings are restored when the outermost block
    exits (also on an exception).

    Yields:
        None.
    """
    global _depth
    if _depth > 0:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    fastpath = _fastpath_enabled()
    kernel = sdpa_kernel([SDPBackend.MATH]) if sdpa_kernel is not None else None
    _depth += 1
    try:
        if fastpath:
            _set_fastpath(False)
        if kernel is not None:
            with kernel:
                yield
        else:  # pragma: no cover
            yield
    finally:
        _depth -= 1
        if fastpath:
            _set_fastpath(True)
