"""Linear algebra on flat 1-D tensors: operators, Krylov solvers, estimators, preconditioners.

This layer knows nothing of neural networks; it imports only torch (and scipy lazily).
"""

from .operator import BlockDiagonal, Dense, Diagonal, Identity, LinearOperator, aslinearoperator

__all__ = [
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "aslinearoperator",
]
