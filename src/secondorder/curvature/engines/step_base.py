r"""The base class of the graph's steps (the contract is in :mod:`.steps`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["Grads", "Step", "accumulate"]

Grads = dict[int, Tensor]


class Step:
    """Base class of the steps (the contract: :mod:`.steps`)."""

    inputs: list[Any]  # active input nodes, one per edge
    name: str = ""
    kind: str = ""

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:
        """Output tangent from the input and parameter tangents."""
        raise NotImplementedError

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:
        """Input cotangents from the output cotangent; parameter cotangents into ``grads``."""
        raise NotImplementedError

    #: Whether the step is linear in its inputs and parameters jointly (sums, concatenations,
    #: reshapes, linear functions): its residual vanishes. A step that is not linear must
    #: implement :meth:`prepare_residual` and :meth:`residual`; the default refuses rather than
    #: take a nonlinear step's second derivative for zero.
    linear: bool = False

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:
        """What :meth:`residual` needs at the gradient cotangent ``delta`` (None: no residual).

        Raises:
            NotImplementedError: For a step that is not :attr:`linear` and has no residual.
        """
        if self.linear:
            return None
        raise NotImplementedError(
            f"{type(self).__name__} has no second-derivative (residual) term; the Hessian "
            "cannot be computed through it"
        )

    def residual(
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        """Residual cotangents of the active inputs; parameter residuals into ``grads``."""
        return [None] * len(self.inputs)


def accumulate(a: Any, b: Any) -> Any:
    """``a + b`` for cotangents: ``None`` is zero, tuples (of tuple-valued nodes) add entrywise."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(accumulate(x, y) for x, y in zip(a, b))
    return a + b
