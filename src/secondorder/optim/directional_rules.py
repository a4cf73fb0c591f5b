"""The choices of :class:`~secondorder.optim.directional.DirectionalDampedNewton`.

Which eigendirections to step along (a *criterion*, :class:`TopK`) and how much to damp each
(a *damping*, :class:`ConstantDamping`), and how both travel in a ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive

__all__ = ["ConstantDamping", "Criterion", "Damping", "TopK", "constant_damping", "top_k"]

Criterion = Callable[[Tensor], Any]
Damping = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class TopK:
    """Criterion choosing the ``k`` largest eigenvalues (all of them if there are fewer).

    It declares ``num_leading = k``: it looks at, and chooses among, the ``k`` largest
    eigenvalues only, so :class:`DirectionalDampedNewton` computes just those eigenpairs
    (:meth:`~secondorder.curvature.lowrank.LowRankGGN.leading_eigh`) and passes them.

    Args:
        k: Number of directions.

    Raises:
        ValueError: If ``k`` is not a positive int.
    """

    def __init__(self, k: int) -> None:
        check_positive("k", k, integer=True)
        self.k = k

    @property
    def num_leading(self) -> int:
        """The number of leading eigenvalues this criterion needs: ``k``."""
        return self.k

    def __call__(self, evals: Tensor) -> list[int]:
        """Return the positions of the ``k`` largest of the ascending ``evals``.

        Args:
            evals: Gram eigenvalues in ascending order (all ``D``, or the leading ones).

        Returns:
            Indices into ``evals``.
        """
        D = evals.numel()
        return list(range(D - min(self.k, D), D))

    def __repr__(self) -> str:
        return f"top_k({self.k})"


class ConstantDamping:
    r"""Damping :math:`\delta_k = \delta` for every direction.

    Args:
        delta: The damping, a finite number >= 0.

    Raises:
        ValueError: If ``delta`` is negative or not finite.
    """

    def __init__(self, delta: float) -> None:
        check_positive("damping", delta, allow_zero=True)
        self.delta = float(delta)

    def __call__(self, evals: Tensor, evecs: Tensor, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """Return the damping of each direction.

        Args:
            evals: Chosen GGN eigenvalues, shape ``(K,)``.
            evecs: Their Gram-matrix eigenvectors, shape ``(D, K)``.
            gammas: Per-sample directional gradients, shape ``(N, K)``.
            lambdas: Per-sample directional curvatures, shape ``(N, K)``.

        Returns:
            Shape ``(K,)``.
        """
        return torch.full_like(evals, self.delta)

    def __repr__(self) -> str:
        return f"constant_damping({self.delta})"


def top_k(k: int) -> TopK:
    """Criterion choosing the ``k`` largest eigenvalues (see :class:`TopK`).

    Args:
        k: Number of directions.

    Returns:
        The criterion.
    """
    return TopK(k)


def constant_damping(delta: float) -> ConstantDamping:
    """Constant damping ``delta`` along every direction (see :class:`ConstantDamping`).

    Args:
        delta: The damping.

    Returns:
        The damping callable.
    """
    return ConstantDamping(delta)


def _as_damping(value: Any, where: str) -> Damping:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return constant_damping(value)
    if not callable(value):
        raise TypeError(
            f"{where}: damping must be a number or a callable (evals, evecs, gammas, lambdas) "
            f"-> (K,) tensor, got {type(value).__name__}"
        )
    return value


def _encode_group(group: dict[str, Any]) -> dict[str, Any]:
    """A param group of :meth:`DirectionalDampedNewton.state_dict` with plain data only."""
    out = dict(group)
    criterion, damping = group.get("criterion"), group.get("damping")
    if isinstance(criterion, TopK):
        out["criterion"] = {"top_k": criterion.k}
    elif criterion is not None and not isinstance(criterion, dict):
        out["criterion"] = {"callable": repr(criterion)}
    if isinstance(damping, ConstantDamping):
        out["damping"] = {"constant_damping": damping.delta}
    elif damping is not None and not isinstance(damping, (dict, int, float)):
        out["damping"] = {"callable": repr(damping)}
    return out


def _decode_group(group: Any, current: dict[str, Any] | None) -> Any:
    """Undo :func:`_encode_group`; a stored custom callable becomes ``current``'s own."""
    if not isinstance(group, dict):
        return group
    out = dict(group)
    for key in ("criterion", "damping"):
        value = group.get(key)
        if not isinstance(value, dict):
            continue
        if "top_k" in value:
            out[key] = TopK(value["top_k"])
        elif "constant_damping" in value:
            out[key] = ConstantDamping(value["constant_damping"])
        elif "callable" in value and current is not None:
            out[key] = current[key]
        else:
            raise ValueError(
                f"DirectionalDampedNewton.load_state_dict: cannot read the stored {key} {value!r}"
            )
    return out
