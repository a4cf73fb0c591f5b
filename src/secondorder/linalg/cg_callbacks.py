r"""Application rules for :func:`~secondorder.linalg.cg` that come in through its callback.

:func:`~secondorder.linalg.cg` calls a callback with a parameter named ``intermediate_result``
(scipy.optimize's convention) as ``callback(intermediate_result=state)`` after every iteration,
with the :class:`CGState` of that iteration; a return value ``True`` stops the solve with
status ``CALLBACK``. Two rules of Hessian-free optimisation (Martens 2010) are such callbacks:

* :class:`MartensStop`, the relative-progress stopping rule on the quadratic model (§4.4);
* :class:`IterateGrid`, which keeps the iterates :math:`x_k` at :math:`k = \lceil\gamma^j\rceil`
  for CG backtracking (§4.6);

and :class:`CallbackList` runs several of them (it stops when any asks to).

References:
    J. Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.4 and §4.6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["CGState", "CallbackList", "IterateGrid", "MartensStop"]


@dataclass
class CGState:
    r"""The state of a :func:`~secondorder.linalg.cg` solve after iteration ``iteration``.

    Attributes:
        iteration: :math:`k \ge 1`, the number of steps taken.
        x: The iterate :math:`x_k` itself (not a copy): read it, never modify it, and clone
            what you keep; the next iteration updates it in place.
        residual_norms: :math:`\lVert r_j \rVert` for ``j = 0 .. k`` (the solve's own list).
        quadratic_values: :math:`\phi(x_j) = \tfrac12 x_j^\top A x_j - b^\top x_j` for
            ``j = 0 .. k`` (the solve's own list; do not modify).
        step_length: :math:`\alpha_k` of the step :math:`x_k = x_{k-1} + \alpha_k p_k`
            (negative along a direction of negative curvature with
            ``negative_curvature="continue"``).
        curvature: :math:`p_k^\top A p_k`.
    """

    iteration: int
    x: Tensor
    residual_norms: list[float]
    quadratic_values: list[float]
    step_length: float
    curvature: float

    @property
    def residual_norm(self) -> float:
        r""":math:`\lVert r_k \rVert`."""
        return self.residual_norms[-1]

    @property
    def quadratic_value(self) -> float:
        r""":math:`\phi(x_k)`."""
        return self.quadratic_values[-1]


def _check_float(value: Any, name: str, low: float, allow_inf: bool) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    finite = math.isfinite(out) or (allow_inf and out == math.inf)
    if isinstance(value, bool) or not (finite and out > low):
        bound = f"> {low:g}" + (" (inf allowed)" if allow_inf else ", finite")
        raise ValueError(f"{name} must be a float {bound}, got {value!r}")
    return out


class MartensStop:
    r"""Martens' relative-progress rule on CG's quadratic model, as a callback.

    With :math:`\phi_i = \phi(x_i)` from the solve, it asks to stop at iteration :math:`i` if

    .. math::

        i > k, \quad \phi_i < 0 \quad\text{and}\quad
        \frac{\phi_i - \phi_{i-k}}{\phi_i} < k\,\varepsilon,
        \qquad k = \max(10, \lceil i/10 \rceil).

    ``stopped_at`` holds the iteration where it asked to stop (``None`` before).

    Args:
        eps: :math:`\varepsilon > 0` (``inf`` allowed: stops at iteration 11 if
            :math:`\phi_{11} < 0`; default 5e-4, Martens 2010).

    Raises:
        ValueError: If ``eps`` is not a float ``> 0``.
    """

    def __init__(self, eps: float = 5e-4) -> None:
        self.eps = _check_float(eps, "eps", 0.0, allow_inf=True)
        self.stopped_at: int | None = None

    @staticmethod
    def window(i: int) -> int:
        """``k = max(10, ceil(i / 10))`` in exact integer arithmetic."""
        return max(10, -(-i // 10))

    def __call__(self, intermediate_result: CGState) -> bool:
        """Whether the rule stops the solve at this iteration."""
        i = intermediate_result.iteration
        phis = intermediate_result.quadratic_values
        k = self.window(i)
        phi = phis[i]
        stop = i > k and phi < 0 and (phi - phis[i - k]) / phi < k * self.eps
        if stop:
            self.stopped_at = i
        return stop


class IterateGrid:
    r"""Keeps copies of CG's iterates at :math:`k = \lceil \gamma^j \rceil`, as a callback.

    The snapshots ``(k, x_k, phi(x_k))`` serve CG backtracking (Martens 2010 §4.6). After the
    solve, :meth:`snapshots` adds the final iterate and returns them in increasing ``k``.
    With ``keep_before_negative=True`` it also keeps the last iterate before the first step
    along negative curvature (``step_length < 0``), what CG stopping there would have
    returned; it holds one extra vector for that until the first such step.
    It never asks to stop.

    Args:
        gamma: The grid ratio :math:`\gamma > 1` (default 1.3, Martens 2010).
        keep_before_negative: Also keep the iterate before the first negative direction.

    Raises:
        ValueError: If ``gamma`` is not a finite float ``> 1``.
    """

    def __init__(self, gamma: float = 1.3, *, keep_before_negative: bool = False) -> None:
        self.gamma = _check_float(gamma, "gamma", 1.0, allow_inf=False)
        self.keep_before_negative = keep_before_negative
        self.kept: list[tuple[int, Tensor, float]] = []
        self.before_negative: tuple[int, Tensor, float] | None = None
        self._j = 0
        self._next = 1
        self._previous: Tensor | None = None

    def grid(self, last: int) -> list[int]:
        r"""The grid points :math:`\lceil \gamma^j \rceil \le` ``last``, in increasing order."""
        points: list[int] = []
        j = 0
        while (k := math.ceil(self.gamma**j)) <= last:
            if not points or k != points[-1]:
                points.append(k)
            j += 1
        return points

    def __call__(self, intermediate_result: CGState) -> bool:
        """Keep ``x_k`` if ``k`` is on the grid (and watch for negative directions)."""
        state = intermediate_result
        i = state.iteration
        if self.keep_before_negative and self.before_negative is None:
            if state.step_length < 0 and i > 1 and self._previous is not None:
                self.before_negative = (i - 1, self._previous, state.quadratic_values[i - 1])
                self._previous = None
            elif self._previous is None:
                self._previous = state.x.clone()
            else:
                self._previous.copy_(state.x)
        if i == self._next:
            self.kept.append((i, state.x.clone(), state.quadratic_value))
            while self._next <= i:
                self._j += 1
                self._next = math.ceil(self.gamma**self._j)
        return False

    def snapshots(self, x: Tensor, info: Any) -> list[tuple[int, Tensor, float]]:
        """The kept iterates, with the solve's final one, in increasing ``k``.

        Args:
            x: The iterate :func:`~secondorder.linalg.cg` returned.
            info: Its :class:`~secondorder.linalg.cg.CGInfo` (``iterations`` and
                ``quadratic_values`` are read); snapshots beyond ``info.iterations`` (an
                overflow reset ``x`` to ``x0``) are dropped.

        Returns:
            ``[(k, x_k, phi(x_k)), ...]``, copies of the iterates.
        """
        last = info.iterations
        kept = [item for item in self.kept if item[0] <= last]
        if not kept or kept[-1][0] != last:
            kept.append((last, x.clone(), info.quadratic_values[-1]))
        extra = self.before_negative
        if extra is not None and all(k != extra[0] for k, _, _ in kept):
            kept.append(extra)
            kept.sort(key=lambda item: item[0])
        return kept


class CallbackList:
    """Several ``intermediate_result`` callbacks run in order; stops when any returns True.

    Every callback runs each iteration (a stopping one does not hide the others' view).

    Args:
        callbacks: Callables taking ``intermediate_result`` (a :class:`CGState`); ``None``
            entries are skipped.
    """

    def __init__(self, callbacks: Sequence[Callable[..., Any] | None]) -> None:
        self.callbacks = [cb for cb in callbacks if cb is not None]

    def __call__(self, intermediate_result: CGState) -> bool:
        """Run every callback; True if any returned True."""
        stop = False
        for cb in self.callbacks:
            stop = (cb(intermediate_result=intermediate_result) is True) or stop
        return stop
