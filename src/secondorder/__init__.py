"""secondorder: matrix-free second-order optimization for PyTorch."""

from .linalg import BlockDiagonal, Dense, Diagonal, Identity, LinearOperator, aslinearoperator

__version__ = "0.1.0"

__all__ = [
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "__version__",
    "aslinearoperator",
]

from .curvature import GGN, CurvatureOperator, Fisher, Hessian  # noqa: E402

__all__ += ["GGN", "CurvatureOperator", "Fisher", "Hessian"]
