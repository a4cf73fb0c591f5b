"""secondorder: matrix-free second-order optimization for PyTorch.

Layers (imports point downwards only): ``linalg`` (operators, Krylov solvers, estimators,
preconditioners) <- ``curvature`` (Hessian, GGN, Fisher as operators) <- ``optim``
(torch.optim optimizers) <- ``experiments`` (the command line; nothing imports it).
"""

from .curvature import (
    EKFAC,
    GGN,
    KFAC,
    PCH,
    BlockDiagonalCurvature,
    CurvatureOperator,
    Fisher,
    FunctionalModel,
    Hessian,
    LowRankGGN,
    empirical_fisher_diagonal,
    ggn_diagonal,
)
from .curvature.sequence_loss import SequenceCrossEntropyLoss as SequenceCrossEntropyLoss
from .linalg import (
    BlockDiagonal,
    CGInfo,
    CGStatus,
    Dense,
    Diagonal,
    Identity,
    JacobiPreconditioner,
    LanczosInfo,
    LinearOperator,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    SolverStatus,
    aslinearoperator,
    cg,
    diagonal_estimate,
    eigmax,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_tridiag,
    spectral_density,
)
from .linalg import top_eigh as top_eigh
from .optim import (
    BlockDiagonalNewtonCG,
    CurvatureOptimizer,
    CurvaturePreconditioner,
    DirectionalDampedNewton,
    GaussNewton,
    HessianFree,
    KFACOptimizer,
    KFACPreconditioner,
    NaturalGradient,
    NewtonCG,
    NonFiniteError,
    NonFiniteStepWarning,
    RejectedStepWarning,
    update_bn,
)

__version__ = "0.1.0"

__all__ = [
    # linear operators
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "aslinearoperator",
    # curvature operators
    "GGN",
    "CurvatureOperator",
    "Fisher",
    "FunctionalModel",
    "Hessian",
    "EKFAC",
    "KFAC",
    "LowRankGGN",
    "PCH",
    "BlockDiagonalCurvature",
    "empirical_fisher_diagonal",
    "ggn_diagonal",
    # solvers and spectral tools
    "CGInfo",
    "CGStatus",
    "SolverStatus",
    "cg",
    "LanczosInfo",
    "eigmax",
    "lanczos",
    "lanczos_tridiag",
    # estimators
    "diagonal_estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "spectral_density",
    # preconditioners
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
    # optimizers
    "BlockDiagonalNewtonCG",
    "CurvatureOptimizer",
    "CurvaturePreconditioner",
    "DirectionalDampedNewton",
    "GaussNewton",
    "HessianFree",
    "KFACOptimizer",
    "KFACPreconditioner",
    "NaturalGradient",
    "NewtonCG",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "RejectedStepWarning",
    "update_bn",
    "__version__",
]
