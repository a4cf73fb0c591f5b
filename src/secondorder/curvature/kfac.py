r"""K-FAC and EKFAC: Kronecker-factored curvature as operators on the flat parameter vector.

Per layer with a Kronecker form (:mod:`.kfac_factors`: ``nn.Linear`` on ``(N, d)`` or
``(N, ..., d)`` inputs, ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``, the projections of
``nn.MultiheadAttention`` (:mod:`.kfac_attention`), ``nn.Embedding`` with a diagonal ``A``
applied as ``V * A``), the block of
``[W | b]`` (weight viewed row-major as ``(out, d)``, bias as an extra column) is

.. math::
    \text{K-FAC:}\quad G \otimes A, \qquad
    \text{EKFAC:}\quad (Q_G \otimes Q_A) \operatorname{diag}(\operatorname{vec} D)
    (Q_G \otimes Q_A)^\top,

applied to ``V`` (``(out, d~)``) as :math:`G V A` or :math:`Q_G ((Q_G^\top V Q_A) \odot D)
Q_A^\top`. Every other selected parameter gets its exact block (dense or diagonal); the
blocks of different layers (and parameters) are zero. :attr:`KFAC.structure` names each
parameter's kind. :meth:`KFAC.inverse` applies :math:`(G \otimes A + \lambda I)^{-1}
= (Q_G \otimes Q_A) \operatorname{diag}(1 / (\lambda_G \lambda_A^\top + \lambda))
(Q_G \otimes Q_A)^\top` (EKFAC: :math:`1 / (D + \lambda)`) from the factors'
eigendecompositions; ``inverse(damping, method="cholesky")`` applies the factored Tikhonov
damping instead, :math:`(G + \delta_G I)^{-1} V (A + \delta_A I)^{-1}` with explicit inverses
(:mod:`.kron_inverse`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..linalg.operator import LinearOperator
from .base import allreduce_sum, global_count
from .kfac_blocks import BlockLayout, KronBlock, OtherBlock, kron_solve, times_a
from .kfac_factors import (
    APPROXES,
    FISHERS,
    NoPerSample,
    accumulate_corrections,
    accumulate_factors,
    row_factor,
)
from .kron_inverse import damped_inverse, factored_damping
from .losses import LossTerms
from .model import FunctionalModel, as_batches
from .random_state import one_draw_per_batch
from .weighting import batch_weights

__all__ = ["EKFAC", "KFAC", "METHODS", "KroneckerInverse"]

METHODS = ("eigen", "cholesky")
"""Ways :meth:`KFAC.inverse` inverts (exact damping by eigendecompositions; factored damping)."""


class KFAC(LinearOperator):
    r"""K-FAC approximation of the GGN / Fisher of (model, loss, data) (module docstring).

    **Engines.** Where the model is traceable, its selected parameters all sit in layers with
    per-sample rules and its steps keep the samples apart
    (:mod:`~secondorder.curvature.engines.factors`), one reverse pass of the output columns over
    the graph engine's steps gives every layer's cotangents (``engine == "sequential"``). Any
    other model whose samples do not interact (attention written with matrix products,
    ``nn.TransformerEncoderLayer``, ...) goes through autograd
    (:mod:`~secondorder.curvature.kfac_autograd`, ``engine == "autograd"``): Linear,
    convolution and embedding modules called once per forward pass and the projections of
    ``nn.MultiheadAttention`` (:mod:`~secondorder.curvature.kfac_attention`: the packed
    ``in_proj_weight`` as one block for self-attention, row blocks where the query or the key
    differ) get Kronecker blocks, every other parameter its exact diagonal.
    ``nn.Embedding`` has a diagonal input factor (:mod:`~.kfac_factors`). A parameter used
    twice (tied weights, a weight also read directly) keeps its exact diagonal.

    Args:
        model: Any ``nn.Module`` whose samples do not interact (no BatchNorm with batch
            statistics); called as ``model(*inputs)``. Dropout in training mode (modules,
            ``F.dropout``, attention's ``dropout_p``) is linearised at one mask per batch, the
            model's own draw: every pass over a batch (factors, other blocks, EKFAC's
            corrections) replays it, so the operator is K-FAC of the network thinned by that
            mask; the generators are left where one forward pass per batch leaves them.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (no
            weights), reduction ``"mean"`` or ``"sum"``.
        data: One batch ``(inputs, targets)`` or an iterable of batches; the factors sum over
            all of them with the batch weights of :mod:`~secondorder.curvature.weighting`.
        fisher: ``"mc"`` (targets drawn from the model, ``num_samples`` per row), ``"exact"``
            (the loss Hessian's symmetric factor: K-FAC of the GGN) or ``"empirical"`` (the
            true targets' gradients).
        approx: ``"expand"`` (every shared position a sample) or ``"reduce"`` (inputs averaged
            and output cotangents summed over the shared positions first).
        num_samples: Targets drawn per row for ``fisher="mc"``.
        generator: Random generator for ``"mc"`` (default: a fresh one seeded 0).
        params: Parameters to approximate over (default: all trainable).
        factor_dtype: dtype of the factors and their eigendecompositions (default: float64 for
            a float64 model, else float32).
        damping_floor: The smallest damping :meth:`inverse` applies (absolute).
        process_group: A ``torch.distributed`` group whose ranks hold shards of the data; the
            factors are all-reduced, so every rank gets the full-data operator.
        engine: ``"auto"`` (the graph engine where it serves, else autograd) or
            ``"autograd"`` (skip the graph engine's attempt, e.g. for a model it refused
            before); both give the same factors.

    Attributes:
        structure: Parameter name -> ``"kronecker"``, ``"dense"`` or ``"diagonal"``.
        engine: ``"sequential"`` or ``"autograd"`` (the last batch's); ``engine_reason`` says
            why the graph engine did not serve (None if it did).
        blocks: The Kronecker blocks by graph node (:class:`~.kfac_blocks.KronBlock`).

    Raises:
        ValueError: For an unknown ``fisher`` or ``approx``, a loss without a likelihood, a
            model whose samples interact (BatchNorm with batch statistics), or a Kronecker
            layer called twice in one forward.

    Example:
        >>> import torch, secondorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        >>> K = so.KFAC(model, torch.nn.MSELoss(), (X, y), fisher="exact")
        >>> v = torch.randn(K.shape[0], dtype=torch.float64)
        >>> bool(torch.allclose(K.inverse(1e-3) @ (K @ v + 1e-3 * v), v))
        True
    """

    SELF_ADJOINT = True
    IS_PSD = True
    _EIGENVALUE_CORRECTED = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        fisher: str = "mc",
        approx: str = "expand",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        params: Sequence[Tensor] | None = None,
        factor_dtype: torch.dtype | None = None,
        damping_floor: float = 1e-10,
        process_group: Any = None,
        engine: str = "auto",
    ) -> None:
        check_choice("fisher", fisher, FISHERS)
        check_choice("engine", engine, ("auto", "autograd"))
        check_choice("approx", approx, APPROXES)
        check_int("num_samples", num_samples, 1)
        if fisher != "mc" and num_samples != 1:
            raise ValueError(f"num_samples applies to fisher='mc' only, got {num_samples}")
        if not (isinstance(damping_floor, (int, float)) and damping_floor >= 0):
            raise ValueError(f"damping_floor must be a number >= 0, got {damping_floor!r}")
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype}"
            )
        self.fmodel = fm = FunctionalModel(model, params)
        super().__init__((fm.dim, fm.dim), fm.dtype, fm.device)
        self.fisher, self.approx, self.num_samples = fisher, approx, num_samples
        if fisher == "mc" and generator is None:
            generator = torch.Generator(device=fm.device).manual_seed(0)
        self.generator = generator
        self.damping_floor = float(damping_floor)
        self.factor_dtype = factor_dtype or (
            torch.float64 if fm.dtype == torch.float64 else torch.float32
        )
        self.process_group = process_group
        batches = [fm.cast_batch(b) for b in as_batches(data)]
        # every pass on a batch (a generic loss's reduction check, factors, diagonals, EKFAC's
        # corrections) replays one draw of the default generators: one dropout mask per batch
        # (inside an optimizer step, the step's)
        with one_draw_per_batch(fm.device):
            weights = batch_weights(loss_fn, batches, fm, process_group).weights(batches)
            state = generator.get_state() if generator is not None else None
            info: dict[str, Any] = {}
            if engine == "autograd":  # skip the graph engine's trace (known not to serve)
                info["force"] = "engine='autograd' was chosen"
            try:
                kron, other = accumulate_factors(
                    fm, loss_fn, batches, weights, self._factor, approx, self.factor_dtype, info
                )
            except NoPerSample as why:  # a layer the graph engine cannot split: autograd
                if generator is not None and state is not None:
                    generator.set_state(state)
                info = {"force": str(why)}
                kron, other = accumulate_factors(
                    fm, loss_fn, batches, weights, self._factor, approx, self.factor_dtype, info
                )
            self.engine: str = info.get("engine", "sequential")
            self.engine_reason: str | None = info.get("reason") or info.get("force")
            self.num_data = global_count(sum(b.size for b in batches), process_group)
            self._reduce(kron, other)
            for block in kron.values():
                block.A.div_(self.num_data)
            if self._EIGENVALUE_CORRECTED:
                if generator is not None and state is not None:
                    generator.set_state(state)  # the same draws as the factors
                D = accumulate_corrections(
                    fm, loss_fn, batches, weights, self._factor, kron, self.factor_dtype, info
                )
                names = sorted(kron)
                found = [
                    D.get(n, kron[n].A.new_zeros(kron[n].G.shape[0], kron[n].A.shape[0]))
                    for n in names
                ]
                reduced = allreduce_sum(found, process_group)
                for n, d in zip(names, reduced):
                    kron[n].D = d
        self.blocks, self._other = kron, other
        self._offsets = [0]
        for numel in fm.numels:
            self._offsets.append(self._offsets[-1] + numel)
        kronecker = {i for b in kron.values() for i in (b.weight, b.bias) if i is not None}
        for i in range(len(fm.names)):
            if i not in kronecker and i not in other:  # the cotangents never reached it: zero
                zero = torch.zeros(fm.numels[i], dtype=self.factor_dtype, device=fm.device)
                other[i] = OtherBlock(i, "diagonal", zero)
        self.structure: dict[str, str] = {
            name: "kronecker" if i in kronecker else other[i].kind
            for i, name in enumerate(fm.names)
        }

    # ---------------------------------------------------------------- setup
    def _factor(self, terms: LossTerms, weight: float) -> tuple[Tensor, bool]:
        return row_factor(terms, weight, self.fisher, self.num_samples, self.generator)

    def _reduce(self, kron: dict[str, KronBlock], other: dict[int, OtherBlock]) -> None:
        """All-reduce every factor and block over the process group (in place)."""
        if self.process_group is None:
            return
        names, idx = sorted(kron), sorted(other)
        tensors = [t for n in names for t in (kron[n].A, kron[n].G)]
        tensors += [other[i].value for i in idx]
        reduced = allreduce_sum(tensors, self.process_group)
        for k, n in enumerate(names):
            kron[n].A, kron[n].G = reduced[2 * k], reduced[2 * k + 1]
        for k, i in enumerate(idx):
            other[i].value = reduced[2 * len(names) + k]

    # ------------------------------------------------------------- products
    def _slice(self, i: int) -> slice:
        return slice(self._offsets[i], self._offsets[i + 1])

    def _layout(self, block: KronBlock) -> BlockLayout:
        return BlockLayout.of(
            self._offsets,
            block.weight,
            block.bias,
            block.out,
            block.d,
            block.wrow,
            block.brow,
            block.transposed,
        )

    def _apply_block(self, block: KronBlock, V: Tensor, damping: float | None) -> Tensor:
        """``(G ⊗ A) V`` (``damping`` None) or ``(G ⊗ A + damping I)^{-1} V``."""
        if damping is None:
            return times_a(block.G @ V, block.A)
        return kron_solve(V, block.eigh(), damping)

    def _apply(self, X: Tensor, damping: float | None) -> Tensor:
        Xf = X.to(self.factor_dtype)
        Y = torch.zeros(Xf.shape, dtype=Xf.dtype, device=Xf.device)  # contiguous
        for block in self.blocks.values():
            layout = self._layout(block)
            layout.scatter(Y, self._apply_block(block, layout.gather(Xf), damping))
        for i, blk in self._other.items():
            sl = self._slice(i)
            if blk.kind == "diagonal":
                d = blk.value if damping is None else 1.0 / (blk.value.clamp_min(0) + damping)
                Y[sl] = d[:, None] * Xf[sl]
            elif damping is None:
                Y[sl] = blk.value @ Xf[sl]
            else:
                e, q = _dense_eigh(blk)
                Y[sl] = q @ ((q.T @ Xf[sl]) / (e[:, None] + damping))
        return Y.to(self.dtype)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, None)

    def inverse(self, damping: float, method: str = "eigen") -> KroneckerInverse:
        r"""The operator :math:`(K + \lambda I)^{-1}` with :math:`\lambda` = ``damping``.

        ``method="eigen"`` (the default): exact, applied block by block through the
        eigendecompositions of the factors (computed once, in ``factor_dtype``).
        ``method="cholesky"`` (K-FAC only): each Kronecker block damped as
        :math:`(G + \tfrac{\sqrt\lambda}{\pi} I) \otimes (A + \pi\sqrt\lambda I)`
        (Martens & Grosse's factored Tikhonov damping, :mod:`.kron_inverse`; not
        :math:`G \otimes A + \lambda I`) and inverted through explicit inverses of the damped
        factors, two matrix products per block; the other blocks get
        :math:`(B + \lambda I)^{-1}`. :math:`\lambda` is raised to ``damping_floor`` if smaller.

        Args:
            damping: :math:`\lambda \ge 0`.
            method: ``"eigen"`` or ``"cholesky"``.

        Returns:
            A symmetric positive definite :class:`KroneckerInverse`.

        Raises:
            ValueError: If ``damping`` is negative or not a number, or for an unknown
                ``method`` (``"cholesky"`` on EKFAC, whose blocks are not Kronecker products).
        """
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
            raise ValueError(f"damping must be a number >= 0, got {damping!r}")
        check_choice("method", method, ("eigen",) if self._EIGENVALUE_CORRECTED else METHODS)
        return KroneckerInverse(self, max(float(damping), self.damping_floor), method)

    def _factored_inverses(self, damping: float) -> tuple[dict[str, Any], list[str]]:
        """Explicit inverses of every damped factor and other block (``method="cholesky"``)."""
        out: dict[str, Any] = {}
        failed: list[str] = []
        for name, block in self.blocks.items():
            dg, da = factored_damping(block.A, block.G, damping)
            gi, ok_g = damped_inverse(block.G, dg)
            ai, ok_a = damped_inverse(block.A, da)
            failed += [f"{name}.{f}" for f, ok in (("G", ok_g), ("A", ok_a)) if not ok]
            out[name] = (gi, ai)
        for i, blk in self._other.items():
            inv, ok = damped_inverse(blk.value, damping)
            out[str(i)] = inv
            if not ok:
                failed.append(str(i))
        return out, failed

    def _apply_inverses(self, X: Tensor, inverses: dict[str, Any]) -> Tensor:
        Xf = X.to(self.factor_dtype)
        Y = torch.zeros(Xf.shape, dtype=Xf.dtype, device=Xf.device)  # contiguous
        for name, block in self.blocks.items():
            gi, ai = inverses[name]
            layout = self._layout(block)
            layout.scatter(Y, times_a(gi @ layout.gather(Xf), ai))
        for i in self._other:
            sl, inv = self._slice(i), inverses[str(i)]
            Y[sl] = inv @ Xf[sl] if inv.ndim == 2 else inv[:, None] * Xf[sl]
        return Y.to(self.dtype)


class EKFAC(KFAC):
    r"""Eigenvalue-corrected K-FAC (George et al., 2018): K-FAC's eigenbasis, exact eigenvalues.

    Same arguments as :class:`KFAC`. After the factors :math:`A = Q_A \Lambda_A Q_A^\top` and
    :math:`G = Q_G \Lambda_G Q_G^\top`, a second pass over the data re-estimates the diagonal in
    their Kronecker eigenbasis from the per-sample cotangents
    :math:`\Gamma_{kn} = \sum_t g_{knt} \tilde a_{nt}^\top`:
    :math:`D = \sum_{k,n} (Q_G^\top \Gamma_{kn} Q_A)^{\odot 2}` (``(out, d~)``), the diagonal of
    the exact block in that basis; the Monte-Carlo draws of both passes are the same.
    """

    _EIGENVALUE_CORRECTED = True

    def _apply_block(self, block: KronBlock, V: Tensor, damping: float | None) -> Tensor:
        _, qg, _, qa = block.eigh()
        assert block.D is not None
        D = block.D if damping is None else 1.0 / (block.D.clamp_min(0) + damping)
        return qg @ times_a(times_a(qg.T @ V, qa) * D, qa, transpose=True)


class KroneckerInverse(LinearOperator):
    r""":math:`(K + \lambda I)^{-1}` of a :class:`KFAC` or :class:`EKFAC` (see ``inverse``).

    Attributes:
        fallbacks: With ``method="cholesky"``, the factors (``"layer.G"``, ``"layer.A"``) and
            other blocks (parameter index) whose Cholesky factorisation failed, after the first
            product; their inverses came from the eigendecomposition, eigenvalues clamped at 0.
    """

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(self, parent: KFAC, damping: float, method: str = "eigen") -> None:
        super().__init__(parent.shape, parent.dtype, parent.device)
        self.parent, self.damping, self.method = parent, damping, method
        self._inverses: dict[str, Any] | None = None
        self.fallbacks: list[str] = []

    def _matmat(self, X: Tensor) -> Tensor:
        if self.method == "eigen":
            return self.parent._apply(X, self.damping)
        if self._inverses is None:
            self._inverses, self.fallbacks = self.parent._factored_inverses(self.damping)
        return self.parent._apply_inverses(X, self._inverses)


def _dense_eigh(blk: OtherBlock) -> tuple[Tensor, Tensor]:
    cached = getattr(blk, "_eig", None)
    if cached is None:
        e, q = torch.linalg.eigh(blk.value)
        cached = (e.clamp_min(0), q)
        blk._eig = cached  # type: ignore[attr-defined]
    return cached
