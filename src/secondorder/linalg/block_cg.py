r"""Lock-step conjugate gradient for several independent systems sharing one batched product.

Block-diagonal Newton methods solve one system per parameter block; one application of the
block-diagonal operator can serve every block at once. :func:`block_cg` runs the systems'
CG recurrences side by side, one batched call per iteration, each system with its own step
lengths, tolerances and stopping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .checks import residual_threshold
from .precision import full_precision
from .status import SolverStatus

__all__ = ["BlockCGInfo", "block_cg"]


@dataclass
class BlockCGInfo:
    r"""What happened in a :func:`block_cg` solve, one entry per system.

    Attributes:
        iterations: CG iterations per system.
        residual_norms: The last (recursively updated) residual norm per system.
        tolerances: ``max(rtol * norm(b_i), atol)`` per system.
        status: Why each system stopped, a :class:`~secondorder.linalg.status.SolverStatus`:
            ``CONVERGED`` (``norm(r) <= tol``), ``MAXITER``, ``NEGATIVE_CURVATURE``
            (``p^T A p < 0`` with ``negative_curvature="stop"``), ``BREAKDOWN``
            (``p^T A p == 0``) or ``NONFINITE`` (a NaN/Inf appeared).
        sweeps: Number of batched operator applications (the largest iteration count).
        negative_curvature: Per system, whether any search direction had ``p^T A p <= 0``.
        rhs_norms: :math:`\|b_i\|_2` per system (NaN or Inf where ``b_i`` is not finite).
    """

    iterations: list[int]
    residual_norms: list[float]
    tolerances: list[float]
    status: list[SolverStatus]
    sweeps: int = 0
    negative_curvature: list[bool] = field(default_factory=list)
    rhs_norms: list[float] = field(default_factory=list)

    @property
    def converged(self) -> list[bool]:
        """Per system, whether the residual tolerance was met."""
        return [s == SolverStatus.CONVERGED for s in self.status]

    @property
    def message(self) -> str:
        """One line per system that did not converge, saying why and what to try."""
        lines = [
            f"system {i}: {s.name} after {it} iterations (residual {res:.3e} > tol {tol:.3e}): "
            f"{s.message}"
            for i, (s, it, res, tol) in enumerate(
                zip(self.status, self.iterations, self.residual_norms, self.tolerances)
            )
            if s != SolverStatus.CONVERGED
        ]
        return "\n".join(lines) if lines else "every system converged."


def _per_system(value: Any, n: int, name: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: expected one value per system ({n}), got {len(values)}")
    return values


@full_precision
def block_cg(
    apply: Callable[[list[int], list[Tensor]], list[Tensor]],
    b: Sequence[Tensor] | Tensor,
    *,
    sizes: Sequence[int] | None = None,
    shift: float | Sequence[float] = 0.0,
    rtol: float | Sequence[float] = 1e-5,
    atol: float | Sequence[float] = 0.0,
    maxiter: int | Sequence[int] = 20,
    negative_curvature: str = "continue",
    out: Tensor | None = None,
) -> tuple[list[Tensor], BlockCGInfo]:
    r"""Solve :math:`(A_i + \lambda_i I) x_i = b_i` for several systems by CG in lock-step.

    Every iteration makes one call ``apply(indices, vectors)`` that returns
    :math:`A_i p_i` for all systems still running (with
    :meth:`BlockDiagonalCurvature.apply_blocks`, one sweep through the network serves every
    block), while each system keeps its own step lengths, stops on its own rule

    .. math::

        \|r_i\|_2 \le \max(\mathrm{rtol}_i \|b_i\|_2,\ \mathrm{atol}_i)
        \quad\text{(checked before the first iteration too)}

    or after ``maxiter_i`` iterations, and then drops out of the calls. The iterates equal
    those of :func:`~secondorder.linalg.cg` on each system separately (up to rounding).

    With ``negative_curvature="continue"`` (plain CG, as BackPACK's CG-Newton example) a
    direction with :math:`p^\top (A + \lambda I) p \le 0` is still stepped along with the
    (negative) step length :math:`r^\top r / p^\top A p`; with ``"stop"`` the system stops and
    keeps its last iterate. A zero or non-finite curvature stops the system either way.

    Args:
        apply: ``apply(indices, vectors) -> products`` for lists of system indices and
            vectors (without the shift).
        b: Right-hand sides, tensors of any shapes; ``apply`` gets the vectors of system
            ``i`` in the shape of ``b[i]`` and returns its products in that shape (or flat).
            Or one flat tensor holding them all, cut by ``sizes`` (the blocks of a parameter
            vector).
        sizes: With a flat ``b``: the systems' lengths, in order, summing to ``b.numel()``.
        shift: :math:`\lambda_i` (a float for all systems, or one per system).
        rtol: Relative tolerance(s), ``>= 0`` (``inf``: the system stops at once with ``x = 0``).
        atol: Absolute tolerance(s), ``>= 0`` (``inf`` likewise).
        maxiter: Maximal iterations (``>= 0``), for all or per system.
        negative_curvature: ``"continue"`` or ``"stop"``.
        out: Optional flat buffer for the solutions: a 1-D tensor of length
            :math:`\sum_i` ``b[i].numel()`` with the dtype and device of the ``b_i`` (which must
            share them); the solutions are written into it, concatenated in order, and the
            returned ``x`` are views of it.

    Returns:
        ``(x, info)``: the solutions in the shapes of the ``b_i`` (new tensors, or views of
        ``out``) and a :class:`BlockCGInfo`.

    Raises:
        ValueError: For invalid tolerances, ``maxiter``, ``negative_curvature``, lists of
            the wrong length, or an ``out`` of the wrong shape, dtype or device.

    Example:
        >>> import torch
        >>> from secondorder.linalg.block_cg import block_cg
        >>> A = [torch.tensor([[4.0, 1.0], [1.0, 3.0]]), torch.tensor([[2.0]])]
        >>> b = [torch.tensor([1.0, 2.0]), torch.tensor([4.0])]
        >>> x, info = block_cg(lambda idx, vs: [A[i] @ v for i, v in zip(idx, vs)], b, rtol=1e-8)
        >>> info.status, torch.allclose(x[1], torch.tensor([2.0]))
        ([<SolverStatus.CONVERGED: 0>, <SolverStatus.CONVERGED: 0>], True)
    """
    flat_b: Tensor | None = None
    if isinstance(b, Tensor):
        if sizes is None or b.ndim != 1 or any(int(k) < 0 for k in sizes):
            raise ValueError(
                "b: a single tensor must be 1-D and come with `sizes` (the systems' lengths), "
                f"got shape {tuple(b.shape)} and sizes={sizes!r}"
            )
        sizes = [int(k) for k in sizes]
        if sum(sizes) != b.numel():
            raise ValueError(
                f"sizes: expected lengths summing to b.numel() = {b.numel()}, "
                f"got {sizes} (sum {sum(sizes)})"
            )
        flat_b, n = b, len(sizes)
    elif sizes is not None:
        raise ValueError("sizes: only for a flat b (one tensor); got a sequence of tensors")
    else:
        n = len(b)
    if negative_curvature not in ("continue", "stop"):
        raise ValueError(
            f"negative_curvature must be 'continue' or 'stop', got {negative_curvature!r}"
        )
    shifts = [float(s) for s in _per_system(shift, n, "shift")]
    rtols = [float(s) for s in _per_system(rtol, n, "rtol")]
    atols = [float(s) for s in _per_system(atol, n, "atol")]
    maxiters = _per_system(maxiter, n, "maxiter")
    for name, vals in (("rtol", rtols), ("atol", atols)):
        if any(not v >= 0 for v in vals):
            raise ValueError(f"{name} must be >= 0 (inf allowed), got {vals}")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in maxiters):
        raise ValueError(f"maxiter must be an int >= 0, got {maxiters}")
    stop_negative = negative_curvature == "stop"
    ref: Tensor | None
    systems: Sequence[Tensor] = () if flat_b is not None else b  # type: ignore[assignment]
    if flat_b is not None:
        assert sizes is not None  # a list of ints, checked above
        shared, flat_shapes, ref = True, True, flat_b
    else:
        shared = bool(n) and len({(bi.dtype, bi.device) for bi in systems}) == 1
        sizes = [bi.numel() for bi in systems]
        # CG works on 1-D views; systems with shaped b see their vectors in b's shapes in
        # `apply` and get x in them
        flat_shapes = all(bi.ndim == 1 for bi in systems)
        ref = systems[0] if n else None
    if out is not None:
        expected = (sum(sizes),)
        if not (
            isinstance(out, Tensor)
            and shared
            and ref is not None
            and tuple(out.shape) == expected
            and out.dtype == ref.dtype
            and out.device == ref.device
        ):
            got = (
                f"shape {tuple(out.shape)}, {out.dtype} on {out.device}"
                if isinstance(out, Tensor)
                else type(out).__name__
            )
            want = (
                f"{ref.dtype} on {ref.device}"
                if shared and ref is not None
                else "b sharing one dtype and device"
            )
            raise ValueError(f"out: expected a 1-D tensor of shape {expected}, {want}; got {got}")
    if shared:
        # every system's vectors are views of one flat buffer each: three allocations, not 3n
        if flat_b is not None:
            flat_r = flat_b.detach().clone()
        else:
            flat_r = torch.cat([bi.detach().reshape(-1) for bi in systems])
        flat_x = flat_r.new_zeros(flat_r.shape) if out is None else out.zero_()  # x_0 = 0
        flat_p = flat_r.clone()
        x, p = (list(v.split(sizes)) for v in (flat_x, flat_p))
        r = list(flat_r.split(sizes))
    else:
        r = [bi.detach().reshape(-1).clone() for bi in systems]
        x = [torch.zeros_like(ri) for ri in r]
        p = [ri.clone() for ri in r]
    p_seen = p if flat_shapes else [pi.view(bi.shape) for pi, bi in zip(p, systems)]
    rr = [torch.dot(ri, ri).item() for ri in r]
    rhs_norms = [math.sqrt(v) if v >= 0 else math.nan for v in rr]
    tol = [
        residual_threshold(rt, math.sqrt(v), at) if math.isfinite(v) else at
        for rt, at, v in zip(rtols, atols, rr)
    ]
    iterations = [0] * n
    status: list[SolverStatus | None] = [None] * n  # None while the system runs
    negative = [False] * n
    for i in range(n):
        if not math.isfinite(rr[i]):
            status[i] = SolverStatus.NONFINITE
        elif math.sqrt(rr[i]) <= tol[i]:
            status[i] = SolverStatus.CONVERGED
        elif maxiters[i] == 0:
            status[i] = SolverStatus.MAXITER
    active = [i for i in range(n) if status[i] is None]
    sweeps = 0
    while active:
        sweeps += 1
        p_active = [p[i] for i in active]
        if flat_shapes:
            ap = apply(active, p_active)
        else:
            ap = [a.reshape(-1) for a in apply(active, [p_seen[i] for i in active])]
        for i, a in zip(active, ap):
            if shifts[i] != 0.0:
                a.add_(p[i], alpha=shifts[i])
        pap = [torch.dot(pi, a).item() for pi, a in zip(p_active, ap)]
        stepped = []
        for i, a, curv in zip(active, ap, pap):
            if curv <= 0:
                negative[i] = True
            if not math.isfinite(curv):
                status[i] = SolverStatus.NONFINITE
            elif curv == 0.0:
                status[i] = SolverStatus.BREAKDOWN
            elif curv < 0 and stop_negative:
                status[i] = SolverStatus.NEGATIVE_CURVATURE
            else:
                alpha = rr[i] / curv
                x[i].add_(p[i], alpha=alpha)
                r[i].sub_(a, alpha=alpha)
                stepped.append(i)
        if stepped:
            rr_new = [torch.dot(r[i], r[i]).item() for i in stepped]
            for i, value in zip(stepped, rr_new):
                iterations[i] += 1
                if not math.isfinite(value):
                    status[i] = SolverStatus.NONFINITE
                elif math.sqrt(value) <= tol[i]:
                    status[i] = SolverStatus.CONVERGED
                elif iterations[i] >= maxiters[i]:
                    status[i] = SolverStatus.MAXITER
                else:
                    torch.add(r[i], p[i], alpha=value / rr[i], out=p[i])  # p = r + beta p
                rr[i] = value
        active = [i for i in active if status[i] is None]
    info = BlockCGInfo(
        iterations=iterations,
        residual_norms=[math.sqrt(v) if v >= 0 else math.nan for v in rr],
        tolerances=tol,
        status=[s if s is not None else SolverStatus.MAXITER for s in status],
        sweeps=sweeps,
        negative_curvature=negative,
        rhs_norms=rhs_norms,
    )
    return (x if flat_shapes else [xi.view(bi.shape) for xi, bi in zip(x, systems)]), info
