r"""K-FAC's factors from one reverse pass of output cotangent columns per batch.

**Columns.** For one batch with weight :math:`w_b` (:mod:`.weighting`) and loss
:math:`L_b = s \sum_r \ell_r` over rows :math:`r` (:mod:`.losses`), the ``K`` output cotangent
columns :math:`u_k` (shape ``(K, *z.shape)``) satisfy :math:`\sum_k J^\top u_k u_k^\top J = `
the matrix approximated:

- ``"exact"``: :math:`u_k = \sqrt{w_b s}\, S_{\cdot, k}` with :math:`S_r S_r^\top = \nabla^2
  \ell_r` (the GGN, which equals the Fisher for these losses);
- ``"mc"``: :math:`u_k = \sqrt{w_b s / M}\, \nabla \ell_r(\hat y_{rk})` for ``M`` targets
  :math:`\hat y_{rk}` drawn from the model's predictive distribution;
- ``"empirical"``: one column :math:`u = \sqrt{w_b s}\, \nabla \ell_r(y_r)`.

(With several loss rows per sample, ``"exact"`` and ``"empirical"`` take one set of columns per
row position, :func:`output_columns`.)

**Factors.** A layer whose rule has a Kronecker form
(:meth:`~.layers.Rule.kronecker_shared`: inputs :math:`a_{nt}` ``(N, T, d)``, output
cotangents :math:`g_{knt}` ``(K, N, T, out)``, :math:`T` shared positions: sequence positions
of a Linear layer, output pixels of a convolution) gets, with :math:`\tilde a = (a, 1)` when the
bias is selected and :math:`N_{\mathrm{tot}}` samples over all batches (and ranks),

.. math::
    \text{expand:}\quad A = \frac{1}{N_{\mathrm{tot}}} \sum_n \frac1T \sum_t \tilde a_{nt}
    \tilde a_{nt}^\top,\quad G = \sum_{k,n,t} g_{knt} g_{knt}^\top; \qquad
    \text{reduce:}\quad A = \frac{1}{N_{\mathrm{tot}}} \sum_n \bar a_n \bar a_n^\top,\quad
    G = \sum_{k,n} \hat g_{kn} \hat g_{kn}^\top,

with :math:`\bar a_n = \frac1T \sum_t \tilde a_{nt}`, :math:`\hat g_{kn} = \sum_t g_{knt}`
(Eschenhagen et al., 2023; the definitions of curvlinops with
``separate_weight_and_bias=False``). The block of ``[W | b]`` (row-major, shape
``(out, d + 1)``) is :math:`G \otimes A`. EKFAC keeps the eigenvectors :math:`Q_G, Q_A` and
replaces the eigenvalues by :math:`D = \sum_{k,n} (Q_G^\top \Gamma_{kn} Q_A)^{\odot 2}` with
the per-sample cotangents :math:`\Gamma_{kn} = \sum_t g_{knt} \tilde a_{nt}^\top`.

**One-hot inputs** (:meth:`~.layers.Rule.kronecker_indices`, ``nn.Embedding``: the weight
``(V, out)`` maps the one-hot rows :math:`e_{x_{nt}}`, zero at ``padding_idx``): the same
definitions with :math:`a_{nt} = e_{x_{nt}}` make the expand factor diagonal,
:math:`A = \operatorname{diag}(c) / (N_{\mathrm{tot}} T)` with :math:`c_v` the number of
positions holding class :math:`v` (padding excluded), kept as the vector ``(V,)``; the weight's
block (row-major ``(V, out)``) is :math:`A \otimes G`, applied as :math:`G V A` to its transpose
``(out, V)``. EKFAC's :math:`Q_A` is the identity. Under ``"reduce"`` with shared positions
(``T > 1``) the averaged one-hot rows make :math:`A` a dense ``V x V`` matrix: such a layer gets
its exact diagonal instead.

**Row blocks.** A parameter may hold several Kronecker blocks in disjoint row ranges (the packed
``in_proj_weight`` of ``nn.MultiheadAttention`` with different query and key/value inputs):
:attr:`KronBlock.wrow` and :attr:`KronBlock.brow` place a block's rows in its weight and bias.

Every other selected parameter (in a layer with per-sample rules but no Kronecker form, e.g.
LayerNorm) gets its exact block :math:`\sum_{k,n} \gamma_{kn} \gamma_{kn}^\top` of the same
matrix (:math:`\gamma_{kn}` its per-sample cotangents): dense up to :data:`DENSE_MAX` entries,
else its diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .engines.factors import LayerCotangents, column_chunk, factor_linearization, layer_cotangents
from .kfac_blocks import KronBlock, OtherBlock, times_a, transposed_view
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel

__all__ = [
    "APPROXES",
    "DENSE_MAX",
    "FISHERS",
    "NoPerSample",
    "accumulate_corrections",
    "accumulate_factors",
    "output_columns",
    "row_factor",
]

FISHERS = ("mc", "exact", "empirical")
APPROXES = ("expand", "reduce")
DENSE_MAX = 64  # a parameter without Kronecker form and at most this many entries: dense block
_CHUNK_ELEMENTS = 2**24  # per-sample cotangents held at once by the EKFAC correction


class NoPerSample(Exception):
    """A layer of the graph engine gives neither factors nor per-sample cotangents."""


Factor = Callable[[LossTerms, float], tuple[Tensor, bool]]


def row_factor(
    terms: LossTerms,
    weight: float,
    fisher: str,
    num_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, bool]:
    """Scaled row factors ``(R, C, K)`` of one batch, and whether they are kept per row.

    Column ``k`` of ``F_r`` is row ``r`` of :math:`u_k` (module docstring). ``"exact"`` and
    ``"empirical"`` factors are kept per row (:func:`output_columns`), ``"mc"`` draws are not.

    Raises:
        ValueError: If the loss has no likelihood (a generic callable, class weights).
    """
    if not terms.has_likelihood:
        raise ValueError(
            "K-FAC needs a loss with a likelihood (nn.CrossEntropyLoss, nn.MSELoss or "
            "nn.BCEWithLogitsLoss without class weights) to factor its Hessian"
        )
    ws = weight * terms.scale
    if fisher == "mc":
        g = terms.to_rows(terms.sampled_gradients(num_samples, generator))  # (M, R, C)
        return g.permute(1, 2, 0) * math.sqrt(ws / num_samples), False
    if fisher == "exact":
        return terms.symmetric_factor() * math.sqrt(ws), True
    return terms.per_row_gradients().unsqueeze(-1) * math.sqrt(ws), True


def output_columns(terms: LossTerms, F: Tensor, per_row: bool, num_rows: int) -> Tensor:
    """The output cotangent columns ``(K, *z.shape)`` of row factors ``F`` ``(R, C, K')``.

    A sample with several loss rows (``P = R / N``: positions of a sequence) gets, ``per_row``,
    one set of columns per row position ``j``, nonzero on its row ``j`` only, so that no cross
    terms between its rows enter (``K = P K'``); otherwise (``"mc"``) every row's draw sits in
    one column, whose cross terms vanish in expectation (``K = K'``).

    Raises:
        ValueError: If the rows do not divide into the ``num_rows`` samples.
    """
    R, C, Cp = F.shape
    if R % num_rows != 0:
        raise ValueError(
            f"K-FAC: the loss has {R} rows for a batch of {num_rows} samples; expected a "
            "multiple of the batch size, to assign rows to samples"
        )
    P = R // num_rows
    if P == 1 or not per_row:
        return terms.from_rows(F.permute(2, 0, 1))
    eye = torch.eye(P, dtype=F.dtype, device=F.device)
    cols = torch.einsum("npkc,jp->jcnpk", F.reshape(num_rows, P, C, Cp), eye)
    return terms.from_rows(cols.reshape(P * Cp, R, C))


def _layer_passes(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
    info: dict[str, Any],
    diagonals: bool = True,
) -> Any:
    """Yield ``(first chunk?, layer cotangents)`` for every batch and column chunk.

    The per-sample graph engine serves where it applies; elsewhere
    (:mod:`.kfac_autograd`) the layers come from autograd and one more item
    ``(None, (diagonal, covered indices))`` carries the other parameters' exact diagonal.
    ``info`` records the engine (``"sequential"`` or ``"autograd"``) and why (``info["force"]``,
    a reason, selects the autograd engine for every batch); ``diagonals=False``
    skips the autograd engine's diagonals (EKFAC's second pass).
    """
    from .kfac_autograd import autograd_layers  # it imports this module

    for batch, weight in zip(batches, weights):
        lin, why = None, info.get("force")
        if why is None:
            lin, why = factor_linearization(fmodel, batch.inputs, batch.size, True)  # masks
        if lin is None:
            info["engine"] = "autograd"
            info.setdefault("reason", why)
            layers, diag, covered = autograd_layers(
                fmodel, loss_fn, batch, factor, weight, diagonals
            )
            for layer in layers:
                yield True, layer
            yield None, (diag, covered)
            continue
        info.setdefault("engine", "sequential")
        terms = loss_terms(loss_fn, lin.z, batch.targets)
        U = output_columns(terms, *factor(terms, weight), batch.size)
        for c, chunk in enumerate(U.split(column_chunk(lin))):
            for layer in layer_cotangents(lin, chunk):
                yield c == 0, layer


def _kron_form(
    layer: LayerCotangents, dtype: torch.dtype, approx: str
) -> tuple[Tensor, Tensor, int | None] | None:
    """``(a, g, None)`` of the layer in ``dtype``, or ``(index, g, num)`` for one-hot inputs.

    None without a Kronecker form (and for one-hot inputs under ``"reduce"`` with ``T > 1``).
    """
    if not set(layer.params) <= {"weight", "bias"}:
        return None
    form = layer.rule.kronecker_shared(layer.module, layer.ctx, layer.u)
    if form is not None:
        a, g = form
        return a.detach().to(dtype), g.detach().to(dtype), None
    onehot = layer.rule.kronecker_indices(layer.module, layer.ctx, layer.u)
    if onehot is None or set(layer.params) != {"weight"}:
        return None
    index, num, g = onehot
    if approx == "reduce" and index.shape[1] > 1:  # A would be dense V x V
        return None
    return index, g.detach().to(dtype), num


def _new_block(layer: LayerCotangents, a: Tensor, g: Tensor, num: int | None) -> KronBlock:
    """An empty block for the layer's first form (``a``: inputs, or indices if ``num``)."""
    w, bias = layer.params.get("weight"), layer.params.get("bias")
    rows = getattr(layer, "rows", {})  # a row block of a packed parameter
    out = g.shape[-1]
    if num is not None:
        A = g.new_zeros(num)
        return KronBlock(layer.name, w, None, out, num, A, g.new_zeros(out, out), transposed=True)
    d = a.shape[-1] if w is not None else 0
    dt = d + (bias is not None)
    return KronBlock(
        layer.name,
        w,
        bias,
        out,
        d,
        a.new_zeros(dt, dt),
        a.new_zeros(out, out),
        wrow=rows.get("weight", 0),
        brow=rows.get("bias", 0),
    )


def accumulate_factors(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
    approx: str,
    dtype: torch.dtype,
    info: dict[str, Any],
) -> tuple[dict[str, KronBlock], dict[int, OtherBlock]]:
    r"""Sum the factors and the exact blocks over ``batches`` (module docstring).

    ``A`` is returned as a sum over samples (divide by :math:`N_{\mathrm{tot}}` after any
    all-reduce); everything else is final.

    Returns:
        Kronecker blocks by graph node, and the other parameters' blocks by index.

    Raises:
        ValueError: Where the engine does not apply, or a layer has no per-sample formula.
    """
    kron: dict[str, KronBlock] = {}
    other: dict[int, OtherBlock] = {}
    for first, layer in _layer_passes(fmodel, loss_fn, batches, weights, factor, info):
        if first is None:  # the autograd engine: exact diagonals of the other parameters
            diag, covered = layer
            for i in range(len(fmodel.params)):
                if i not in covered:
                    sl = slice(sum(fmodel.numels[:i]), sum(fmodel.numels[: i + 1]))
                    part = diag[sl].to(dtype)
                    if i in other:
                        other[i].value.add_(part)
                    else:
                        other[i] = OtherBlock(i, "diagonal", part.clone())
            continue
        form = _kron_form(layer, dtype, approx)
        if form is not None:
            a, g, num = form
            block = kron.get(layer.name)
            if block is None:
                block = kron[layer.name] = _new_block(layer, a, g, num)
            if first and num is not None:  # one-hot rows: diagonal counts (padding: -1)
                hit = a[a >= 0]
                block.A.add_(torch.bincount(hit, minlength=num).to(dtype), alpha=1.0 / a.shape[1])
            elif first:  # the inputs are the same for every column chunk
                at = block.augment(a)
                if approx == "expand":
                    _add_gram(block.A, at, 1.0 / at.shape[1])
                else:
                    mean = at.mean(1)
                    block.A.addmm_(mean.T, mean)
            _add_gram(block.G, g if approx == "expand" else g.sum(2))
            continue
        rows = None
        for name, i in layer.params.items():
            numel = fmodel.numels[i]
            if numel <= DENSE_MAX:
                if rows is None:
                    rows = layer.per_sample()
                value = None if rows is None else rows[name].reshape(-1, numel).to(dtype)
                part = None if value is None else value.T @ value
                kind = "dense"
            else:
                sq = layer.squares()
                part = None if sq is None else sq[name].reshape(-1).to(dtype)
                kind = "diagonal"
            if part is None:  # the autograd engine's exact diagonal serves instead
                raise NoPerSample(
                    f"node {layer.name} ({type(layer.module).__name__}) has neither a "
                    "Kronecker form nor per-sample cotangents for its inputs"
                )
            if i in other:
                other[i].value.add_(part)
            else:
                other[i] = OtherBlock(i, kind, part.detach().clone())
    both = {i for b in kron.values() for i in (b.weight, b.bias) if i is not None} & set(other)
    if both:
        raise ValueError(
            f"K-FAC: parameter {fmodel.names[min(both)]} has a Kronecker form in some batches "
            "and none in others (one-hot inputs under approx='reduce' with and without shared "
            "positions); use approx='expand' or batches of one input shape"
        )
    return kron, other


def _add_gram(total: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    r"""``total += alpha X^T X`` with ``X = x.reshape(-1, d)`` (``x``: ``(..., d)``).

    A transposed view ``x`` (``(..., d, T)`` in memory: convolution patches and output
    cotangents) is gathered as ``(d, ...)`` in runs of ``T`` contiguous entries, not by a
    strided copy of every entry.
    """
    d = x.shape[-1]
    if transposed_view(x):
        f = x.movedim(-1, 0).reshape(d, -1)
        total.addmm_(f, f.T, alpha=alpha)
    else:
        flat = x.reshape(-1, d)
        total.addmm_(flat.T, flat, alpha=alpha)


def accumulate_corrections(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
    kron: dict[str, KronBlock],
    dtype: torch.dtype,
    info: dict[str, Any],
) -> dict[str, Tensor]:
    r"""EKFAC's :math:`D = \sum_{k,n} (Q_G^\top \Gamma_{kn} Q_A)^{\odot 2}` per Kronecker block."""
    found: dict[str, Tensor] = {}
    for first, layer in _layer_passes(fmodel, loss_fn, batches, weights, factor, info, False):
        if first is None:
            continue
        block = kron.get(layer.name)
        if block is None:
            continue
        form = _kron_form(layer, dtype, "expand")
        assert form is not None
        a, g, num = form
        _, qg, _, qa = block.eigh()
        gr = g @ qg  # (K, N, T, out)
        total = found.get(layer.name)
        if total is None:
            total = found[layer.name] = gr.new_zeros(block.G.shape[0], block.A.shape[0])
        if num is not None:  # Q_A = I
            _add_onehot_squares(total, gr, a, num)
        else:
            _add_rotated_squares(total, gr, times_a(block.augment(a), qa))  # (N, T, d~)
    return found


def _add_onehot_squares(total: Tensor, gr: Tensor, index: Tensor, num: int) -> None:
    r"""``total += sum_{k,n} (sum_t gr_knt e_{x_nt}^T)^2`` (``total`` ``(out, num)``).

    Sample :math:`n`'s column :math:`v` is the sum of its rows at the positions holding
    :math:`v`: one row per distinct ``(n, v)`` pair, never ``(N, num, out)``.
    """
    K, N, _, out = gr.shape
    n = torch.arange(N, device=index.device).unsqueeze(1)
    rows = (n * num + index).reshape(-1)
    keep = index.reshape(-1) >= 0
    pairs, inverse = torch.unique(rows[keep], return_inverse=True)
    acc = gr.new_zeros(K, pairs.numel(), out)
    acc.index_add_(1, inverse, gr.reshape(K, -1, out)[:, keep])
    total.T.index_add_(0, pairs % num, acc.square().sum(0))


def _add_rotated_squares(total: Tensor, gr: Tensor, ar: Tensor) -> None:
    r"""``total += sum_{k,n} (sum_t gr_knt ar_nt^T)^2`` (``gr``: (K, N, T, out), ``ar``: (N, T, d)).

    Without sharing (``T = 1``) the square of an outer product is the outer product of the
    squares: :math:`\sum_n (\sum_k \tilde g_{kn}^{\odot 2}) (\tilde a_n^{\odot 2})^\top`, one
    matrix product. With sharing, the Gram form
    :math:`\sum_{n,s,t} (\sum_k \tilde g_{kns} \odot \tilde g_{knt})
    (\tilde a_{ns} \odot \tilde a_{nt})^\top` where :math:`T^2 (out + d) < out\, d` (as
    curvlinops chooses), else the per-sample cotangents, in chunks of samples.
    """
    K, N, T, out = gr.shape
    d = ar.shape[-1]
    if T == 1:
        total.addmm_(gr.square().sum(0).reshape(N, out).T, ar.square().reshape(N, d))
        return
    gram = T * T * (out + d) < out * d
    per = T * T * (K * out + d) if gram else K * out * d + T * d
    step = max(1, _CHUNK_ELEMENTS // max(1, per))
    for s in range(0, N, step):
        g, a = gr[:, s : s + step], ar[s : s + step]
        if gram:
            gg = torch.einsum("knso,knto->nsto", g, g).reshape(-1, out)
            aa = torch.einsum("nsd,ntd->nstd", a, a).reshape(-1, d)
            total.addmm_(gg.T, aa)
        else:
            gam = torch.einsum("knto,ntd->knod", g, a)
            total.add_(gam.square().sum((0, 1)))
