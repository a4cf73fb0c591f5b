r"""The fast path for MLPs: products through the output-Jacobian factors, selected explicitly.

:class:`FactoredLinearization` is :class:`~secondorder.curvature.sequential.
SequentialLinearization` with :math:`Jv` and :math:`J^\top u` computed from the factors
:math:`B_l = \partial z / \partial y_l` of :mod:`~secondorder.curvature.jacobian_factors`
(built at the first product) instead of the layer-by-layer sweeps. Same semantics as the
reference; ``tests/curvature/test_jacobian_factors.py`` checks every product equal to it.
It is taken only for ``jacobian_factors=True``; its measured gain is in ``BENCHMARKS.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activations import is_activation
from .jacobian_factors import JacobianFactors, Step
from .model import FunctionalModel
from .sequential import SequentialLinearization
from .sequential_ops import FROM_OUTPUT, RESHAPES

__all__ = ["FactoredLinearization"]


class FactoredLinearization(SequentialLinearization):
    """A :class:`SequentialLinearization` whose products go through the Jacobian factors.

    Args:
        fmodel: The model as a function of its parameters (an ``nn.Sequential``).
        layers: Its leaf layers from :func:`~secondorder.curvature.sequential.sequential_layers`.
        inputs: A single input tensor in a tuple.
        leaves: Tensors holding the parameter values.

    Raises:
        ValueError: If the network does not qualify (see :meth:`JacobianFactors.plan`).
    """

    path = "factored"

    def __init__(
        self,
        fmodel: FunctionalModel,
        layers: list[tuple[str, nn.Module]],
        inputs: tuple[Any, ...],
        leaves: list[Tensor],
    ) -> None:
        super().__init__(fmodel, layers, inputs, leaves)
        factors = JacobianFactors.plan(factor_steps(self._steps), self.z, min(self._lowest_step))
        if factors is None:
            raise ValueError(
                "jacobian_factors=True needs an nn.Sequential whose trainable layers are "
                "Linear layers on 2-D inputs, with only elementwise activations above the "
                "lowest of them, 2-D outputs, and a trainable layer below the top one"
            )
        self.factors = factors

    def _built(self) -> JacobianFactors:
        if self.factors.B is None:
            self.factors.build()
        return self.factors

    def jvp(self, tangents: Sequence[Tensor | None], batched: bool = False) -> Tensor | None:
        r"""Return :math:`Jv` (shape of ``z``; ``(K, *z.shape)`` when batched), or None if zero."""
        with torch.no_grad():
            return self._built().jvp(tangents, batched)

    def vjp_into(
        self, cotangent: Tensor, out: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        r"""Add :math:`J^\top u` into ``out`` (one tensor per requested parameter) in place.

        Args:
            cotangent: ``u``, shape of ``z``.
            out: Buffers in the requested parameters' shapes, accumulated into.
            indices: Requested parameters (default all).
        """
        with torch.no_grad():
            self._built().vjp_into(cotangent, out, indices)

    def vjp(
        self, cotangent: Tensor, indices: Sequence[int] | None = None, batched: bool = False
    ) -> list[Tensor]:
        r"""Return :math:`J^\top u` as new tensors in parameter shapes (``(K, ...)`` if batched).

        Args:
            cotangent: ``u``, shape of ``z`` (or ``(K, *z.shape)``).
            indices: Parameters to return (default all).
            batched: Whether ``cotangent`` carries a leading column dimension.

        Returns:
            One tensor per requested parameter.
        """
        if not batched:
            return super().vjp(cotangent, indices, batched)  # through vjp_into above
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        K = cotangent.shape[0]
        bufs = [self.leaves[i].new_zeros(K, *self.leaves[i].shape) for i in idx]
        with torch.no_grad():
            self._built().vjp_batched(cotangent, dict(zip(idx, bufs)))
        return bufs


def factor_steps(steps: list[tuple[nn.Module, dict[str, Any]]]) -> list[Step]:
    """The recorded steps as the output-Jacobian factors see them (:data:`Step`)."""
    out: list[Step] = []
    for layer, rec in steps:
        t = type(layer)
        if t is nn.Linear and rec["x"].ndim == 2:
            out.append(("linear", rec))
        elif is_activation(layer):
            out.append(("activation", _derivative_multiplier(layer, rec)))
        elif isinstance(layer, nn.Dropout) or (
            isinstance(layer, RESHAPES) and rec["in_shape"] == rec["out_shape"]
        ):
            out.append(("identity", None))
        else:
            out.append((None, None))
    return out


def _derivative_multiplier(layer: nn.Module, rec: dict[str, Any]) -> tuple[Any, Any]:
    r"""Two ``(g, out) -> g \odot \sigma'`` (into ``out`` if given).

    The first takes ``g`` of shape ``(N, R, width)``, the second ``(..., N, width)``.
    """

    def multiply(g: Tensor, out: Tensor | None, rows: bool) -> Tensor:
        s = rec.get("s")
        if s is not None:
            return FROM_OUTPUT[type(layer)][1](g, s.unsqueeze(1) if rows else s, out)
        d = rec["d"].unsqueeze(1) if rows else rec["d"]
        return torch.mul(g, d) if out is None else torch.mul(g, d, out=out)

    return (
        lambda g, out: multiply(g, out, True),
        lambda g, out: multiply(g, out, False),
    )
