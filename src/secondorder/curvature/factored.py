r"""The fast path for MLPs: products through the output-Jacobian factors, selected explicitly.

:class:`FactoredLinearization` records an ``nn.Sequential`` MLP's layers in one forward pass
(:func:`~secondorder.curvature.sequential_ops.record_layer`: each Linear's input, each
activation's output or derivative) and computes :math:`Jv` and :math:`J^\top u` from the factors
:math:`B_l = \partial z / \partial y_l` of :mod:`~secondorder.curvature.jacobian_factors`
(built at the first product) instead of layer-by-layer sweeps. Same semantics as the reference,
the graph engine (:mod:`~secondorder.curvature.engines.graph`);
``tests/curvature/test_jacobian_factors.py`` checks every product equal to it. It is taken only
for ``jacobian_factors=True``; its measured gain is in ``BENCHMARKS.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activations import is_activation
from .jacobian_factors import JacobianFactors, Step
from .model import FunctionalModel
from .sequential_ops import FROM_OUTPUT, RESHAPES, record_layer

__all__ = ["FactoredLinearization"]


class FactoredLinearization:
    """An ``nn.Sequential`` MLP's linearisation whose products go through the Jacobian factors.

    Args:
        fmodel: The model as a function of its parameters (an ``nn.Sequential``).
        layers: Its leaf layers (:func:`~.sequential_ops.sequential_layers`).
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
        self.leaves = leaves
        frozen = fmodel.parameter_dict(leaves)
        steps: list[tuple[nn.Module, dict[str, Any]]] = []
        # an in-place layer could overwrite an activation's output kept for its derivative
        keep_outputs = not any(getattr(layer, "inplace", False) for _, layer in layers)
        x = inputs[0]
        with torch.no_grad():
            for prefix, layer in layers:
                x = record_layer(
                    steps, keep_outputs, layer, prefix, x, frozen, leaves, fmodel.alias
                )
        self.z = x
        # the lowest step holding a trainable parameter: the factors start there
        lowest = min(
            (
                k
                for k, (_, rec) in enumerate(steps)
                if rec.get("iw") is not None or rec.get("ib") is not None
            ),
            default=len(steps),
        )
        factors = JacobianFactors.plan(factor_steps(steps), self.z, lowest)
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
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        if not batched:
            bufs = [torch.zeros_like(self.leaves[i]) for i in idx]
            self.vjp_into(cotangent, bufs, idx)
            return bufs
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
