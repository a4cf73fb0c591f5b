"""The one status type of every solver's result in :mod:`secondorder.linalg`.

:func:`~secondorder.linalg.cg`, :func:`~secondorder.linalg.block_cg` (one status per
system), :func:`~secondorder.linalg.lanczos` and :func:`~secondorder.linalg.top_eigh` say why
they stopped with a :class:`SolverStatus`. As in scipy, ``0`` (``SUCCESS``) means the
requested tolerance was met; every other value is a reason the solve stopped early, and
:attr:`SolverStatus.message` says what to try (as lineax's ``RESULTS``). The info objects keep
their own fields and a ``message`` with the numbers of the run.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["SolverStatus"]


class SolverStatus(IntEnum):
    """Why a solver stopped; ``0`` means the requested tolerance was met.

    Attributes:
        CONVERGED: The requested tolerance was met (alias ``SUCCESS``).
        MAXITER: The iteration budget ran out before the tolerance was met.
        NEGATIVE_CURVATURE: A search direction ``p`` had non-positive curvature ``p^T A p``:
            the matrix is not positive definite along ``p``.
        NONFINITE: A NaN or Inf appeared in a product, a step or the input.
        CALLBACK: The user's callback asked to stop (returned ``True``); application rules
            such as Martens' relative-progress rule stop CG this way (alias ``MARTENS``).
        INDEFINITE_PRECONDITIONER: ``r^T M^{-1} r <= 0`` for a non-zero residual: the
            preconditioner is not positive definite.
        BREAKDOWN: The curvature ``p^T A p`` was exactly zero (the direction is in the null
            space of ``A``); no step is possible.
    """

    CONVERGED = 0
    MAXITER = 1
    NEGATIVE_CURVATURE = 2
    NONFINITE = 3
    CALLBACK = 4
    INDEFINITE_PRECONDITIONER = 5
    BREAKDOWN = 6
    # aliases (the same members under older or scipy-like names)
    SUCCESS = 0
    MARTENS = 4

    @property
    def message(self) -> str:
        """A sentence saying what the status means and what to try."""
        return _MESSAGES[self]

    @property
    def success(self) -> bool:
        """Whether the solver met a requested stopping rule (``CONVERGED`` or ``CALLBACK``)."""
        return self in (SolverStatus.CONVERGED, SolverStatus.CALLBACK)


_MESSAGES = {
    SolverStatus.CONVERGED: "converged: the requested tolerance was met.",
    SolverStatus.MAXITER: "the iteration budget ran out before the tolerance was met; try a "
    "larger maxiter, a preconditioner, more damping, or a looser tolerance.",
    SolverStatus.NEGATIVE_CURVATURE: "non-positive curvature p^T A p: the matrix is not "
    "positive definite along p; add damping (A + lam*I) or use a positive semi-definite "
    "curvature (GGN, Fisher).",
    SolverStatus.NONFINITE: "a NaN or Inf appeared; check the operator and the right-hand side "
    "for NaN/Inf, or use float64.",
    SolverStatus.CALLBACK: "stopped because the callback returned True (e.g. Martens' "
    "relative-progress rule).",
    SolverStatus.INDEFINITE_PRECONDITIONER: "r^T M^-1 r <= 0 for a non-zero residual: the "
    "preconditioner is not positive definite; check M or drop it.",
    SolverStatus.BREAKDOWN: "zero curvature p^T A p = 0: the search direction lies in the null "
    "space of A; add damping (A + lam*I).",
}
