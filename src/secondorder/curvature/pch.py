"""The positive-curvature Hessian (PCH) as a block-diagonal operator.

The modified double backward that serves models other than an ``nn.Sequential`` is in
:mod:`~secondorder.curvature.pch_mode`.
"""

from __future__ import annotations

from typing import Any

from .._checks import check_choice
from .blockwise import BlockDiagonalCurvature
from .pch_mode import MODIFICATIONS, positive_curvature_mode

__all__ = ["MODIFICATIONS", "PCH", "positive_curvature_mode"]


class PCH(BlockDiagonalCurvature):
    r"""The positive-curvature Hessian: block-diagonal, one exact block per parameter tensor.

    .. math::

        C_{\theta_j} = \sum_b w_b\, J_{\theta_j,b}^\top H^{\rho}_{z_j,b} J_{\theta_j,b},

    the Hessian's diagonal blocks with every activation's residual
    :math:`\operatorname{diag}(\delta \odot f'')` replaced by its positive part (``"clip"``)
    or its absolute value (``"abs"``); positive semi-definite for a convex loss. This is
    :class:`~secondorder.curvature.blockwise.BlockDiagonalCurvature` with
    ``curvature="pch_" + modify``: the module-wise engine for an ``nn.Sequential``, the
    Hessian's modified residual terms (``Hessian(..., modify=)``: the graph engine's rules, or
    the modified double backward of :func:`positive_curvature_mode` where it falls back) for
    other modules.

    Args:
        model: The network.
        loss_fn: The loss.
        data: One batch or an iterable of batches.
        modify: ``"clip"`` or ``"abs"`` (default: ``"clip"``).
        **kwargs: ``params`` and ``engine`` of ``BlockDiagonalCurvature``.

    Raises:
        ValueError: For another ``modify``.
    """

    def __init__(
        self, model: Any, loss_fn: Any, data: Any, *, modify: str = "clip", **kwargs: Any
    ) -> None:
        check_choice("modify", modify, MODIFICATIONS)
        super().__init__(model, loss_fn, data, curvature=f"pch_{modify}", **kwargs)
