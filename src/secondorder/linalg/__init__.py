"""Linear algebra on flat 1-D tensors: operators, Krylov solvers, estimators, preconditioners.

This layer knows nothing of neural networks; it imports only torch (and scipy lazily).
Modules: ``operator`` (LinearOperator and the atoms), ``combinators`` (sums, scalings,
products, adjoints), ``checks`` (argument checks), ``status`` (SolverStatus), ``cg`` and
``cg_callbacks``, ``block_cg``, ``krylov`` (orthonormal bases), ``tridiagonal``
(lanczos_tridiag), ``thick_restart`` and ``lanczos`` (eigenpairs), ``dense_eig``,
``estimators``, ``preconditioners`` (Jacobi; re-exports ``nystrom`` and ``pivoted_cholesky``).
"""

from .block_cg import BlockCGInfo, block_cg
from .cg import CGInfo, CGStatus, cg
from .cg_callbacks import CallbackList, CGState, IterateGrid, MartensStop
from .dense_eig import TopEigh, top_eigh
from .errors import NonFiniteError
from .estimators import (
    diagonal_estimate,
    hutchinson_trace,
    hutchpp_trace,
    slq_nodes_weights,
    spectral_density,
)
from .lanczos import LanczosDecomposition, LanczosInfo, eigmax, lanczos, lanczos_tridiag
from .operator import BlockDiagonal, Dense, Diagonal, Identity, LinearOperator, aslinearoperator
from .preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
)
from .status import SolverStatus

__all__ = [
    # errors
    "NonFiniteError",
    # operators
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "aslinearoperator",
    # solvers
    "SolverStatus",
    "CGInfo",
    "CGStatus",
    "cg",
    "CGState",
    "CallbackList",
    "IterateGrid",
    "MartensStop",
    "BlockCGInfo",
    "block_cg",
    # spectral tools
    "LanczosDecomposition",
    "LanczosInfo",
    "TopEigh",
    "top_eigh",
    "eigmax",
    "lanczos",
    "lanczos_tridiag",
    # estimators
    "diagonal_estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "slq_nodes_weights",
    "spectral_density",
    # preconditioners
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
]
