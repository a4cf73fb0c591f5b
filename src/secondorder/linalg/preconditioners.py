r"""Preconditioners for :func:`~secondorder.linalg.cg.cg`: operators that apply :math:`M^{-1}`.

Each class here is a symmetric positive definite :class:`LinearOperator` whose product is the
*inverse* of an approximation :math:`M \approx A + \mu I`, so it can be passed directly as
``cg(A + mu * Identity(n), b, M=P)``:

* :class:`JacobiPreconditioner`: :math:`(\operatorname{diag}(d) + \mu)^{-\alpha}`, e.g. with
  Martens' empirical-Fisher diagonal and :math:`\alpha = 3/4`.
* :class:`NystromPreconditioner`: randomized Nyström approximation of rank :math:`r`, one
  product of :math:`A` with an :math:`n \times r` sketch (Frangella, Tropp, Udell 2023).
* :class:`PivotedCholeskyPreconditioner`: partial pivoted Cholesky :math:`A \approx L L^\top`
  of rank :math:`r`, from the diagonal and :math:`r` columns of :math:`A`, inverted by Woodbury.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .nystrom import NystromPreconditioner
from .operator import LinearOperator
from .pivoted_cholesky import PivotedCholeskyPreconditioner

__all__ = [
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
]


def _negative_power_(x: Tensor, alpha: float) -> Tensor:
    r"""``x ** -alpha`` for ``x > 0``, in place in ``x`` (which is returned).

    The common exponents go through square roots instead of ``pow``
    (``x^{-3/4} = r \sqrt{r}`` with ``r = x^{-1/2}``).
    """
    if alpha == 1.0:
        return x.reciprocal_()
    if alpha == 0.5:
        return x.rsqrt_()
    if alpha == 0.75:
        r = x.rsqrt_()
        return r.mul_(r.sqrt())
    return x.pow_(-alpha)


class JacobiPreconditioner(LinearOperator):
    r"""Diagonal preconditioner :math:`M^{-1} = (\operatorname{diag}(d) + \mu I)^{-\alpha}`.

    .. math::

        (M^{-1} x)_i = (d_i + \mu)^{-\alpha}\, x_i .

    With :math:`\alpha = 1` and :math:`d = \operatorname{diag}(A)` this is the classical Jacobi
    preconditioner; Martens (2010, §4.7) uses the diagonal of the empirical Fisher,
    :math:`\mu` = the damping and :math:`\alpha = 0.75`.

    Args:
        diagonal: The diagonal :math:`d`, a real floating 1-D tensor; it sets the operator's
            dtype and device.
        damping: The shift :math:`\mu` added to every entry.
        exponent: The exponent :math:`\alpha \ge 0`.

    Attributes:
        inverse_diagonal: The diagonal of :math:`M^{-1}`, :math:`(d + \mu)^{-\alpha}`.

    Raises:
        ValueError: If ``diagonal`` is not a finite real 1-D tensor, if ``damping`` or
            ``exponent`` are not finite, ``exponent < 0``, or if any :math:`d_i + \mu \le 0`.

    Example:
        >>> import torch
        >>> P = JacobiPreconditioner(torch.tensor([1.0, 4.0]), exponent=0.5)
        >>> P @ torch.tensor([1.0, 1.0])
        tensor([1.0000, 0.5000])
    """

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(self, diagonal: Tensor, damping: float = 0.0, exponent: float = 1.0) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.ndim != 1:
            got = (
                f"shape {tuple(diagonal.shape)}"
                if isinstance(diagonal, Tensor)
                else type(diagonal).__name__
            )
            raise ValueError(f"JacobiPreconditioner: expected a 1-D tensor diagonal, got {got}")
        if not diagonal.dtype.is_floating_point:
            raise ValueError(
                f"JacobiPreconditioner: expected a real floating diagonal, got {diagonal.dtype}"
            )
        try:
            mu, alpha = float(damping), float(exponent)
        except (TypeError, ValueError):
            raise ValueError(
                "JacobiPreconditioner: damping and exponent must be floats, "
                f"got {damping!r} and {exponent!r}"
            ) from None
        if not math.isfinite(mu):
            raise ValueError(f"JacobiPreconditioner: damping must be finite, got {damping!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(
                f"JacobiPreconditioner: exponent must be a finite float >= 0, got {exponent!r}"
            )
        shifted = diagonal.detach() + mu  # a new tensor: the power is taken in place in it
        # one pass for both checks: NaN propagates into the minimum, Inf shows in either end
        if shifted.numel():
            smallest, largest = (float(v) for v in torch.aminmax(shifted))
        else:
            smallest = largest = 1.0
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            raise ValueError("JacobiPreconditioner: the diagonal contains NaN or Inf")
        if smallest <= 0:
            raise ValueError(
                "JacobiPreconditioner: expected diagonal + damping > 0 everywhere, got a minimum "
                f"of {smallest:.3e} (damping={mu}); increase the damping"
            )
        super().__init__((diagonal.numel(), diagonal.numel()), diagonal.dtype, diagonal.device)
        self.damping = mu
        self.exponent = alpha
        self.inverse_diagonal = _negative_power_(shifted, alpha)

    def _matvec(self, x: Tensor) -> Tensor:
        return self.inverse_diagonal * x

    def _matmat(self, X: Tensor) -> Tensor:
        return self.inverse_diagonal.unsqueeze(1) * X

    def to_dense(self, chunk_size: int = 256) -> Tensor:  # noqa: D102
        return torch.diag(self.inverse_diagonal)
