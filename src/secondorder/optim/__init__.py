"""torch.optim optimizers built from curvature operators and Krylov solvers."""

from .base import CurvatureOptimizer, NonFiniteError, NonFiniteStepWarning
from .damping import levenberg_marquardt, reduction_ratio
from .hessian_free import HessianFree
from .linesearch import LineSearchInfo, armijo_backtracking
from .newton_cg import GaussNewton, NaturalGradient, NewtonCG

__all__ = [
    "CurvatureOptimizer",
    "GaussNewton",
    "HessianFree",
    "LineSearchInfo",
    "NaturalGradient",
    "NewtonCG",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "armijo_backtracking",
    "levenberg_marquardt",
    "reduction_ratio",
]
