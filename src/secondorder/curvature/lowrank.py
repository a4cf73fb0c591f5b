r"""The GGN in low-rank form, its eigenpairs through the Gram matrix, and directional derivatives.

With the loss written as :math:`L = \sum_b w_b s_b \sum_{r \in b} \ell_r(z_r)` (batches
:math:`b` weighted as in :class:`~secondorder.curvature.base.CurvatureOperator`, the reduction's
scale :math:`s_b` and rows :math:`r` as in :mod:`secondorder.curvature.losses`), the GGN is a
sum of outer products,

.. math::
    G = \sum_b w_b s_b \sum_{r} J_r^\top S_r S_r^\top J_r = V V^\top, \qquad
    V = \big[\sqrt{w_b s_b}\, J_r^\top S_r\big]_{r} \in \mathbb{R}^{P \times D},

where :math:`S_r \in \mathbb{R}^{C \times C'}` is a symmetric factor of the loss Hessian,
:math:`S_r S_r^\top = \nabla^2 \ell_r` (exact: :math:`C' = C`, or :math:`C - 1` for
cross-entropy, whose Hessian annihilates :math:`\sqrt{p_r}`), or a Monte-Carlo factor
:math:`S_r = [\nabla \ell_r(\hat y_1), \dots, \nabla \ell_r(\hat y_M)] / \sqrt{M}` with targets
:math:`\hat y_m \sim p(\cdot \mid z_r)` drawn from the model (:math:`C' = M`, and
:math:`\mathbb{E}[S_r S_r^\top] = \nabla^2 \ell_r`, so the MC GGN is unbiased). There are
:math:`D = \sum_r C'` columns. The nonzero eigenvalues of :math:`G` are those of the
:math:`D \times D` Gram matrix :math:`V^\top V`, and for :math:`V^\top V u_k = \lambda_k u_k`
with :math:`\lambda_k > 0` the GGN eigenvector is :math:`e_k = V u_k / \sqrt{\lambda_k}`.

**Per-sample quantities** (ViViT). Grouping rows by sample, :math:`L = \sum_{n=1}^N L_n` and
:math:`G = \sum_n G_n` with :math:`L_n = w_b s_b \sum_{r \in n} \ell_r` and :math:`G_n` the
matching part of :math:`V V^\top`. With :math:`g_n = N \nabla L_n` the per-sample gradients,

.. math::
    \gamma_{nk} = g_n^\top e_k, \qquad \lambda_{nk} = N\, e_k^\top G_n e_k
                = N \lambda_k \sum_{a \in n} u_{ak}^2,

so that the batch means are exact: :math:`\frac1N \sum_n \gamma_{nk} = \nabla L^\top e_k` and
:math:`\frac1N \sum_n \lambda_{nk} = e_k^\top G e_k = \lambda_k`. For ``reduction="mean"`` on
one batch, :math:`N L_n` is the loss of sample :math:`n` alone (cross-entropy: :math:`\ell_n`;
MSE: :math:`\frac1C \lVert z_n - y_n \rVert^2`); for ``"sum"`` it is :math:`N \ell_n`.

Everything is computed from the *kernels* :math:`V^\top V` and :math:`[g_1, \dots, g_N]^\top V`,
which add up over parameters, so every param group (a subset of parameters, i.e. a diagonal
block of :math:`G`) gets its own Gram matrix at no extra backward pass. Two engines build the
columns, ``"sequential"`` and ``"autograd"`` (:mod:`secondorder.curvature.lowrank_engines`); the
Gram eigenpairs come from :mod:`secondorder.curvature.lowrank_spectrum`.

References:
    Dangel, Tatzel, Hennig. ViViT: Curvature access through the generalized Gauss-Newton's
    low-rank structure. TMLR 2022. https://arxiv.org/abs/2106.02624
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import LIKELIHOOD_LOSSES, check_choice, check_int
from ..linalg.precision import autocast_disabled, full_precision
from .losses import LossTerms, supports_likelihood
from .lowrank_columns import drop_softmax_null_column
from .lowrank_engines import explicit_columns, kron_columns
from .lowrank_spectrum import GramSpectrum
from .model import FunctionalModel, as_batches
from .vocabulary import EIGENSOLVERS, NON_GRAPH_ENGINES, canonical_engine
from .weighting import batch_weights

__all__ = ["LowRankGGN"]

ENGINES = NON_GRAPH_ENGINES


class LowRankGGN(GramSpectrum):
    r"""The GGN :math:`G = V V^\top` of (model, loss, data) in low-rank form (ViViT).

    See the module docstring for the definitions of :math:`V`, the Gram matrix
    :math:`V^\top V`, the eigenpairs :math:`(\lambda_k, e_k = V u_k / \sqrt{\lambda_k})` and the
    per-sample directional derivatives :math:`\gamma_{nk} = g_n^\top e_k` and
    :math:`\lambda_{nk} = N e_k^\top G_n e_k` with their normalisation (batch means equal
    :math:`\nabla L^\top e_k` and :math:`\lambda_k` for either reduction).

    Methods take an optional ``params``: a subset of the selected parameters, whose diagonal
    block :math:`G_{\mathrm{block}} = V_{\mathrm{block}} V_{\mathrm{block}}^\top` they act on
    (default: all). Flat vectors over a block follow the order of ``params``. Gram matrices and
    their eigendecompositions are computed once per block and cached.

    Columns are grouped by sample: sample :math:`n` owns the consecutive columns
    ``column_sample == n`` (:math:`C'` per row of the loss, rows ordered as in the output).

    Args:
        model: Any ``nn.Module``; called as ``model(*inputs)``.
        loss_fn: ``nn.CrossEntropyLoss`` (no class weights), ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` (no weights), reduction ``"mean"`` or ``"sum"``.
        data: One batch ``(inputs, targets)`` or an iterable of batches (all are used together;
            :math:`D` grows with the total number of samples).
        params: Parameters to differentiate with respect to (default: all trainable).
        mc_samples: 0 for the exact factor (:math:`C' = C`), else the number :math:`M` of
            targets drawn per row for a Monte-Carlo factor (:math:`C' = M`).
        generator: Random generator for the Monte-Carlo factor (default: a fresh one seeded 0).
        engine: ``"auto"`` (``"sequential"`` where it applies, else ``"autograd"``),
            ``"sequential"`` (columns from the layers' per-sample rules over the graph engine's
            steps, :mod:`~secondorder.curvature.lowrank_engines`; ``"kron"`` is its former
            name) or ``"autograd"``.
        eigensolver: ``"auto"`` (default): the leading eigenpairs (:meth:`leading_eigh`, and
            positions requested by the other methods that all lie among the few largest) by
            restarted block Krylov iteration on the Gram matrix
            (:func:`~secondorder.linalg.dense_eig.top_eigh`, which decomposes densely where
            that is cheaper or the iteration does not converge), the full spectrum by
            ``torch.linalg.eigh``. ``"torch"``: always ``torch.linalg.eigh`` of the whole Gram
            matrix. ``"lapack"``: SciPy's tridiagonal reduction with eigenvectors only for the
            chosen directions (SciPy's OpenBLAS threads contend with torch's unless
            ``OPENBLAS_NUM_THREADS=1``; measurements in ``BENCHMARKS.md``).
        dtype: The dtype of the columns and everything computed from them (default: float32 for
            a bfloat16 or float16 model, else the parameters'; see
            :class:`~secondorder.curvature.base.CurvatureOperator`).

    Raises:
        ValueError: For a loss without a likelihood, a bad ``mc_samples`` or ``engine``,
            ``engine="sequential"`` on a model it does not support, or rows that do not divide into
            samples.
        TypeError: If the model does not return a tensor.

    Example:
        >>> import torch, secondorder as so
        >>> from secondorder.curvature.lowrank import LowRankGGN
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> lr = LowRankGGN(model, torch.nn.MSELoss(), (X, y))
        >>> lr.gram().shape
        torch.Size([10, 10])
        >>> dense = so.GGN(model, torch.nn.MSELoss(), (X, y)).to_dense()
        >>> bool(torch.allclose(lr.to_dense(), dense))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: Sequence[Tensor] | None = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        engine: str = "auto",
        eigensolver: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> None:
        check_choice("eigensolver", eigensolver, EIGENSOLVERS)
        self.eigensolver = eigensolver
        if not supports_likelihood(loss_fn):
            raise ValueError(
                "LowRankGGN needs a loss with a likelihood (a symmetric factor of its Hessian): "
                f"{LIKELIHOOD_LOSSES}; got {loss_fn!r}"
            )
        check_int("mc_samples", mc_samples, 0, "0: exact factor")
        engine = canonical_engine(engine, ENGINES)
        self.fmodel = FunctionalModel(model, params, dtype)
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples
        if mc_samples > 0 and generator is None:
            generator = torch.Generator(device=self.fmodel.device).manual_seed(0)
        self.generator = generator
        batches = [self.fmodel.cast_batch(b) for b in as_batches(data)]
        sizes = [b.size for b in batches]
        self.num_samples = sum(sizes)
        self._weights = batch_weights(loss_fn, batches, self.fmodel).weights(batches)

        built, why = None, None
        if engine != "autograd":
            with autocast_disabled():
                built, why = kron_columns(
                    self.fmodel, loss_fn, batches, self._weights, self._factor
                )
        if built is None:
            if engine == "sequential":
                raise ValueError(
                    "engine='sequential' (formerly 'kron') needs a traceable model whose selected "
                    "parameters all belong to nn.Linear layers or to nn.Conv1d/nn.Conv2d layers "
                    "with groups=1 and numeric zero padding (untied, each called once), steps "
                    f"that keep the samples apart and one loss row per sample; here {why}. "
                    "Use engine='autograd'"
                )
            with autocast_disabled():
                built = explicit_columns(self.fmodel, loss_fn, batches, self._weights, self._factor)
            self.engine = "autograd"
        else:
            self.engine = "sequential"
        self.loss, self.column_sample = built.loss, built.column_sample
        self._columns = built.columns
        self._owner = {i: c for c in self._columns for i in c.indices}
        self._cache: dict[tuple[int, ...], dict[str, Any]] = {}

    # ------------------------------------------------------------------ setup
    def _factor(self, terms: LossTerms, weight: float) -> tuple[Tensor, Tensor]:
        """Scaled factor rows ``(R, C, C')`` and per-row gradient rows ``(R, C)`` of one batch."""
        if not terms.has_likelihood:
            raise ValueError(
                "LowRankGGN: the loss on this batch has no likelihood (cross-entropy with class "
                "weights, or targets of an unsupported type)"
            )
        ws = weight * terms.scale
        if self.mc_samples == 0:
            S = terms.symmetric_factor()
            if isinstance(self.loss_fn, nn.CrossEntropyLoss) and S.shape[-1] > 1:
                S = drop_softmax_null_column(S, terms.p)  # type: ignore[attr-defined]
        else:
            g = terms.to_rows(terms.sampled_gradients(self.mc_samples, self.generator))
            S = g.permute(1, 2, 0) / math.sqrt(self.mc_samples)  # (R, C, M)
        grad_rows = terms.per_row_gradients() * (self.num_samples * ws)
        return S * math.sqrt(ws), grad_rows

    # ---------------------------------------------------------------- blocks
    @property
    def num_columns(self) -> int:
        """:math:`D`, the number of columns of :math:`V` (size of the Gram matrix)."""
        return int(self.column_sample.numel())

    def _block(self, params: Sequence[Tensor] | None) -> tuple[int, ...]:
        if params is None:
            return tuple(range(len(self.fmodel.params)))
        index = {id(p): i for i, p in enumerate(self.fmodel.params)}
        block = []
        for j, p in enumerate(params):
            if id(p) not in index:
                raise ValueError(
                    f"params: entry {j} (shape {tuple(p.shape)}) is not one of the "
                    f"{len(index)} parameters this LowRankGGN was built for"
                )
            block.append(index[id(p)])
        if len(set(block)) != len(block) or not block:
            raise ValueError(f"params: expected distinct parameters, at least one, got {block}")
        return tuple(block)

    @full_precision
    def directional_derivatives(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Per-sample first and second directional derivatives along :math:`e_k`.

        .. math::
            \gamma_{nk} = g_n^\top e_k
                        = \frac{\big([g_1 \dots g_N]^\top V u_k\big)_n}{\sqrt{\lambda_k}},
            \qquad \lambda_{nk} = N \lambda_k \sum_{a \in n} u_{ak}^2,

        with :math:`g_n = N \nabla L_n` (module docstring): their means over :math:`n` are
        :math:`\nabla L^\top e_k` and :math:`\lambda_k`.

        Args:
            indices: Positions in :meth:`eigvalsh`'s ascending eigenvalues, each above
                :meth:`tolerance`.
            params: Parameters of the block (default: all).

        Returns:
            ``gammas`` and ``lambdas``, each of shape ``(N, K)``.
        """
        lam, U = self._selected(indices, params)
        return self.derivatives_of_pairs(lam, U, params)

    @full_precision
    def derivatives_of_pairs(
        self, lam: Tensor, U: Tensor, params: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        r""":meth:`directional_derivatives` for given Gram eigenpairs :math:`(\lambda_k, u_k)`.

        Args:
            lam: Positive eigenvalues, shape ``(K,)``.
            U: Their orthonormal Gram eigenvectors, shape ``(D, K)``.
            params: Parameters of the block (default: all).

        Returns:
            ``gammas`` and ``lambdas``, each of shape ``(N, K)``.
        """
        gammas = (self._entry(params)["cross"] @ U) / lam.sqrt()
        sq = U.square() * (self.num_samples * lam)
        lambdas = sq.new_zeros(self.num_samples, U.shape[1]).index_add_(0, self.column_sample, sq)
        return gammas, lambdas

    @full_precision
    def factor_matmul(self, coeffs: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""Return :math:`V_{\mathrm{block}}\, c`, a combination of the columns of :math:`V`.

        Args:
            coeffs: Shape ``(D,)`` or ``(D, K)``.
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block,)`` or ``(P_block, K)``, flat over ``params`` in their order.

        Raises:
            ValueError: If ``coeffs`` has the wrong shape.
        """
        D = self.num_columns
        if coeffs.ndim not in (1, 2) or coeffs.shape[0] != D:
            raise ValueError(
                f"coeffs: expected shape ({D},) or ({D}, K), got {tuple(coeffs.shape)}"
            )
        C = coeffs.reshape(D, -1)
        parts = [self._owner[i].combine(i, C).reshape(C.shape[1], -1) for i in self._block(params)]
        out = torch.cat(parts, dim=1).T
        return out.reshape(-1) if coeffs.ndim == 1 else out

    @full_precision
    def eigenvectors(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None = None
    ) -> Tensor:
        r"""GGN eigenvectors :math:`e_k = V u_k / \sqrt{\lambda_k}` (unit norm).

        Args:
            indices: Positions in :meth:`eigvalsh`'s ascending eigenvalues, each above
                :meth:`tolerance`.
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block, K)``, flat over ``params`` in their order.
        """
        lam, U = self._selected(indices, params)
        return self.factor_matmul(U / lam.sqrt(), params)

    def gradient(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""The gradient :math:`\nabla L = \frac1N \sum_n g_n` restricted to the block.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block,)``, flat over ``params`` in their order.
        """
        return torch.cat([self._owner[i].gradient(i).reshape(-1) for i in self._block(params)])

    @full_precision
    def factor(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """The matrix :math:`V` of the block, formed explicitly (for tests and small models).

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block, D)``.
        """
        eye = torch.eye(self.num_columns, dtype=self.fmodel.dtype, device=self.fmodel.device)
        return self.factor_matmul(eye, params)

    @full_precision
    def to_dense(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""The block's GGN :math:`V V^\top` as a dense matrix (for tests and small models).

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block, P_block)``.
        """
        V = self.factor(params)
        return V @ V.T
