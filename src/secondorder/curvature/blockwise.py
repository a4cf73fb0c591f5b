r"""Exact diagonal blocks of the GGN, the Hessian and the positive-curvature Hessian (PCH).

For an ``nn.Sequential`` :math:`z_0 = x,\ z_j = f_j(z_{j-1}; \theta_j)` with loss
:math:`L(z_m)`, the Hessian of the loss with respect to an intermediate output obeys the
backward recursion of *Hessian backpropagation* (Dangel et al., 2020),

.. math::

    H_{z_{j-1}} = J_j^\top H_{z_j} J_j
        + \rho\Big(\sum_k (\delta_j)_k \, \nabla^2_{z_{j-1}} (f_j)_k\Big),
    \qquad H_{z_m} = \nabla^2_{z_m} L, \quad \delta_j = \nabla_{z_j} L,

with :math:`J_j = \partial z_j / \partial z_{j-1}`, and the diagonal block of a parameter
tensor :math:`\theta_j` is

.. math::

    C_{\theta_j} = J_{\theta_j}^\top H_{z_j} J_{\theta_j},
    \qquad J_{\theta_j} = \partial z_j / \partial \theta_j .

The residual term vanishes for layers that are linear in their input (``Linear``, ``Conv``,
pooling, ``Flatten``) and for piecewise-linear ones (``ReLU``, ``MaxPool``); for an elementwise
activation :math:`f` it is the diagonal :math:`\operatorname{diag}(\delta_j \odot f''(z_{j-1}))`.
Since :math:`\partial^2 z_j / \partial \theta_j^2 = 0` for ``Linear`` and ``Conv`` layers, the
choice of :math:`\rho` gives

- ``"hessian"``: :math:`\rho(R) = R` -- the exact diagonal blocks of the Hessian;
- ``"ggn"``: :math:`\rho(R) = 0` -- the diagonal blocks of the generalized Gauss-Newton matrix;
- ``"pch_clip"``: :math:`\rho(R) = \max(R, 0)` and ``"pch_abs"``: :math:`\rho(R) = |R|`
  (elementwise on the diagonal) -- the positive-curvature Hessian, positive semi-definite
  whenever the loss is convex in :math:`z_m`, and equal to the Hessian blocks where every
  residual is non-negative.

Nothing is materialised: :math:`H_{z_j}` is a closure. A product with a block pushes the
tangent :math:`J_{\theta_j} v` forward through the layers above (forward mode on the values
stored by one forward pass), applies the loss Hessian in closed form, and pulls it back,
adding :math:`\rho(R)` times the stored forward tangent at every activation. Products with
several blocks share one sweep: tangents of lower blocks are pushed through the layers above
them together with the tangents of the blocks they meet, as columns of one batch, and peeled
off on the way back; :func:`~secondorder.linalg.block_cg.block_cg` uses this to run one CG
per block in lock-step.

References:
    F. Dangel, S. Harmeling, P. Hennig, "Modular block-diagonal curvature approximations for
    feedforward architectures", AISTATS 2020 (Hessian backpropagation, PCH).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, finite_floats
from ..linalg.operator import LinearOperator
from ..linalg.precision import autocast_disabled
from .base import allreduce_sum, global_count
from .blockwise_layers import parameter_layers, sequential_blocks
from .blockwise_pass import Pass, forward_pass
from .ggn import GGN
from .hessian import Hessian
from .model import Batch, FunctionalModel, as_batches
from .vocabulary import BLOCK_CURVATURES, NON_GRAPH_ENGINES, canonical_engine
from .weighting import batch_weights

__all__ = [
    "CURVATURES",
    "ENGINES",
    "BlockDiagonalCurvature",
    "sequential_blocks",
]

CURVATURES = BLOCK_CURVATURES
ENGINES = NON_GRAPH_ENGINES


class BlockDiagonalCurvature(LinearOperator):
    r"""The block-diagonal GGN, Hessian or PCH of an ``nn.Sequential``: one block per parameter.

    The operator is :math:`\operatorname{diag}(C_{\theta_1}, \dots, C_{\theta_P})` on the flat
    parameter vector, with one exact diagonal block

    .. math::

        C_{\theta_j} = \sum_b w_b\, J_{\theta_j,b}^\top H^{\rho}_{z_j,b} J_{\theta_j,b}

    per trainable parameter tensor (weight and bias of a layer are separate blocks), where
    :math:`H^{\rho}_{z_j,b}` is the output Hessian of layer :math:`j` on batch :math:`b`
    backpropagated with the residual terms modified by :math:`\rho` (module docstring) and
    :math:`w_b` the batch weight (:math:`D_b/D` for ``"mean"``, :mod:`.weighting`; 1 for
    ``"sum"``), so several batches sum to the full-batch blocks. ``"hessian"`` blocks equal the
    diagonal blocks of :class:`~secondorder.Hessian`, ``"ggn"`` blocks those of
    :class:`~secondorder.GGN`.

    Building the operator runs one forward and one backward pass per batch (which also give
    :attr:`loss` and :meth:`gradient`); every product then sweeps only through the layers above
    the lowest requested block. :meth:`apply_blocks` applies any subset of blocks to one or
    several vectors each in a single sweep.

    Args:
        model: An ``nn.Sequential`` (nested ones are flattened) of supported layers, called
            on one input tensor; see :func:`sequential_blocks`. Parameters shared between
            layers are not supported.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with reduction ``"mean"`` or
            ``"sum"``; closed forms for cross-entropy, MSE and BCE-with-logits, autograd for
            any other callable.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        curvature: ``"ggn"``, ``"hessian"``, ``"pch_clip"`` or ``"pch_abs"``.
        params: Optional subset of the model's parameters (default: all with
            ``requires_grad``); the others are held fixed and get no block.
        engine: ``"sequential"``: the module-wise engine described above; a model that is not
            an ``nn.Sequential`` of supported layers raises ``ValueError`` naming the layer.
            ``"autograd"``: any module; the blocks of :class:`~secondorder.GGN` or
            :class:`~secondorder.Hessian` (for PCH, the Hessian with ``modify=``) built with
            ``engine="autograd"``, at the price of about one full curvature product per block
            product. ``"auto"`` (default): sequential where supported, else those operators
            on the graph engine (:func:`~secondorder.curvature.engines.dispatch.select`). The
            engine used is in :attr:`engine`.
        process_group: ``torch.distributed`` group (``None``: one process); each rank holds
            its shard of the data, and block products, loss and gradient are all-reduced (one
            flat all-reduce per sweep) and normalised by the global normaliser (:mod:`.weighting`).
        dtype: The dtype of the blocks' vectors and products (default: float32 for a bfloat16
            or float16 model, else the parameters'; see
            :class:`~secondorder.curvature.base.CurvatureOperator`).

    Raises:
        ValueError: For an unknown curvature or engine, an unsupported model or layer with
            ``engine="sequential"`` (the message names it), or parameters shared between layers.

    Example:
        >>> import torch, secondorder as so
        >>> from secondorder.curvature.blockwise import BlockDiagonalCurvature
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> data, loss_fn = (X, y), torch.nn.CrossEntropyLoss()
        >>> B = BlockDiagonalCurvature(model, loss_fn, data, curvature="hessian")
        >>> H = so.Hessian(model, loss_fn, data).to_dense()
        >>> bool(torch.allclose(B.block(0).to_dense(), H[:12, :12]))
        True
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        curvature: str = "ggn",
        params: Sequence[Tensor] | None = None,
        engine: str = "auto",
        process_group: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.process_group = process_group
        check_choice("curvature", curvature, CURVATURES)
        engine = canonical_engine(engine, NON_GRAPH_ENGINES)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.fmodel = FunctionalModel(model, params, dtype)
        super().__init__((self.fmodel.dim, self.fmodel.dim), self.fmodel.dtype, self.fmodel.device)
        with autocast_disabled():
            self._build_blocks(curvature, loss_fn, data, engine)

    def _build_blocks(self, curvature: str, loss_fn: Any, data: Any, engine: str) -> None:
        # the module evaluated: the one under torch.compile's wrapper, or its cast copy
        model = self.fmodel.model
        self.curvature = curvature
        self.loss_fn = loss_fn
        batches = [self.fmodel.cast_batch(b) for b in as_batches(data)]
        one_tensor = all(len(b.inputs) == 1 and isinstance(b.inputs[0], Tensor) for b in batches)
        if engine == "sequential" and not one_tensor:
            raise ValueError(
                "engine='sequential' calls the nn.Sequential on one input tensor per batch, got "
                f"{len(batches[0].inputs)} inputs"
            )
        specs: list[tuple[str, nn.Module]] | None = None
        if engine != "autograd" and one_tensor:
            try:
                specs = sequential_blocks(model)
                self._layer_of = parameter_layers(specs, self.fmodel)
            except ValueError:
                if engine == "sequential":
                    raise
                specs = None
        self.engine = "sequential" if specs is not None else "autograd"
        if specs is None:  # engine="autograd" is passed on; under "auto" GGN/Hessian choose
            engine = "autograd" if engine == "autograd" else "auto"
            self._build_autograd(self.fmodel.source, batches, engine)
        else:
            self._build_sequential(specs, batches)

    def _build_autograd(self, model: nn.Module, batches: list[Batch], engine: str) -> None:
        """Blocks of a generic curvature operator (PCH: the Hessian with ``modify``)."""
        params = self.fmodel.params
        op: GGN | Hessian
        kw: dict[str, Any] = {
            "params": params,
            "process_group": self.process_group,
            "dtype": self.dtype,
        }
        if self.curvature == "ggn":
            op = GGN(model, self.loss_fn, batches, engine=engine, **kw)
        elif self.curvature == "hessian":
            op = Hessian(model, self.loss_fn, batches, engine=engine, **kw)
        else:  # the PCH: the Hessian with every activation's residual modified
            modify = self.curvature[len("pch_") :]
            op = Hessian(model, self.loss_fn, batches, engine=engine, modify=modify, **kw)
        self._op = op
        self.IS_PSD = self.curvature == "ggn" and op.IS_PSD
        self._loss = op.loss
        self._gradient = op.gradient()

    def _build_sequential(self, specs: list[tuple[str, nn.Module]], batches: list[Batch]) -> None:
        self._specs = specs
        self._lowest = min(j for j, _ in self._layer_of)
        sizes = [b.size for b in batches]
        self.num_samples = global_count(sum(sizes), self.process_group)
        weighting = batch_weights(self.loss_fn, batches, self.fmodel, self.process_group)
        weights = weighting.weights(batches)  # D_b / D (.weighting); 0: every target ignored
        self._passes = [
            forward_pass(self.fmodel, specs, self.loss_fn, b, w, self.curvature, self._lowest)
            for b, w in zip(batches, weights)
            if w != 0.0
        ]
        self.IS_PSD = self.curvature != "hessian" and all(p.terms.is_psd for p in self._passes)
        self._loss = torch.stack([p.loss * p.weight for p in self._passes]).sum()
        grads = [
            sum(p.gradient[i] * p.weight for p in self._passes) for i in range(self.num_blocks)
        ]
        loss_and_grad = allreduce_sum(
            [self._loss.reshape(1), self.fmodel.flatten(grads)],  # type: ignore[arg-type]
            self.process_group,
        )
        self._loss = loss_and_grad[0].reshape(())
        self._gradient = loss_and_grad[1]

    # ---------------------------------------------------------------------- products
    @property
    def num_blocks(self) -> int:
        """Number of diagonal blocks (trainable parameter tensors)."""
        return len(self.fmodel.params)

    @property
    def block_sizes(self) -> list[int]:
        """Size of each block (``numel`` of its parameter)."""
        return list(self.fmodel.numels)

    def _sweep(
        self,
        p: Pass,
        entries: dict[int, list[tuple[int, Tensor]]],
        shifts: dict[int, float] | None = None,
    ) -> dict[int, Tensor]:
        """Apply the blocks in ``entries`` (layer -> [(block, (k, *shape))]) in one sweep.

        ``shifts`` (block -> lambda) adds ``lambda * v`` to those blocks' products.
        """
        lo = min(entries)
        layers = p.layers
        cols: Tensor | None = None
        taps: dict[int, Tensor] = {}
        counts: dict[int, list[int]] = {}
        for j in range(lo, len(layers)):
            layer = layers[j]
            if cols is not None:
                if p.residuals[j] is not None:
                    taps[j] = cols
                cols = layer.jvp(cols)
            if j in entries:
                role_of = self._layer_of
                new = [layer.param_jvp(role_of[i][1], v) for i, v in entries[j]]
                counts[j] = [t.shape[0] for t in new]
                parts = new if cols is None else [cols, *new]
                cols = parts[0] if len(parts) == 1 else torch.cat(parts)
        assert cols is not None
        u = p.terms.hessian_matmat(cols)
        out: dict[int, Tensor] = {}
        for j in range(len(layers) - 1, lo - 1, -1):
            layer = layers[j]
            if j in counts:
                k_old = u.shape[0] - sum(counts[j])
                parts = u[k_old:].split(counts[j])
                for (i, v), part in zip(entries[j], parts):
                    role = self._layer_of[i][1]
                    shift = shifts.get(i, 0.0) if shifts else 0.0
                    if shift == 0.0:
                        out[i] = layer.param_vjp(role, part)
                    else:
                        out[i] = layer.param_vjp_plus(role, part, v, shift)
                if k_old == 0:
                    break
                u = u[:k_old]
            u_in = layer.vjp(u)
            if j in taps:
                u_in = u_in + p.residuals[j] * taps[j]  # type: ignore[operator]
            u = u_in
        return out

    @torch.no_grad()
    def apply_blocks(
        self,
        indices: Sequence[int],
        vectors: Sequence[Tensor],
        shift: float | Sequence[float] = 0.0,
    ) -> list[Tensor]:
        r"""Apply the blocks ``indices`` to ``vectors`` in one sweep per batch.

        Computes :math:`(C_{\theta_i} + \lambda_i I) v_i`; with the default ``shift=0`` the
        plain block products. A shift costs nothing extra where the block's product ends in
        a matrix product (Linear weights with one batch): :math:`\lambda_i v_i` enters it as
        the accumulator.

        Args:
            indices: Distinct block indices (positions in ``self.fmodel.params``).
            vectors: One tensor per index: ``(p_i,)`` or ``(p_i, k_i)`` for ``k_i`` columns,
                with ``p_i`` the block's size.
            shift: :math:`\lambda_i`, one float for all blocks or one per index.

        Returns:
            :math:`(C_{\theta_i} + \lambda_i I) v_i` for every index, shaped like the vector.

        Raises:
            ValueError: If the lengths differ, an index repeats or is out of range, a vector
                has the wrong shape, or a shift is not a finite float.
        """
        if len(indices) != len(vectors):
            raise ValueError(f"got {len(indices)} indices but {len(vectors)} vectors")
        if len(set(indices)) != len(indices):
            raise ValueError(f"block indices must be distinct, got {list(indices)}")
        shifts = finite_floats("shift", shift, len(indices))
        if not indices:
            return []
        for i, v in zip(indices, vectors):
            if not 0 <= i < self.num_blocks:
                raise ValueError(f"block index must be in [0, {self.num_blocks}), got {i}")
            n = self.fmodel.numels[i]
            if v.ndim not in (1, 2) or v.shape[0] != n:
                raise ValueError(
                    f"block {i} ({self.fmodel.names[i]}): expected a vector of shape ({n},) or "
                    f"({n}, k), got {tuple(v.shape)}"
                )
        if self.engine == "autograd":
            results = [self._op.block(i) @ v.to(self.dtype) for i, v in zip(indices, vectors)]
            return [
                r if s == 0.0 else r.add(v.to(self.dtype), alpha=s)
                for r, v, s in zip(results, vectors, shifts)
            ]
        entries: dict[int, list[tuple[int, Tensor]]] = {}
        for i, v in zip(indices, vectors):
            cols = v.unsqueeze(0) if v.ndim == 1 else v.T
            tangent = cols.reshape(cols.shape[0], *self.fmodel.shapes[i]).to(self.dtype)
            entries.setdefault(self._layer_of[i][0], []).append((i, tangent))
        # the shift goes into the sweep when its products are the final ones (one batch of
        # weight 1, one process); otherwise it is added after the sum
        fused = (
            len(self._passes) == 1 and self._passes[0].weight == 1.0 and self.process_group is None
        )
        shift_of = {i: s for i, s in zip(indices, shifts) if s != 0.0}
        total: dict[int, Tensor] = {}
        for p in self._passes:
            part = self._sweep(p, entries, shift_of if fused else None)
            for i, t in part.items():
                t = t * p.weight if p.weight != 1.0 else t
                total[i] = total[i] + t if i in total else t
        reduced = allreduce_sum([total[i] for i in indices], self.process_group)
        total = dict(zip(indices, reduced))
        results = []
        for i, v in zip(indices, vectors):
            r = total[i].reshape(total[i].shape[0], -1)
            r = r[0] if v.ndim == 1 else r.T
            if not fused and i in shift_of:
                r = r.add(v.to(self.dtype), alpha=shift_of[i])
            results.append(r)
        return results

    def _split(self, X: Tensor) -> list[Tensor]:
        return list(X.split(self.fmodel.numels, dim=0))

    def _matmat(self, X: Tensor) -> Tensor:
        parts = self._split(X)
        return torch.cat(self.apply_blocks(range(self.num_blocks), parts), dim=0)  # type: ignore[arg-type]

    def _matvec(self, x: Tensor) -> Tensor:
        parts = self._split(x)
        return torch.cat(self.apply_blocks(range(self.num_blocks), parts))  # type: ignore[arg-type]

    def block(self, index: int) -> LinearOperator:
        """The diagonal block of parameter tensor ``index`` as a symmetric operator.

        Args:
            index: Position of the parameter in ``self.fmodel.params``.

        Returns:
            An operator of size ``numel(param)`` whose products sweep only from its layer up.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block index must be in [0, {self.num_blocks}), got {index}")
        return _Block(self, index)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """Return the dense block-diagonal matrix, built block by block.

        Args:
            chunk_size: Number of identity columns applied at once.

        Returns:
            The ``(n, n)`` matrix (zero outside the diagonal blocks).
        """
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        start = 0
        for i in range(self.num_blocks):
            n = self.fmodel.numels[i]
            out[start : start + n, start : start + n] = self.block(i).to_dense(chunk_size)
            start += n
        return out

    # ------------------------------------------------------------------------ extras
    @property
    def loss(self) -> Tensor:
        """The loss on the operator's data at the operator's parameters."""
        return self._loss

    def gradient(self) -> Tensor:
        r"""The flat gradient :math:`\nabla_\theta L` on the operator's data.

        Returns:
            The gradient, shape ``(n,)``, from the backward pass made when building.
        """
        return self._gradient


class _Block(LinearOperator):
    """One diagonal block of a :class:`BlockDiagonalCurvature`."""

    SELF_ADJOINT = True

    def __init__(self, parent: BlockDiagonalCurvature, index: int) -> None:
        n = parent.fmodel.numels[index]
        super().__init__((n, n), parent.dtype, parent.device)
        self.parent = parent
        self.index = index
        self.IS_PSD = parent.IS_PSD

    def _matvec(self, x: Tensor) -> Tensor:
        return self.parent.apply_blocks([self.index], [x])[0]

    def _matmat(self, X: Tensor) -> Tensor:
        return self.parent.apply_blocks([self.index], [X])[0]


# -------------------------------------------------------------------------- lock-step CG
