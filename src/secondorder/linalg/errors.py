"""The exception that the linear-algebra layer raises for NaN/Inf.

Functions that return an info object (:func:`~secondorder.linalg.cg`,
:func:`~secondorder.linalg.block_cg`, :func:`~secondorder.linalg.lanczos` with
``return_info=True``) report a NaN/Inf in the operator's products or in their input in that
object (``status`` ``SolverStatus.NONFINITE``) and never raise for it. Functions that return
only numbers (:func:`~secondorder.linalg.eigmax`, :func:`~secondorder.linalg.lanczos` without
``return_info``, :func:`~secondorder.linalg.lanczos_tridiag`, :func:`~secondorder.linalg.top_eigh`
and the estimators) raise :class:`NonFiniteError` instead of returning NaN or failing inside a
LAPACK routine.
"""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN or Inf in an operator's products or in an input vector.

    A subclass of both ``FloatingPointError`` (numerical trouble) and ``ValueError`` (bad
    input), so either ``except`` clause catches it.
    """
