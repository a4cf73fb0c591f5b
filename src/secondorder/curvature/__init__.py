"""Curvature matrices of (model, loss, data) as linear operators on the flat parameter vector."""

from .base import CurvatureOperator
from .blockwise import BlockDiagonalCurvature
from .diagonal import empirical_fisher_diagonal, ggn_diagonal, per_sample_gradient_diagonal
from .fisher import Fisher
from .ggn import GGN
from .hessian import Hessian
from .kfac import EKFAC, KFAC
from .linearization import EngineInfo
from .lowrank import LowRankGGN
from .model import Batch, FunctionalModel, as_batches
from .pch import PCH
from .per_sample import DiagonalInfo

__all__ = [
    "PCH",
    "BlockDiagonalCurvature",
    "GGN",
    "Batch",
    "CurvatureOperator",
    "DiagonalInfo",
    "EngineInfo",
    "Fisher",
    "FunctionalModel",
    "Hessian",
    "EKFAC",
    "KFAC",
    "LowRankGGN",
    "as_batches",
    "empirical_fisher_diagonal",
    "ggn_diagonal",
    "per_sample_gradient_diagonal",
]
