"""secondorder: matrix-free second-order optimization for PyTorch.

Layers (imports point downwards only): ``linalg`` (operators, Krylov solvers, estimators,
preconditioners) <- ``curvature`` (Hessian, GGN, Fisher as operators) <- ``optim``
(torch.optim optimizers) <- ``experiments`` (the command line; nothing imports it).
"""

from .curvature import GGN, CurvatureOperator, Fisher, FunctionalModel, Hessian
from .linalg import (
    BlockDiagonal,
    CGInfo,
    CGStatus,
    Dense,
    Diagonal,
    Identity,
    JacobiPreconditioner,
    LinearOperator,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    aslinearoperator,
    cg,
)
from .optim import (
    CurvatureOptimizer,
    GaussNewton,
    NaturalGradient,
    NewtonCG,
    NonFiniteError,
    NonFiniteStepWarning,
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
    # solvers and spectral tools
    "CGInfo",
    "CGStatus",
    "cg",
    # preconditioners
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
    # optimizers
    "CurvatureOptimizer",
    "GaussNewton",
    "NaturalGradient",
    "NewtonCG",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "__version__",
]
