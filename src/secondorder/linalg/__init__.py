"""Linear algebra on flat 1-D tensors: operators, Krylov solvers, estimators, preconditioners.

This layer knows nothing of neural networks; it imports only torch (and scipy lazily).
"""

from .cg import CGInfo, CGStatus, cg
from .operator import BlockDiagonal, Dense, Diagonal, Identity, LinearOperator, aslinearoperator
from .preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
)

__all__ = [
    # operators
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "aslinearoperator",
    # solvers
    "CGInfo",
    "CGStatus",
    "cg",
    # preconditioners
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
]
