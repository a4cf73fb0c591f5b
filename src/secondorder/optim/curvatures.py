"""The curvature matrices an optimizer can take, built from one name: the one dispatch site."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..curvature import GGN, CurvatureOperator, Fisher, Hessian
from ..curvature.vocabulary import OPTIMIZER_CURVATURES

__all__ = ["CURVATURES", "build_curvature"]

CURVATURES = OPTIMIZER_CURVATURES


def build_curvature(
    kind: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: list[Tensor],
    *,
    generator: torch.Generator | None = None,
    **kw: Any,
) -> CurvatureOperator:
    """Build the curvature operator ``kind`` (one of :data:`CURVATURES`) on ``data``.

    ``jacobian_factors`` in ``kw`` goes to the GGN and Fisher operators (the Hessian has no
    such products); ``generator`` only to the Monte-Carlo Fisher.

    Raises:
        ValueError: For another ``kind``.
    """
    if kind == "hessian":
        kw.pop("jacobian_factors", None)
    if kind == "ggn":
        return GGN(model, loss_fn, data, params=params, **kw)
    if kind == "hessian":
        return Hessian(model, loss_fn, data, params=params, **kw)
    if kind == "fisher":
        return Fisher(model, loss_fn, data, kind="exact", params=params, **kw)
    if kind == "fisher_mc":
        return Fisher(model, loss_fn, data, kind="mc", params=params, generator=generator, **kw)
    if kind == "empirical_fisher":
        return Fisher(model, loss_fn, data, kind="empirical", params=params, **kw)
    check_choice("curvature", kind, CURVATURES)
    raise AssertionError  # unreachable: check_choice raised
