"""torch.optim optimizers built from curvature operators and Krylov solvers."""

from .base import CurvatureOptimizer, NonFiniteError, NonFiniteStepWarning
from .newton_cg import GaussNewton, NaturalGradient, NewtonCG

__all__ = [
    "CurvatureOptimizer",
    "GaussNewton",
    "NaturalGradient",
    "NewtonCG",
    "NonFiniteError",
    "NonFiniteStepWarning",
]
