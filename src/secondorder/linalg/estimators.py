r"""Randomized estimators of the trace, the diagonal and the spectral density of an operator.

Every estimator sees ``A`` only through products ``A @ Z`` with blocks of random probe vectors
``Z`` (``batch_size`` columns at a time), drawn from an explicit ``torch.Generator``:
Rademacher (entries :math:`\pm 1`, the default, which minimizes the variance of the trace
estimate) or standard Gaussian. ``generator=None`` means a generator seeded with 0, never the
global RNG. Probes are drawn one after another from the generator, so they (hence the
estimates) do not depend on ``batch_size``.

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Comm. Statist. Simulation Comput. 19 (1990).
    R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
    estimation", SOSA 2021, https://arxiv.org/abs/2010.09649.
    C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
    Appl. Numer. Math. 57 (2007).
    S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).
    Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens
    of the Hessian", https://arxiv.org/abs/1912.07145.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .checks import _check_int, _generator, _square_operator
from .errors import NonFiniteError
from .lanczos import lanczos_tridiag
from .operator import LinearOperator
from .precision import full_precision

__all__ = [
    "diagonal_estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "slq_nodes_weights",
    "spectral_density",
]

Distribution = Literal["rademacher", "gaussian"]
_DISTRIBUTIONS = ("rademacher", "gaussian")


# --------------------------------------------------------------------- helpers
def _check_distribution(distribution: Any, what: str) -> None:
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"{what}: expected distribution in {_DISTRIBUTIONS}, got {distribution!r}")


def _check_batch_size(batch_size: Any, what: str) -> None:
    if batch_size is not None:
        _check_int(batch_size, "batch_size", what, 1)


def _probes(
    n: int, num: int, op: LinearOperator, generator: torch.Generator, distribution: str
) -> Tensor:
    """Draw ``num`` probe vectors as the columns of an ``(n, num)`` tensor."""
    shape = (num, n)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
        Z = bits.to(op.dtype) * 2 - 1
    else:
        # One draw per probe: torch's vectorized normal sampler would otherwise make the
        # probes depend on how they are split into blocks.
        Z = torch.stack(
            [
                torch.randn(n, generator=generator, dtype=op.dtype, device=generator.device)
                for _ in range(num)
            ]
        )
    return Z.T.to(op.device)


def _probe_blocks(
    op: LinearOperator,
    num: int,
    batch_size: int | None,
    generator: torch.Generator,
    distribution: str,
) -> Iterator[Tensor]:
    """Yield the ``num`` probes in blocks of at most ``batch_size`` columns."""
    step = num if batch_size is None else batch_size
    for start in range(0, num, step):
        yield _probes(op.shape[0], min(step, num - start), op, generator, distribution)


def _apply(op: LinearOperator, X: Tensor, batch_size: int | None) -> Tensor:
    """Return ``A @ X``, applied ``batch_size`` columns at a time."""
    if batch_size is None or X.shape[1] <= batch_size:
        return op @ X
    return torch.cat([op @ part for part in X.split(batch_size, dim=1)], dim=1)


def _check_finite(value: float, what: str) -> None:
    """Raise :class:`NonFiniteError` for a NaN/Inf estimate (NaN/Inf in ``A``'s products)."""
    if not math.isfinite(value):
        raise NonFiniteError(
            f"{what}: the products with A hold NaN/Inf (the estimate is {value}); check the "
            "operator for NaN/Inf (or use float64 if its products overflow)"
        )


# ------------------------------------------------------------------- the trace
@overload
def hutchinson_trace(
    A: Any,
    num_probes: int,
    *,
    generator: torch.Generator | None = ...,
    distribution: Distribution = ...,
    batch_size: int | None = ...,
    return_stderr: Literal[False] = ...,
) -> float: ...


@overload
def hutchinson_trace(
    A: Any,
    num_probes: int,
    *,
    generator: torch.Generator | None = ...,
    distribution: Distribution = ...,
    batch_size: int | None = ...,
    return_stderr: Literal[True],
) -> tuple[float, float]: ...


@full_precision
def hutchinson_trace(
    A: Any,
    num_probes: int,
    *,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    batch_size: int | None = None,
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    r"""Estimate :math:`\operatorname{tr}(A)` by Hutchinson's method.

    .. math::

        \widehat{\operatorname{tr}}(A) = \frac{1}{m} \sum_{j=1}^m z_j^\top A z_j,
        \qquad \mathbb{E}[z z^\top] = I,

    which is unbiased, with variance :math:`\frac{2}{m}(\lVert A \rVert_F^2 - \sum_i A_{ii}^2)`
    for Rademacher and :math:`\frac{2}{m}\lVert A \rVert_F^2` for Gaussian probes when ``A`` is
    symmetric. Costs ``num_probes`` products.

    Args:
        A: A square :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D tensor).
        num_probes: Number of probe vectors :math:`m \ge 1`.
        generator: Source of the probes (``None``: a generator seeded with 0).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batch_size: Probes per product ``A @ Z`` (default: all at once).
        return_stderr: Also return the standard error
            :math:`s / \sqrt{m}` (``s``: sample standard deviation of the
            :math:`z_j^\top A z_j`; ``nan`` when ``m = 1``).

    Returns:
        The estimate as a float, or ``(estimate, stderr)`` if ``return_stderr``.

    Raises:
        TypeError: If ``A`` is not an operator, ``num_probes``/``batch_size`` are not ints or
            ``generator`` is not a ``torch.Generator``.
        ValueError: If ``A`` is not square, ``num_probes < 1``, ``batch_size < 1`` or
            ``distribution`` is unknown.
        NonFiniteError: If a product with ``A`` holds NaN/Inf (instead of a NaN estimate).

    Example:
        >>> import torch
        >>> from secondorder.linalg.estimators import hutchinson_trace
        >>> hutchinson_trace(torch.diag(torch.arange(1.0, 5.0)), 3)  # exact for diagonals
        10.0
    """
    what = "hutchinson_trace"
    op = _square_operator(A, what)
    _check_int(num_probes, "num_probes", what, 1)
    _check_distribution(distribution, what)
    _check_batch_size(batch_size, what)
    gen = _generator(generator, what)
    with torch.no_grad():
        samples = torch.cat(
            [
                (Z * (op @ Z)).sum(dim=0)
                for Z in _probe_blocks(op, num_probes, batch_size, gen, distribution)
            ]
        ).to(torch.float64)
    estimate = float(samples.mean())
    _check_finite(estimate, what)
    if not return_stderr:
        return estimate
    stderr = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else math.nan
    return estimate, stderr


@full_precision
def hutchpp_trace(
    A: Any,
    num_matvecs: int,
    *,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    batch_size: int | None = None,
) -> float:
    r"""Estimate :math:`\operatorname{tr}(A)` by Hutch++ (Meyer, Musco, Musco, Woodruff 2021).

    Spends a third of the products on a sketch :math:`Q = \operatorname{orth}(A S)` of the
    dominant range, takes that part's trace exactly and Hutchinson's estimate of the rest:

    .. math::

        \widehat{\operatorname{tr}}(A) = \operatorname{tr}(Q^\top A Q)
        + \frac{1}{g} \sum_{j=1}^{g} g_j^\top (I - Q Q^\top) A (I - Q Q^\top) g_j.

    With ``s = num_matvecs // 3`` sketch columns and ``g = num_matvecs - 2 s`` probes it uses
    exactly ``num_matvecs`` products. Unbiased for any ``A``; for symmetric PSD ``A`` its
    relative error decays like :math:`1/m` instead of Hutchinson's :math:`1/\sqrt{m}`, and it
    is exact (up to rounding) when ``rank(A) <= s``.

    Args:
        A: A square :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D tensor).
        num_matvecs: Total number of products :math:`m \ge 3`.
        generator: Source of the sketch and the probes (``None``: seeded with 0).
        distribution: ``"rademacher"`` or ``"gaussian"``, for both sketch and probes.
        batch_size: Columns per product ``A @ Z`` (default: all at once).

    Returns:
        The estimate, as a float.

    Raises:
        TypeError: If ``A`` is not an operator, ``num_matvecs``/``batch_size`` are not ints or
            ``generator`` is not a ``torch.Generator``.
        ValueError: If ``A`` is not square, ``num_matvecs < 3``, ``batch_size < 1`` or
            ``distribution`` is unknown.
        NonFiniteError: If a product with ``A`` holds NaN/Inf (instead of a NaN estimate).
    """
    what = "hutchpp_trace"
    op = _square_operator(A, what)
    _check_int(num_matvecs, "num_matvecs", what, 3)
    _check_distribution(distribution, what)
    _check_batch_size(batch_size, what)
    gen = _generator(generator, what)
    n = op.shape[0]
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    with torch.no_grad():
        S = _probes(n, s, op, gen, distribution)
        Q, _ = torch.linalg.qr(_apply(op, S, batch_size))
        head = float((Q * _apply(op, Q, batch_size)).sum())
        G = _probes(n, g, op, gen, distribution)
        G = G - Q @ (Q.T @ G)
        AG = _apply(op, G, batch_size)
        AG = AG - Q @ (Q.T @ AG)
        tail = float((G * AG).sum(dim=0).to(torch.float64).mean())
    _check_finite(head + tail, what)
    return head + tail


# ---------------------------------------------------------------- the diagonal
@full_precision
def diagonal_estimate(
    A: Any,
    num_probes: int,
    *,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    batch_size: int | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{diag}(A)` (Bekas, Kokiopoulou and Saad 2007).

    .. math::

        \widehat{d} = \Bigl(\sum_{j=1}^m z_j \odot A z_j\Bigr) \oslash
        \Bigl(\sum_{j=1}^m z_j \odot z_j\Bigr).

    Entry :math:`i` has error :math:`\sum_{k \ne i} A_{ik} \sum_j z_{ji} z_{jk} / \sum_j z_{ji}^2`,
    so the estimate is exact for a diagonal ``A`` with Rademacher probes, and unbiased for any
    ``A`` with Rademacher probes. Costs ``num_probes`` products.

    Args:
        A: A square :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D tensor).
        num_probes: Number of probe vectors :math:`m \ge 1`.
        generator: Source of the probes (``None``: a generator seeded with 0).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batch_size: Probes per product ``A @ Z`` (default: all at once).

    Returns:
        The estimated diagonal, shape ``(n,)``, in ``A``'s dtype and on its device.

    Raises:
        TypeError: If ``A`` is not an operator, ``num_probes``/``batch_size`` are not ints or
            ``generator`` is not a ``torch.Generator``.
        ValueError: If ``A`` is not square, ``num_probes < 1``, ``batch_size < 1`` or
            ``distribution`` is unknown.
        NonFiniteError: If a product with ``A`` holds NaN/Inf (instead of a NaN estimate).
    """
    what = "diagonal_estimate"
    op = _square_operator(A, what)
    _check_int(num_probes, "num_probes", what, 1)
    _check_distribution(distribution, what)
    _check_batch_size(batch_size, what)
    gen = _generator(generator, what)
    n = op.shape[0]
    with torch.no_grad():
        num = torch.zeros(n, dtype=op.dtype, device=op.device)
        den = torch.zeros(n, dtype=op.dtype, device=op.device)
        for Z in _probe_blocks(op, num_probes, batch_size, gen, distribution):
            num += (Z * (op @ Z)).sum(dim=1)
            den += (Z * Z).sum(dim=1)
        _check_finite(float(num.sum()), what)
    return num / den


# ---------------------------------------------------------- spectral density
@full_precision
def slq_nodes_weights(
    A: Any,
    *,
    num_probes: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gauss quadrature nodes and weights of stochastic Lanczos quadrature (SLQ).

    For each probe :math:`z_j`, ``num_steps`` Lanczos steps from :math:`z_j/\lVert z_j\rVert`
    give :math:`T_j = S_j \operatorname{diag}(\theta_j) S_j^\top`. The nodes are the Ritz
    values :math:`\theta_{j,i}` and the weights :math:`w_{j,i} = (e_1^\top S_j e_i)^2`
    (each row sums to 1), so that

    .. math::

        \frac{z_j^\top f(A) z_j}{z_j^\top z_j} \approx \sum_i w_{j,i} f(\theta_{j,i}),

    exactly for polynomials of degree below :math:`2 \cdot` ``num_steps``. Averaging over
    probes gives the spectral density :math:`\frac1n \sum_k \delta(x - \lambda_k)` and
    :math:`\operatorname{tr} f(A) \approx \frac{n}{m} \sum_{j,i} w_{j,i} f(\theta_{j,i})`.
    The probes share one ``A @ Z`` per step; memory is ``n * num_steps * batch_size``.
    A probe whose Krylov space becomes invariant before ``num_steps`` steps gets exact
    nodes and padding nodes at 0 with weight 0.

    Args:
        A: A square, symmetric :class:`~secondorder.linalg.operator.LinearOperator` (or
            2-D tensor).
        num_probes: Number of probe vectors :math:`m \ge 1`.
        num_steps: Lanczos steps per probe, :math:`\ge 1` (capped at ``n``).
        generator: Source of the probes (``None``: a generator seeded with 0).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batch_size: Probes run together (default: all at once).

    Returns:
        ``(nodes, weights)``, each of shape ``(num_probes, min(num_steps, n))``, in ``A``'s
        dtype on its device; nodes ascending within each row.

    Raises:
        TypeError: If ``A`` is not an operator, an integer argument is not an int or
            ``generator`` is not a ``torch.Generator``.
        ValueError: If ``A`` is not square, ``num_probes < 1``, ``num_steps < 1``,
            ``batch_size < 1`` or ``distribution`` is unknown.
        NonFiniteError: If a product with ``A`` holds NaN/Inf (instead of a NaN estimate).
    """
    what = "slq_nodes_weights"
    op = _square_operator(A, what)
    _check_int(num_probes, "num_probes", what, 1)
    _check_int(num_steps, "num_steps", what, 1)
    _check_distribution(distribution, what)
    _check_batch_size(batch_size, what)
    gen = _generator(generator, what)
    nodes, weights = [], []
    with torch.no_grad():
        for Z in _probe_blocks(op, num_probes, batch_size, gen, distribution):
            dec = lanczos_tridiag(op, num_steps, Z)
            theta, S = torch.linalg.eigh(dec.tridiagonal().to(torch.float64))
            nodes.append(theta)
            weights.append(S[:, 0, :] ** 2)
    return (
        torch.cat(nodes).to(op.dtype),
        torch.cat(weights).to(op.dtype),
    )


@full_precision
def spectral_density(
    A: Any,
    *,
    num_probes: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    grid: Tensor | None = None,
    sigma: float | None = None,
    num_points: int = 1000,
    distribution: Distribution = "rademacher",
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Estimate the spectral density of a symmetric ``A`` by stochastic Lanczos quadrature.

    With the nodes :math:`\theta_{j,i}` and weights :math:`w_{j,i}` of
    :func:`slq_nodes_weights`, the density :math:`\phi(x) = \frac1n\sum_k\delta(x-\lambda_k)`
    is smoothed by a Gaussian kernel of width :math:`\sigma`:

    .. math::

        \hat\phi_\sigma(x) = \frac{1}{m} \sum_{j=1}^{m} \sum_i w_{j,i}\,
        \frac{1}{\sqrt{2\pi}\sigma} \exp\Bigl(-\frac{(x - \theta_{j,i})^2}{2\sigma^2}\Bigr),

    which integrates to 1 over the real line. For the raw quadrature use
    :func:`slq_nodes_weights`.

    Args:
        A: A square, symmetric :class:`~secondorder.linalg.operator.LinearOperator` (or
            2-D tensor).
        num_probes: Number of probe vectors :math:`m \ge 1`.
        num_steps: Lanczos steps per probe, :math:`\ge 1`.
        generator: Source of the probes (``None``: a generator seeded with 0).
        grid: 1-D tensor of points at which to evaluate the density (default:
            ``num_points`` equispaced points from :math:`\theta_{\min} - 5\sigma` to
            :math:`\theta_{\max} + 5\sigma`).
        sigma: Kernel width :math:`> 0` (default: 1% of the range of the nodes, or 1% of
            :math:`\max(|\theta|, 1)` when all nodes coincide).
        num_points: Size of the default grid, :math:`\ge 2`.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batch_size: Probes run together (default: all at once).

    Returns:
        ``(grid, density)``: two 1-D tensors of equal length in ``A``'s dtype on its device.

    Raises:
        TypeError: If ``A`` is not an operator, an integer argument is not an int or
            ``generator`` is not a ``torch.Generator``.
        ValueError: As :func:`slq_nodes_weights`, or if ``grid`` is not a 1-D tensor,
            ``sigma <= 0`` or ``num_points < 2``.
        NonFiniteError: If a product with ``A`` holds NaN/Inf (instead of a NaN estimate).
    """
    what = "spectral_density"
    if grid is not None and (not isinstance(grid, Tensor) or grid.ndim != 1):
        got = f"shape {tuple(grid.shape)}" if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"{what}: expected grid to be a 1-D tensor, got {got}")
    if sigma is not None and (
        isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0
    ):
        raise ValueError(f"{what}: expected sigma > 0, got {sigma!r}")
    _check_int(num_points, "num_points", what, 2)
    op = _square_operator(A, what)
    nodes, weights = slq_nodes_weights(
        op,
        num_probes=num_probes,
        num_steps=num_steps,
        generator=generator,
        distribution=distribution,
        batch_size=batch_size,
    )
    theta = nodes.to(torch.float64).flatten()
    w = weights.to(torch.float64).flatten() / num_probes
    support = theta[w > 0] if bool((w > 0).any()) else theta
    lo, hi = float(support.min()), float(support.max())
    if sigma is None:
        width = hi - lo
        sigma = 0.01 * (width if width > 0 else max(abs(hi), 1.0))
    if grid is None:
        x = torch.linspace(
            lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64, device=theta.device
        )
    else:
        x = grid.to(dtype=torch.float64, device=theta.device)
    density = torch.zeros_like(x)
    norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
    chunk = max(1, 2**22 // max(theta.numel(), 1))
    for start in range(0, x.numel(), chunk):
        xs = x[start : start + chunk]
        kernel = torch.exp(-0.5 * ((xs[:, None] - theta[None, :]) / sigma) ** 2)
        density[start : start + chunk] = norm * (kernel @ w)
    out_grid = x.to(op.dtype) if grid is None else grid.to(dtype=op.dtype, device=op.device)
    return out_grid.to(op.device), density.to(dtype=op.dtype, device=op.device)
