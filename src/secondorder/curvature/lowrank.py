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
block of :math:`G`) gets its own Gram matrix at no extra backward pass. Two engines:

- ``"kron"`` (``nn.Sequential`` of supported layers whose selected parameters all belong to
  ``nn.Linear`` layers with inputs of shape ``(N, d)`` or to ``nn.Conv1d``/``nn.Conv2d`` layers
  with ``groups=1`` and zero padding given by numbers): one batched backward of the
  :math:`C' + 1` cotangents :math:`[S_{\cdot, c'}]` and :math:`[\nabla \ell]` through zero
  probes added to the layers' outputs gives every sample's output gradients :math:`f_{n c'}` and
  :math:`h_n` of each such layer. For a Linear layer with inputs :math:`x_n` the kernels are
  :math:`(J_n^\top s)^\top (J_m^\top s') = (x_n^\top x_m + 1)(f_{ns}^\top f_{ms'})` (weight plus
  bias); :math:`V` is never formed; cost :math:`O(D^2 d)` per layer. A convolution's output
  gradients :math:`f_{nc'} \in \mathbb{R}^{\mathrm{out} \times P}` over its :math:`P` output
  positions do not factor so: with the unfolded input patches
  :math:`\tilde x_n \in \mathbb{R}^{\mathrm{in} k \times P}` the weight's column is
  :math:`f_{nc'} \tilde x_n^\top` (shape ``(out, in k)``) and the bias's :math:`f_{nc'} 1_P`, so
  the layer's rows of :math:`V` (``D x out in k``) and of the per-sample gradients are formed by
  one batched matmul per chunk of samples; cost :math:`O(D^2\, \mathrm{out}\, \mathrm{in}\, k)`.
- ``"autograd"`` (any module): :math:`V` and the per-sample gradients are formed explicitly
  (``P x (D + N)``) by batched vector-Jacobian products of the whole batch; cost
  :math:`O(D^2 P)`. Meant for small models and tests.

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
from torch.nn import functional as F

from ..linalg.dense_eig import krylov_applies, top_eigh
from .linearization import sequential_layers
from .losses import LossTerms, loss_terms, supports_likelihood
from .model import Batch, FunctionalModel, as_batches
from .probes import probed_forward
from .weighting import batch_weights

__all__ = ["LowRankGGN"]

_ENGINES = ("auto", "kron", "autograd")
_EIGENSOLVERS = ("auto", "torch", "lapack")
_CHUNK = 256  # columns per batched backward in the autograd engine
_PATCH_ELEMENTS = 1 << 26  # unfolded conv input patches per chunk of samples (kron engine)
_KRON_CONV: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2}  # spatial dimensions


class _Columns:
    """Columns of :math:`V` and the per-sample gradients restricted to some parameters."""

    indices: tuple[int, ...]  # parameters (positions in the FunctionalModel) this object covers

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Return ``(V_p^T V_p, G_p^T V_p)`` summed over ``members``: shapes (D, D), (N, D)."""
        raise NotImplementedError

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        """Return :math:`V_p c` for parameter ``index``, shape ``(K, *p.shape)``."""
        raise NotImplementedError

    def gradient(self, index: int) -> Tensor:
        """Return the gradient of parameter ``index`` (mean of per-sample gradients)."""
        raise NotImplementedError


class _ExplicitColumns(_Columns):
    """One parameter's rows of :math:`V` (as ``(D, numel)``) and of the per-sample gradients."""

    def __init__(self, index: int, shape: torch.Size, V: Tensor, G: Tensor) -> None:
        self.indices = (index,)
        self.shape = shape
        self.V, self.G = V, G

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.V @ self.V.T, self.G @ self.V.T

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        return (coeffs.T @ self.V).view(coeffs.shape[1], *self.shape)

    def gradient(self, index: int) -> Tensor:
        return self.G.mean(0).view(self.shape)


class _LinearColumns(_Columns):
    r"""An ``nn.Linear`` layer's weight and/or bias in Kronecker form.

    Column :math:`(n, c')` of :math:`V` is :math:`f_{nc'} x_n^\top` for the weight and
    :math:`f_{nc'}` for the bias; the per-sample gradient of sample :math:`n` is
    :math:`h_n x_n^\top` and :math:`h_n`.
    """

    def __init__(
        self, weight: int | None, bias: int | None, X: Tensor, Fo: Tensor, H: Tensor
    ) -> None:
        self.weight, self.bias = weight, bias
        self.indices = tuple(i for i in (weight, bias) if i is not None)
        self.X, self.F, self.H = X, Fo, H  # (N, d_in), (N, C', d_out), (N, d_out)

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        N, Cp, d = self.F.shape
        Fm = self.F.reshape(N * Cp, d)
        gram = Fm @ Fm.T
        cross = self.H @ Fm.T
        with_w, with_b = self.weight in members, self.bias in members
        if with_w:
            xx = self.X @ self.X.T
            if with_b:
                xx += 1.0
            gram.view(N, Cp, N, Cp).mul_(xx[:, None, :, None])
            cross.view(N, N, Cp).mul_(xx[:, :, None])
        return gram, cross

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        N, Cp, d = self.F.shape
        K = coeffs.shape[1]
        # A[n, k] = sum_c' coeffs[(n, c'), k] f_{nc'}
        A = torch.bmm(coeffs.view(N, Cp, K).transpose(1, 2), self.F)  # (N, K, d_out)
        if index == self.bias:
            return A.sum(0)
        return (A.permute(1, 2, 0).reshape(K * d, N) @ self.X).view(K, d, -1)

    def gradient(self, index: int) -> Tensor:
        if index == self.bias:
            return self.H.mean(0)
        return self.H.T @ self.X / self.H.shape[0]


def _kron_conv(layer: nn.Module) -> bool:
    """Whether the kron engine handles ``layer``: Conv1d/Conv2d, groups 1, numeric zero padding."""
    m: Any = layer
    return (
        type(layer) in _KRON_CONV
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _unfold(layer: Any, x: Tensor) -> Tensor:
    r"""The input patches :math:`\tilde x_n` of a Conv1d/Conv2d layer.

    A Conv1d input ``(N, in, L)`` is treated as ``(N, in, 1, L)`` with a ``(1, k)`` kernel.

    Args:
        layer: The convolution (its kernel size, dilation, padding and stride).
        x: Its input, shape ``(N, in, *spatial)``.

    Returns:
        Shape ``(N, in * k, P)``, rows ordered as the flattened weight ``(in, *kernel)``.
    """
    if type(layer) is nn.Conv1d:
        return F.unfold(
            x.unsqueeze(2),
            (1, *layer.kernel_size),
            dilation=(1, *layer.dilation),
            padding=(0, *layer.padding),
            stride=(1, *layer.stride),
        )
    return F.unfold(
        x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    )


def _conv_weight_rows(layer: Any, x: Tensor, g: Tensor) -> Tensor:
    r"""Per-sample products :math:`\sum_p g_{nk}[:, p] \otimes \tilde x_n[:, p]` of a conv layer.

    One batched matmul ``(N, K out, P) @ (N, P, in k)`` per chunk of samples, the chunks
    bounding the unfolded patches to ``_PATCH_ELEMENTS`` elements.

    Args:
        layer: The convolution.
        x: Its input, shape ``(N, in, *spatial)``.
        g: Output gradients, shape ``(N, K, out, P)``.

    Returns:
        Shape ``(N, K, out * in * k)`` (flattened like the weight ``(out, in, *kernel)``).
    """
    N, K, out, P = g.shape
    ink = layer.weight.numel() // out
    rows = g.new_empty(N, K * out, ink)
    gm = g.reshape(N, K * out, P)
    step = max(1, _PATCH_ELEMENTS // max(1, ink * P))
    for s in range(0, N, step):
        patches = _unfold(layer, x[s : s + step])  # (n, in k, P)
        torch.bmm(gm[s : s + step], patches.transpose(1, 2), out=rows[s : s + step])
    return rows.view(N, K, out * ink)


def _drop_softmax_null_column(S: Tensor, p: Tensor) -> Tensor:
    r"""A ``(C-1)``-column factor of the softmax cross-entropy Hessian from the square one.

    :math:`S = (\operatorname{diag}\sqrt p - p \sqrt p^\top)\sqrt t` annihilates
    :math:`\sqrt p` (:math:`\sum_c p_c = 1`). The Householder reflection
    :math:`H = I - 2 w w^\top / w^\top w`, :math:`w = \sqrt p + e_C`, maps :math:`e_C` to
    :math:`-\sqrt p`, so :math:`S H` has a zero last column and
    :math:`(SH)(SH)^\top = S S^\top`; the column is dropped.

    Args:
        S: Square factors, shape ``(R, C, C)``.
        p: Predicted probabilities, shape ``(R, C)``.

    Returns:
        Factors of shape ``(R, C, C - 1)``.
    """
    w = p.sqrt()
    w[:, -1] += 1.0
    coef = (S @ w.unsqueeze(-1)) * (2.0 / w.square().sum(-1))[:, None, None]  # (R, C, 1)
    return (S - coef * w[:, None, :])[..., :-1]


def _lapack() -> Any:
    """SciPy's LAPACK wrappers, or None when SciPy is not installed."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy is an optional dependency
        return None
    return lapack


class _Tridiagonal:
    r"""A symmetric matrix reduced to tridiagonal form :math:`A = Q T Q^\top` (LAPACK ``sytrd``).

    All eigenvalues come from ``sterf`` (:math:`O(D^2)`); eigenvectors are computed only for
    the requested ones: bisection (``stebz``) and inverse iteration (``stein``) on :math:`T`,
    then :math:`Q z` by the stored Householder reflectors (``ormqr``), :math:`O(D^2 K)`.
    """

    def __init__(self, lapack: Any, prefix: str, a: Any, like: Tensor) -> None:
        self.lapack, self.prefix, self.like = lapack, prefix, like
        n = a.shape[0]
        work, _ = self._fn("sytrd_lwork")(n, lower=1)
        self.c, self.d, self.e, self.tau, info = self._fn("sytrd")(a, lower=1, lwork=int(work))
        vals, info2 = self._fn("sterf")(self.d.copy(), self.e.copy())
        if info or info2:
            raise FloatingPointError(f"LAPACK sytrd/sterf failed (info {info}, {info2})")
        self.evals = torch.from_numpy(vals).to(like.device, like.dtype)

    def _fn(self, name: str) -> Any:
        return getattr(self.lapack, self.prefix + name)

    @classmethod
    def create(cls, gram: Tensor) -> _Tridiagonal | None:
        """Reduce ``gram`` if SciPy is available and it is a CPU float32/float64 matrix."""
        prefix = {torch.float32: "s", torch.float64: "d"}.get(gram.dtype)
        lapack = _lapack()
        if prefix is None or lapack is None or gram.device.type != "cpu" or gram.shape[0] < 2:
            return None
        return cls(lapack, prefix, gram.detach().numpy(), gram)

    def eigenvectors(self, indices: list[int]) -> Tensor | None:
        """Eigenvectors of the chosen eigenvalues (ascending positions), or None on failure."""
        import numpy as np

        n = self.d.shape[0]
        wanted = sorted(set(indices))
        if not wanted:
            return self.like.new_zeros(n, 0)
        runs = [[wanted[0], wanted[0]]]
        for i in wanted[1:]:
            if i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        ws, blocks, ranks = [], [], []
        isplit = None
        for lo, hi in runs:  # eigenvalues lo..hi (0-based, inclusive) by bisection
            m, w, iblock, isplit, info = self._fn("stebz")(
                self.d, self.e, 2, 0.0, 0.0, lo + 1, hi + 1, 0.0, "B"
            )
            if info or m != hi - lo + 1:
                return None
            ws.append(w[:m])
            blocks.append(iblock[:m])
            ranks.append(lo + np.argsort(np.argsort(w[:m], kind="stable"), kind="stable"))
        w, iblock, rank = (np.concatenate(t) for t in (ws, blocks, ranks))
        order = np.lexsort((w, iblock))  # stein wants them grouped by block, ascending inside
        padded = np.zeros(n, dtype=iblock.dtype)
        padded[: len(order)] = iblock[order]
        z, info = self._fn("stein")(self.d, self.e, w[order], padded, isplit)
        if info:
            return None
        K = z.shape[1]
        cq, _, info = self._fn("ormqr")(
            "L", "N", self.c[1:, : n - 1], self.tau, z[1:], lwork=max(64 * K, 1)
        )
        if info:
            return None
        z[1:] = cq
        column = {int(r): j for j, r in enumerate(rank[order])}
        U = torch.from_numpy(z[:, [column[i] for i in indices]].copy())
        return U.to(self.like.device, self.like.dtype)


class LowRankGGN:
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
        engine: ``"auto"`` (``"kron"`` where it applies, else ``"autograd"``), ``"kron"`` or
            ``"autograd"``.
        eigensolver: ``"auto"`` (default): the leading eigenpairs (:meth:`leading_eigh`, and
            positions requested by the other methods that all lie among the few largest) by
            restarted block Krylov iteration on the Gram matrix
            (:func:`~secondorder.linalg.dense_eig.top_eigh`, which decomposes densely where
            that is cheaper or the iteration does not converge), the full spectrum by
            ``torch.linalg.eigh``. ``"torch"``: always ``torch.linalg.eigh`` of the whole Gram
            matrix. ``"lapack"``: SciPy's tridiagonal reduction with eigenvectors only for the
            chosen directions (faster alone, but SciPy's OpenBLAS threads contend with torch's
            unless ``OPENBLAS_NUM_THREADS=1``, which made steps 100x slower in our benchmark).

    Raises:
        ValueError: For a loss without a likelihood, a bad ``mc_samples`` or ``engine``,
            ``engine="kron"`` on a model it does not support, or rows that do not divide into
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
    ) -> None:
        if eigensolver not in _EIGENSOLVERS:
            raise ValueError(f"eigensolver must be one of {_EIGENSOLVERS}, got {eigensolver!r}")
        self.eigensolver = eigensolver
        if not supports_likelihood(loss_fn):
            raise ValueError(
                "LowRankGGN needs a loss with a likelihood (a symmetric factor of its Hessian): "
                "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss with reduction 'mean' "
                f"or 'sum' and no weights; got {loss_fn!r}"
            )
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
            raise ValueError(
                f"mc_samples must be an int >= 0 (0: exact factor), got {mc_samples!r}"
            )
        if engine not in _ENGINES:
            raise ValueError(f"engine must be one of {_ENGINES}, got {engine!r}")
        self.fmodel = FunctionalModel(model, params)
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples
        if mc_samples > 0 and generator is None:
            generator = torch.Generator(device=self.fmodel.device).manual_seed(0)
        self.generator = generator
        batches = list(as_batches(data))
        sizes = [b.size for b in batches]
        self.num_samples = sum(sizes)
        self._weights = batch_weights(loss_fn, batches, self.fmodel).weights(batches)

        layers = self._kron_layers() if engine != "autograd" else None
        if engine == "kron" and layers is None:
            raise ValueError(
                "engine='kron' needs an nn.Sequential of supported layers whose selected "
                "parameters all belong to nn.Linear layers or to nn.Conv1d/nn.Conv2d layers with "
                "groups=1 and numeric zero padding (untied); use engine='autograd'"
            )
        columns = self._kron(layers, batches) if layers is not None else None
        if columns is None:
            if engine == "kron":
                raise ValueError(
                    "engine='kron' needs 2-D inputs (N, d) to every nn.Linear layer with selected "
                    "parameters, batched inputs to every such convolution and one loss row per "
                    "sample; use engine='autograd'"
                )
            columns = self._explicit(batches)
            self.engine = "autograd"
        else:
            self.engine = "kron"
        self._columns = columns
        self._owner = {i: c for c in columns for i in c.indices}
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
                S = _drop_softmax_null_column(S, terms.p)  # type: ignore[attr-defined]
        else:
            g = terms.to_rows(terms.sampled_gradients(self.mc_samples, self.generator))
            S = g.permute(1, 2, 0) / math.sqrt(self.mc_samples)  # (R, C, M)
        grad_rows = terms.per_row_gradients() * (self.num_samples * ws)
        return S * math.sqrt(ws), grad_rows

    def _kron_layers(self) -> list[tuple[str, nn.Module]] | None:
        layers = sequential_layers(self.fmodel.model)
        if layers is None:
            return None
        counts: dict[int, int] = {}
        for i in self.fmodel.alias.values():
            counts[i] = counts.get(i, 0) + 1
        if any(c > 1 for c in counts.values()):  # tied parameters: kernels are not additive
            return None
        covered = set()
        for prefix, layer in layers:
            if type(layer) is nn.Linear or _kron_conv(layer):
                covered |= {
                    self.fmodel.alias[prefix + n]
                    for n in ("weight", "bias")
                    if prefix + n in self.fmodel.alias
                }
        return layers if covered == set(range(len(self.fmodel.params))) else None

    def _kron(
        self, layers: list[tuple[str, nn.Module]], batches: list[Batch]
    ) -> list[_Columns] | None:
        alias = self.fmodel.alias
        per_layer: dict[str, list[tuple[Tensor, ...]]] = {}
        kinds: dict[str, nn.Module] = {}
        loss, Cp = None, 0
        for batch, weight in zip(batches, self._weights):
            if len(batch.inputs) != 1 or not isinstance(batch.inputs[0], Tensor):
                return None
            fwd = probed_forward(
                self.fmodel,
                layers,
                batch.inputs[0],
                lambda m: type(m) is nn.Linear or _kron_conv(m),
                lambda m: 2 if type(m) is nn.Linear else 2 + _KRON_CONV[type(m)],
            )
            if fwd is None:
                return None
            terms = loss_terms(self.loss_fn, fwd.z.detach(), batch.targets)
            S, grad_rows = self._factor(terms, weight)
            if S.shape[0] != batch.size:
                return None
            Cp = S.shape[-1]
            # cotangents: column c' of every sample's factor, then the per-sample gradients
            cot = torch.cat([S.permute(2, 0, 1), grad_rows.unsqueeze(0)])  # (C'+1, N, C)
            grads = fwd.output_gradients(terms.from_rows(cot))
            for (prefix, layer, xin), g in zip(fwd.recorded, grads):
                kinds[prefix] = layer
                part = self._layer_part(prefix, layer, xin, g)
                per_layer.setdefault(prefix, []).append(part)
            value = terms.value * weight
            loss = value if loss is None else loss + value
        assert loss is not None
        self.loss = loss.detach()
        columns: list[_Columns] = []
        for prefix, parts in per_layer.items():
            joined = [torch.cat(t) for t in zip(*parts)]
            w, b = alias.get(prefix + "weight"), alias.get(prefix + "bias")
            if type(kinds[prefix]) is nn.Linear:
                columns.append(_LinearColumns(w, b, *joined))
                continue
            Vw, Gw, Vb, Gb = joined
            shapes = [p.shape for p in self.fmodel.params]
            if w is not None:
                columns.append(_ExplicitColumns(w, shapes[w], Vw, Gw))
            if b is not None:
                columns.append(_ExplicitColumns(b, shapes[b], Vb, Gb))
        self.column_sample = torch.arange(self.num_samples, device=self.fmodel.device)
        self.column_sample = self.column_sample.repeat_interleave(Cp)
        return columns

    def _layer_part(
        self, prefix: str, layer: nn.Module, x: Tensor, g: Tensor
    ) -> tuple[Tensor, ...]:
        r"""One batch's share of a layer's columns from its output gradients.

        Args:
            prefix: The layer's parameter-name prefix.
            layer: The Linear or convolution layer.
            x: Its input, shape ``(N, d)`` or ``(N, in, *spatial)``.
            g: Its output gradients for the :math:`C'` factor columns and the gradient,
                shape ``(C' + 1, N, out, *spatial)``.

        Returns:
            Linear: ``(X, F, H)`` of shapes ``(N, d)``, ``(N, C', out)``, ``(N, out)``.
            Convolution: the rows of :math:`V` and of the per-sample gradients for the weight,
            ``(N C', out in k)`` and ``(N, out in k)`` (empty if it is not selected), then for
            the bias, ``(N C', out)`` and ``(N, out)``.
        """
        if type(layer) is nn.Linear:
            return x, g[:-1].transpose(0, 1), g[-1]
        K, N, out = g.shape[:3]
        g = g.reshape(K, N, out, -1).transpose(0, 1)  # (N, C' + 1, out, P)
        if prefix + "weight" in self.fmodel.alias:
            rows = _conv_weight_rows(layer, x, g)
            Vw, Gw = rows[:, :-1].reshape(N * (K - 1), -1), rows[:, -1].contiguous()
        else:
            Vw = Gw = g.new_empty(N, 0)
        sums = g.sum(-1)  # (N, C' + 1, out)
        return Vw, Gw, sums[:, :-1].reshape(N * (K - 1), out), sums[:, -1].contiguous()

    def _explicit(self, batches: list[Batch]) -> list[_Columns]:
        fm = self.fmodel
        Vs: list[list[Tensor]] = [[] for _ in fm.params]
        Gs: list[list[Tensor]] = [[] for _ in fm.params]
        owners, loss, offset = [], None, 0
        for batch, weight in zip(batches, self._weights):
            leaves = fm.leaves()
            with torch.enable_grad():
                z = fm(leaves, batch.inputs)
            if not isinstance(z, Tensor):
                raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
            terms = loss_terms(self.loss_fn, z.detach(), batch.targets)
            S, grad_rows = self._factor(terms, weight)
            R, C, Cp = S.shape
            n = batch.size
            if R % n != 0:
                raise ValueError(
                    f"LowRankGGN: the loss has {R} rows for a batch of {n} samples; expected a "
                    "multiple of the batch size, to assign rows to samples"
                )
            row_sample = torch.arange(R, device=S.device) // (R // n)
            # factor columns (r, c'): S[r, :, c'] placed in row r; then one column per sample
            eye = torch.eye(R, dtype=S.dtype, device=S.device)
            fac = (eye[:, None, :, None] * S.permute(0, 2, 1)[:, :, None, :]).reshape(R * Cp, R, C)
            mask = (row_sample[None, :] == torch.arange(n, device=S.device)[:, None]).to(S.dtype)
            cot = terms.from_rows(torch.cat([fac, mask[:, :, None] * grad_rows[None]]))
            chunks = [
                torch.autograd.grad(
                    z, leaves, c, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                for c in cot.split(_CHUNK)
            ]
            for i, p in enumerate(fm.params):
                rows = torch.cat(
                    [
                        g[i].reshape(len(c), -1)
                        if g[i] is not None
                        else p.new_zeros(len(c), p.numel())
                        for g, c in zip(chunks, cot.split(_CHUNK))
                    ]
                )
                Vs[i].append(rows[: R * Cp])
                Gs[i].append(rows[R * Cp :])
            owners.append((offset + row_sample).repeat_interleave(Cp))
            offset += n
            value = terms.value * weight
            loss = value if loss is None else loss + value
        assert loss is not None
        self.loss = loss.detach()
        self.column_sample = torch.cat(owners)
        return [
            _ExplicitColumns(i, p.shape, torch.cat(Vs[i]), torch.cat(Gs[i]))
            for i, p in enumerate(fm.params)
        ]

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

    def _entry(self, params: Sequence[Tensor] | None) -> dict[str, Any]:
        block = self._block(params)
        entry = self._cache.get(block)
        if entry is None:
            gram = cross = None
            for col in self._columns:
                members = [i for i in col.indices if i in block]
                if members:
                    g, c = col.kernels(members)
                    gram = g if gram is None else gram.add_(g)
                    cross = c if cross is None else cross.add_(c)
            assert gram is not None and cross is not None
            entry = self._cache[block] = {"block": block, "gram": gram, "cross": cross}
        return entry

    @staticmethod
    def _finite_gram(entry: dict[str, Any]) -> Tensor:
        """The entry's Gram matrix, checked for non-finite entries (one reduction first)."""
        gram = entry["gram"]
        if not bool(torch.isfinite(gram.sum())) and not bool(torch.isfinite(gram).all()):
            raise FloatingPointError("LowRankGGN: the Gram matrix has non-finite entries")
        return gram

    def _spectrum(self, params: Sequence[Tensor] | None) -> dict[str, Any]:
        entry = self._entry(params)
        if "evals" not in entry:
            gram = self._finite_gram(entry)
            tri = _Tridiagonal.create(gram) if self.eigensolver == "lapack" else None
            if tri is None:
                entry["evals"], entry["evecs"] = torch.linalg.eigh(gram)
                entry["method"] = "eigh"
            else:
                entry["evals"], entry["tridiagonal"] = tri.evals, tri
                entry["method"] = "lapack"
        return entry

    def leading_eigh(self, k: int, params: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        r"""The ``k`` largest eigenpairs :math:`(\lambda_j, u_j)` of the Gram matrix.

        With ``eigensolver="auto"`` and ``k`` small beside :math:`D` they come from restarted
        block Krylov iteration on :math:`V^\top V` (:func:`~secondorder.linalg.dense_eig.
        top_eigh`: residuals :math:`\lVert V^\top V u_j - \lambda_j u_j \rVert \le
        10 \sqrt{D}\, \epsilon\, \lambda_{\max}`, a start block from a generator seeded 0,
        so deterministic), otherwise from the full decomposition. Cached per block; a full
        decomposition, once computed, serves every later request.

        Args:
            k: Number of pairs; more than :math:`D` means all :math:`D`.
            params: Parameters of the block (default: all).

        Returns:
            Eigenvalues in ascending order, shape ``(K,)`` with ``K = min(k, D)``, and
            orthonormal eigenvectors as columns, shape ``(D, K)``.

        Raises:
            ValueError: If ``k`` is not a positive int.
            FloatingPointError: If the Gram matrix is not finite.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        entry = self._entry(params)
        D = self.num_columns
        k = min(k, D)
        lead = entry.get("leading")
        if "evecs" not in entry and (lead is None or lead[0].numel() < k):
            if self.eigensolver == "lapack":
                idx = list(range(D - k, D))
                return self.eigvalsh(params)[idx], self.gram_eigenvectors(idx, params)
            if self.eigensolver == "torch" or not krylov_applies(k, D):
                evals, evecs = self.eigh(params)
                return evals[-k:], evecs[:, -k:]
            gram = self._finite_gram(entry)
            generator = torch.Generator(device=gram.device).manual_seed(0)
            result = top_eigh(gram, k, generator=generator)
            lead = entry["leading"] = (result.eigenvalues, result.eigenvectors)
            entry["method"] = "krylov" if result.method == "krylov" else "eigh"
            entry["krylov"] = result
        if "evecs" in entry or lead is None:
            return entry["evals"][-k:], entry["evecs"][:, -k:]
        return lead[0][-k:], lead[1][:, -k:]

    def eigensolver_used(self, params: Sequence[Tensor] | None = None) -> str | None:
        """How the block's eigenpairs were computed so far.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            ``"krylov"``, ``"eigh"``, ``"lapack"`` or None (not yet).
        """
        return self._entry(params).get("method")

    # ------------------------------------------------------------ public API
    def gram(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""The Gram matrix :math:`V^\top V` of the block ``params``.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(D, D)``.
        """
        return self._entry(params)["gram"]

    def eigvalsh(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""All eigenvalues of the Gram matrix in ascending order, shape ``(D,)``.

        Its nonzero eigenvalues are the nonzero eigenvalues of the block's GGN. This is a full
        decomposition (``torch.linalg.eigh``); with ``eigensolver="lapack"`` on the CPU the
        matrix is instead reduced to tridiagonal form once (LAPACK ``sytrd`` through SciPy,
        when installed), so that :meth:`gram_eigenvectors` later costs :math:`O(D^2 K)` for
        :math:`K` eigenvectors. Only the largest few? :meth:`leading_eigh` is cheaper.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            The eigenvalues.

        Raises:
            FloatingPointError: If the Gram matrix is not finite.
        """
        return self._spectrum(params)["evals"]

    def eigh(self, params: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        r"""Full eigendecomposition :math:`V^\top V = U \operatorname{diag}(\lambda) U^\top`.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Eigenvalues in ascending order, shape ``(D,)``, and orthonormal eigenvectors as
            columns, shape ``(D, D)``.

        Raises:
            FloatingPointError: If the Gram matrix is not finite.
        """
        entry = self._spectrum(params)
        if "evecs" not in entry:
            _, entry["evecs"] = torch.linalg.eigh(entry["gram"])
            entry["method"] = "eigh"
        return entry["evals"], entry["evecs"]

    def tolerance(self, params: Sequence[Tensor] | None = None) -> float:
        r"""Eigenvalues at or below this are numerically zero: :math:`D\,\epsilon\,\lambda_{\max}`.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            The threshold (0 when the block's GGN is zero).
        """
        entry = self._entry(params)
        lead = entry.get("leading")
        if "evals" in entry:
            top = entry["evals"][-1]
        elif lead is not None:
            top = lead[0][-1]
        else:
            top = self.leading_eigh(1, params)[0][-1]
        return self.num_columns * torch.finfo(top.dtype).eps * max(float(top), 0.0)

    def _indices(self, indices: Sequence[int] | Tensor) -> list[int]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        D = self.num_columns
        if any(not 0 <= i < D for i in idx):
            raise IndexError(f"eigenvalue indices must lie in [0, {D}), got {idx}")
        return idx

    def gram_eigenvectors(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None = None
    ) -> Tensor:
        r"""Orthonormal eigenvectors :math:`u_k` of the Gram matrix for the chosen eigenvalues.

        Args:
            indices: Positions in :meth:`eigvalsh`'s ascending eigenvalues.
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(D, K)``; column :math:`k` belongs to ``eigvalsh(params)[indices[k]]``.
        """
        idx = self._indices(indices)
        leading = self._leading(idx, params)
        if leading is not None:
            return leading[1]
        entry = self._spectrum(params)
        if "evecs" in entry:
            return entry["evecs"][:, idx]
        U = entry["tridiagonal"].eigenvectors(idx)
        if U is None:  # LAPACK's inverse iteration failed: decompose fully instead
            entry["evals"], entry["evecs"] = torch.linalg.eigh(entry["gram"])
            return entry["evecs"][:, idx]
        return U

    def _leading(
        self, idx: list[int], params: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor] | None:
        """Eigenpairs at positions ``idx`` from the leading ones, when those serve.

        They do when a full decomposition is not cached and either cached leading pairs cover
        ``idx`` or (``eigensolver="auto"``) they can be computed: the ``D - min(idx)`` largest.
        """
        entry = self._entry(params)
        if not idx or "evals" in entry:
            return None
        D = self.num_columns
        lead = entry.get("leading")
        m = D - min(idx)
        if lead is None or lead[0].numel() < m:
            if self.eigensolver != "auto":
                return None
            lead = self.leading_eigh(m, params)
            if "evals" in entry:  # it decomposed fully: the caller's path serves
                return None
        offset = D - lead[0].numel()
        pos = [i - offset for i in idx]
        return lead[0][pos], lead[1][:, pos]

    def _selected(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        idx = self._indices(indices)
        leading = self._leading(idx, params)
        lam = self.eigvalsh(params)[idx] if leading is None else leading[0]
        tol = self.tolerance(params)
        if idx and float(lam.min()) <= tol:
            bad = [i for i, v in zip(idx, lam.tolist()) if v <= tol]
            raise ValueError(
                f"eigenvalues {bad} are numerically zero (<= {tol:.3e}); their GGN eigenvectors "
                "V u / sqrt(lambda) are undefined (choose eigenvalues above `tolerance()`)"
            )
        if leading is not None:
            return lam, leading[1]
        return lam, self.gram_eigenvectors(idx, params)

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

    def factor(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """The matrix :math:`V` of the block, formed explicitly (for tests and small models).

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block, D)``.
        """
        eye = torch.eye(self.num_columns, dtype=self.fmodel.dtype, device=self.fmodel.device)
        return self.factor_matmul(eye, params)

    def to_dense(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""The block's GGN :math:`V V^\top` as a dense matrix (for tests and small models).

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(P_block, P_block)``.
        """
        V = self.factor(params)
        return V @ V.T
