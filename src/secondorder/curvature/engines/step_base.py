r"""The base class of the graph's steps (the contract is in :mod:`.steps`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["Grads", "Step"]

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

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:
        """What :meth:`residual` needs at the gradient cotangent ``delta`` (None: no residual)."""
        return None

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
