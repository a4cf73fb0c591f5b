r"""Sums, scalings, products and adjoints of :class:`~secondorder.linalg.operator.LinearOperator`.

The algebra of operators (``A + B``, ``c * A``, ``A @ B``, ``A.T``) builds these lazily; a
product with the result applies the parts. A sum with a multiple of the identity (Tikhonov
damping) adds the shift in place instead of forming ``c * I @ v``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor

from .operator import Identity, LinearOperator, _add_shift, _check_compatible


class _Sum(LinearOperator):
    ops: list[LinearOperator]

    def __init__(self, ops: Sequence[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, _Sum) else [op])
        shapes = {op.shape for op in flat}
        if len(shapes) != 1:
            raise ValueError(f"sum of operators needs equal shapes, got {sorted(shapes)}")
        _check_compatible(flat, "sum of operators")
        super().__init__(flat[0].shape, flat[0].dtype, flat[0].device)
        self.ops = flat
        self.SELF_ADJOINT = all(op.SELF_ADJOINT for op in flat)
        self.IS_PSD = all(op.IS_PSD for op in flat)
        # multiples of the identity (damping) are added in place: no product, no temporary
        self._shift = sum(_identity_multiple(op) or 0.0 for op in flat)
        self._general = [op for op in flat if _identity_multiple(op) is None]

    def _matvec(self, x: Tensor) -> Tensor:
        if not self._general:
            return x * self._shift
        if len(self._general) == 1:  # damping: the operator may fold the shift into its output
            return self._general[0]._matvec_plus(x, self._shift)
        out = self._general[0]._matvec(x)
        for op in self._general[1:]:
            out = out + op._matvec(x)
        return _add_shift(out, x, self._shift)

    def _matmat(self, X: Tensor) -> Tensor:
        if not self._general:
            return X * self._shift
        out = self._general[0]._matmat(X)
        for op in self._general[1:]:
            out = out + op._matmat(X)
        return _add_shift(out, X, self._shift)

    def _rmatmat(self, X: Tensor) -> Tensor:
        out = self.ops[0]._rmatmat(X)
        for op in self.ops[1:]:
            out = out + op._rmatmat(X)
        return out


def _identity_multiple(op: LinearOperator) -> float | None:
    """``c`` if ``op`` is ``c * Identity``, else None."""
    if isinstance(op, Identity):
        return 1.0
    if isinstance(op, _Scaled) and isinstance(op.op, Identity):
        return op.scalar
    return None


class _Scaled(LinearOperator):
    op: LinearOperator
    scalar: float

    def __init__(self, op: LinearOperator, scalar: float) -> None:
        super().__init__(op.shape, op.dtype, op.device)
        if isinstance(op, _Scaled):  # fold nested scalings
            inner: _Scaled = op
            op, scalar = inner.op, inner.scalar * scalar
        self.op = op
        self.scalar = scalar
        self.SELF_ADJOINT = op.SELF_ADJOINT
        self.IS_PSD = op.IS_PSD and scalar >= 0

    def _matvec(self, x: Tensor) -> Tensor:
        return self.op._matvec(x) * self.scalar

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op._matmat(X) * self.scalar

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.op._rmatmat(X) * self.scalar


class _Product(LinearOperator):
    """``A_1 @ A_2 @ ... @ A_p`` applied right to left."""

    ops: list[LinearOperator]

    def __init__(self, ops: Sequence[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, _Product) else [op])
        for left, right in itertools.pairwise(flat):
            if left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"cannot compose a {left.shape} operator with a {right.shape} operator"
                )
        _check_compatible(flat, "composition")
        super().__init__((flat[0].shape[0], flat[-1].shape[1]), flat[0].dtype, flat[0].device)
        self.ops = flat

    def _matvec(self, x: Tensor) -> Tensor:
        for op in reversed(self.ops):
            x = op._matvec(x)
        return x

    def _matmat(self, X: Tensor) -> Tensor:
        for op in reversed(self.ops):
            X = op._matmat(X)
        return X

    def _rmatmat(self, X: Tensor) -> Tensor:
        for op in self.ops:
            X = op._rmatmat(X)
        return X


class _Adjoint(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device)
        self.op = op

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op._rmatmat(X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.op._matmat(X)

    def adjoint(self) -> LinearOperator:
        return self.op
