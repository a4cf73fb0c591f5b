r"""Linear operators on flat 1-D tensors.

A :class:`LinearOperator` represents a matrix :math:`A \in \mathbb{R}^{m \times n}` through its
action on vectors. ``A @ v`` maps ``v`` of shape ``(n,)`` to ``(m,)`` and ``A @ V`` maps ``V`` of
shape ``(n, k)`` to ``(m, k)`` (``k = 0`` included: an ``(m, 0)`` result). Operators combine
by algebra::

    D = G + 1e-3 * Identity(G.shape[0], dtype=G.dtype, device=G.device)   # damping
    C = A @ B                                                                # composition

Subclasses implement ``_matmat`` (columns ``(n, k) -> (m, k)``) or ``_matvec`` (``(n,) -> (m,)``),
and either ``_rmatmat`` or set ``SELF_ADJOINT = True``. The public ``@`` checks length, dtype and
device and raises ``ValueError`` naming what it expected and what it got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .precision import autocast_disabled

__all__ = [
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Identity",
    "LinearOperator",
    "aslinearoperator",
]


class LinearOperator:
    """A matrix given by its action on flat vectors.

    Attributes:
        SELF_ADJOINT: Declared structure: ``A == A.T``. Solvers may rely on it.
        IS_PSD: Declared structure: ``A`` is symmetric positive semi-definite.
    """

    SELF_ADJOINT: bool = False
    IS_PSD: bool = False

    def __init__(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str
    ) -> None:
        if len(shape) != 2 or any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must be a pair of non-negative ints, got {shape}")
        self._shape = (int(shape[0]), int(shape[1]))
        self._dtype = dtype
        self._device = torch.device(device)

    # ------------------------------------------------------------------ metadata
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the operator maps ``R^n`` to ``R^m``."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the vectors the operator accepts and returns."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors the operator accepts and returns."""
        return self._device

    def __repr__(self) -> str:
        m, n = self.shape
        return f"<{m}x{n} {type(self).__name__} dtype={self.dtype} device={self.device}>"

    # ------------------------------------------------------------- application
    def _check_input(self, x: Tensor, n: int, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (1, 2) or x.shape[0] != n:
            raise ValueError(
                f"{what}: expected a vector of shape ({n},) or a matrix of shape ({n}, k), "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"{what}: expected dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{what}: expected device {self.device}, got {x.device}")

    def matvec(self, x: Tensor) -> Tensor:
        """Return ``A @ x`` for ``x`` of shape ``(n,)`` or ``(n, k)``, after checking it.

        The product is computed in the operator's dtype, also inside ``torch.autocast``
        (:func:`~secondorder.linalg.precision.autocast_disabled`).
        """
        self._check_input(x, self.shape[1], f"{type(self).__name__} @ x")
        with autocast_disabled():
            return self._apply_checked(x)

    def _apply_checked(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            return self._matvec(x)
        if x.shape[1] == 0:  # no columns: nothing to apply (subclasses may not handle k = 0)
            return x.new_zeros(self.shape[0], 0)
        return self._matmat(x)

    def rmatvec(self, x: Tensor) -> Tensor:
        """Return ``A.T @ x`` for ``x`` of shape ``(m,)`` or ``(m, k)``, after checking it."""
        self._check_input(x, self.shape[0], f"{type(self).__name__}.T @ x")
        with autocast_disabled():
            return self._rapply_checked(x)

    def _rapply_checked(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            return self._rmatmat(x.unsqueeze(1)).squeeze(1)
        if x.shape[1] == 0:
            return x.new_zeros(self.shape[1], 0)
        return self._rmatmat(x)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            from .combinators import _Product

            return _Product([self, other])
        return self.matvec(other)

    def __rmatmul__(self, other: Any) -> Any:
        # x @ A == (A.T @ x.T).T for a row vector or a (k, m) matrix
        if isinstance(other, Tensor):
            if other.ndim == 1:
                return self.rmatvec(other)
            return self.rmatvec(other.T).T
        return NotImplemented

    def __call__(self, x: Tensor) -> Tensor:
        """Return ``A @ x`` (same as :meth:`matvec`)."""
        return self.matvec(x)

    # Subclass hooks --------------------------------------------------------
    def _matvec_plus(self, x: Tensor, shift: float) -> Tensor:
        """``A x + shift * x`` (overridden where the output can start at ``shift * x``)."""
        return _add_shift(self._matvec(x), x, shift)

    def _matvec(self, x: Tensor) -> Tensor:
        if type(self)._matmat is LinearOperator._matmat:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither _matvec nor _matmat"
            )
        return self._matmat(x.unsqueeze(1)).squeeze(1)

    def _matmat(self, X: Tensor) -> Tensor:
        if type(self)._matvec is LinearOperator._matvec:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither _matvec nor _matmat"
            )
        out = torch.empty(self.shape[0], X.shape[1], dtype=self.dtype, device=self.device)
        for j in range(X.shape[1]):
            out[:, j] = self._matvec(X[:, j])
        return out

    def _rmatmat(self, X: Tensor) -> Tensor:
        if self.SELF_ADJOINT:
            return self._matmat(X)
        raise NotImplementedError(f"{type(self).__name__} does not implement its adjoint")

    # ----------------------------------------------------------------- algebra
    @property
    def T(self) -> LinearOperator:
        """The adjoint (transpose) operator."""
        return self.adjoint()

    def adjoint(self) -> LinearOperator:
        """Return the adjoint operator ``A.T``."""
        if self.SELF_ADJOINT:
            return self
        from .combinators import _Adjoint

        return _Adjoint(self)

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        from .combinators import _Sum

        return _Sum([self, other])

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        from .combinators import _Scaled, _Sum

        return _Sum([self, _Scaled(other, -1.0)])

    def __mul__(self, scalar: Any) -> LinearOperator:
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        from .combinators import _Scaled

        return _Scaled(self, float(scalar))

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> LinearOperator:
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        from .combinators import _Scaled

        return _Scaled(self, 1.0 / float(scalar))

    def __neg__(self) -> LinearOperator:
        from .combinators import _Scaled

        return _Scaled(self, -1.0)

    # --------------------------------------------------------------- exports
    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """Return the ``(m, n)`` matrix, built by applying the operator to identity columns.

        Args:
            chunk_size: Number of identity columns applied at once.

        Returns:
            The dense matrix, on the operator's dtype and device.
        """
        m, n = self.shape
        out = torch.empty(m, n, dtype=self.dtype, device=self.device)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            eye = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self._matmat(eye)
        return out

    def to_scipy(self) -> Any:
        """Return a :class:`scipy.sparse.linalg.LinearOperator` that calls this operator.

        NumPy inputs are converted to this operator's dtype and device; outputs come back as
        NumPy arrays of the matching precision.

        Returns:
            The scipy operator (requires ``scipy``).
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def _apply(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
            xt = torch.as_tensor(np.asarray(x, dtype=np_dtype), device=self.device)
            with torch.no_grad():
                y = fn(xt)
            return y.detach().cpu().numpy()

        def matvec(x: Any) -> Any:
            return _apply(lambda v: self._matvec(v.reshape(-1)), x)

        def matmat(x: Any) -> Any:
            return _apply(self._matmat, x)

        def rmatvec(x: Any) -> Any:
            return _apply(lambda v: self._rmatmat(v.reshape(-1, 1)).reshape(-1), x)

        def rmatmat(x: Any) -> Any:
            return _apply(self._rmatmat, x)

        return ScipyLinearOperator(
            shape=self.shape,
            matvec=matvec,
            matmat=matmat,
            rmatvec=rmatvec,
            rmatmat=rmatmat,
            dtype=np_dtype,
        )


# ---------------------------------------------------------------- shared helpers
def _check_compatible(ops: Sequence[LinearOperator], what: str) -> None:
    first = ops[0]
    for op in ops[1:]:
        if op.dtype != first.dtype:
            raise ValueError(
                f"{what}: operators must share a dtype, got {first.dtype} and {op.dtype}"
            )
        if op.device != first.device:
            raise ValueError(
                f"{what}: operators must share a device, got {first.device} and {op.device}"
            )


def _add_shift(out: Tensor, x: Tensor, shift: float) -> Tensor:
    """``out + shift * x``, in place unless ``out`` shares memory with the input ``x``."""
    if not shift:
        return out
    if out.data_ptr() == x.data_ptr():
        return out + shift * x
    return out.add_(x, alpha=shift)


# ---------------------------------------------------------------------- atoms
class Identity(LinearOperator):
    r"""The identity :math:`I_n`; ``G + lam * Identity(n, ...)`` is Tikhonov damping."""

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(
        self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__((n, n), dtype, device)

    def _matvec(self, x: Tensor) -> Tensor:
        return x.clone()

    def _matmat(self, X: Tensor) -> Tensor:
        return X.clone()


class Diagonal(LinearOperator):
    r"""A diagonal matrix :math:`\operatorname{diag}(d)` from a 1-D tensor ``d`` of length n."""

    SELF_ADJOINT = True

    def __init__(self, diagonal: Tensor) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.ndim != 1:
            raise ValueError(
                "Diagonal expects a 1-D tensor, got "
                + (
                    f"shape {tuple(diagonal.shape)}"
                    if isinstance(diagonal, Tensor)
                    else type(diagonal).__name__
                )
            )
        super().__init__((diagonal.numel(),) * 2, diagonal.dtype, diagonal.device)
        self.diagonal = diagonal
        self.IS_PSD = bool((diagonal >= 0).all())

    def _matvec(self, x: Tensor) -> Tensor:
        return self.diagonal * x

    def _matmat(self, X: Tensor) -> Tensor:
        return self.diagonal.unsqueeze(1) * X


class Dense(LinearOperator):
    """A dense ``(m, n)`` matrix seen as an operator.

    Args:
        matrix: The matrix.
        symmetric: Declare ``matrix`` symmetric (not checked unless ``check=True``).
        psd: Declare ``matrix`` positive semi-definite (implies symmetric).
        check: Verify the declared symmetry numerically.
    """

    def __init__(
        self, matrix: Tensor, *, symmetric: bool = False, psd: bool = False, check: bool = False
    ) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise ValueError(
                "Dense expects a 2-D tensor, got "
                + (
                    f"shape {tuple(matrix.shape)}"
                    if isinstance(matrix, Tensor)
                    else type(matrix).__name__
                )
            )
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)  # type: ignore[arg-type]
        self.matrix = matrix
        self.SELF_ADJOINT = symmetric or psd
        self.IS_PSD = psd
        if check and self.SELF_ADJOINT and not torch.allclose(matrix, matrix.T):
            raise ValueError("Dense: the matrix was declared symmetric but is not")

    def _matvec(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.matrix.T @ X

    def to_dense(self, chunk_size: int = 256) -> Tensor:  # noqa: D102
        return self.matrix.clone()


class BlockDiagonal(LinearOperator):
    """Block-diagonal operator ``diag(A_1, ..., A_B)``: block ``i`` acts on its slice of ``x``."""

    def __init__(self, blocks: Sequence[LinearOperator]) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block, got none")
        _check_compatible(blocks, "BlockDiagonal")
        m = sum(b.shape[0] for b in blocks)
        n = sum(b.shape[1] for b in blocks)
        super().__init__((m, n), blocks[0].dtype, blocks[0].device)
        self.blocks = blocks
        self._row_sizes = [b.shape[0] for b in blocks]
        self._col_sizes = [b.shape[1] for b in blocks]
        self.SELF_ADJOINT = all(b.SELF_ADJOINT and b.shape[0] == b.shape[1] for b in blocks)
        self.IS_PSD = all(b.IS_PSD for b in blocks)

    def _matmat(self, X: Tensor) -> Tensor:
        parts = X.split(self._col_sizes, dim=0)
        return torch.cat([b._matmat(p) for b, p in zip(self.blocks, parts)], dim=0)

    def _matvec(self, x: Tensor) -> Tensor:
        parts = x.split(self._col_sizes)
        return torch.cat([b._matvec(p) for b, p in zip(self.blocks, parts)])

    def _rmatmat(self, X: Tensor) -> Tensor:
        parts = X.split(self._row_sizes, dim=0)
        return torch.cat([b._rmatmat(p) for b, p in zip(self.blocks, parts)], dim=0)


def aslinearoperator(A: Any) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (a 2-D tensor becomes :class:`Dense`).

    Args:
        A: A :class:`LinearOperator` or a 2-D tensor.

    Returns:
        The operator.

    Raises:
        TypeError: If ``A`` is neither.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor) and A.ndim == 2:
        return Dense(A)
    raise TypeError(f"expected a LinearOperator or a 2-D tensor, got {type(A).__name__}")
