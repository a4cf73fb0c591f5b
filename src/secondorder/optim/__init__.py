"""torch.optim optimizers built from curvature operators and Krylov solvers."""

from .adaptive import RejectedStepWarning
from .base import CurvatureOptimizer, NonFiniteError, NonFiniteStepWarning
from .batchnorm import update_bn
from .block_newton import BlockDiagonalNewtonCG
from .damping import levenberg_marquardt, reduction_ratio
from .directional import ConstantDamping, DirectionalDampedNewton, TopK, constant_damping, top_k
from .hessian_free import HessianFree
from .kfac import KFACOptimizer
from .kfac_preconditioner import KFACPreconditioner
from .linesearch import LineSearchInfo, armijo_backtracking
from .newton_cg import GaussNewton, NaturalGradient, NewtonCG
from .preconditioner_mode import CurvaturePreconditioner

__all__ = [
    "BlockDiagonalNewtonCG",
    "ConstantDamping",
    "CurvatureOptimizer",
    "CurvaturePreconditioner",
    "DirectionalDampedNewton",
    "GaussNewton",
    "HessianFree",
    "KFACOptimizer",
    "KFACPreconditioner",
    "LineSearchInfo",
    "NaturalGradient",
    "NewtonCG",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "RejectedStepWarning",
    "TopK",
    "armijo_backtracking",
    "constant_damping",
    "levenberg_marquardt",
    "reduction_ratio",
    "top_k",
    "update_bn",
]
