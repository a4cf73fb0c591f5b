r"""Running K-FAC factors of an optimizer: averaging, eigendecompositions, damped inverse.

The factors come from :class:`~secondorder.curvature.KFAC` built on one step's batch (its
accumulation, nothing else); :class:`RunningKFAC` keeps their exponential averages as plain
tensors (``state_dict``-ready),

.. math::
    A \leftarrow \beta A + (1 - \beta) A_{\text{batch}}, \qquad
    G \leftarrow \beta G + (1 - \beta) G_{\text{batch}}

(the first batch sets them; ``\beta`` = ``factor_decay``), and likewise each diagonal or dense
block of a parameter outside the Kronecker layers. :meth:`RunningKFAC.decompose` computes
:math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G Q_G^\top` (and the dense blocks'),
which :meth:`RunningKFAC.solve` uses until the next decomposition:

.. math::
    (G \otimes A + \lambda I)^{-1} \operatorname{vec} V
    = \operatorname{vec}\big(Q_G \big[(Q_G^\top V Q_A) \oslash
    (\lambda_G \lambda_A^\top + \lambda)\big] Q_A^\top\big)

for the block ``V`` (``(out, d~)``: weight row-major then the bias column) of each layer. A
diagonal (1-D) ``A`` (one-hot inputs, ``nn.Embedding``) has :math:`Q_A = I`; a block may sit in
rows of a packed parameter (``"wrow"``, ``"brow"``) or in a weight stored ``(d, out)``
(``"transposed"``), as :class:`~secondorder.curvature.kfac_blocks.KronBlock`.

With ``inverse="cholesky"``, :meth:`RunningKFAC.decompose` instead forms the explicit inverses of
the factors under factored Tikhonov damping (:mod:`~secondorder.curvature.kron_inverse`) at the
damping given, and :meth:`RunningKFAC.solve` is two matrix products per layer,

.. math::
    \big((G + \delta_G I) \otimes (A + \delta_A I)\big)^{-1} \operatorname{vec} V
    = \operatorname{vec}\big((G + \delta_G I)^{-1} V (A + \delta_A I)^{-1}\big),
    \qquad \delta_G = \sqrt\lambda / \pi,\ \delta_A = \pi \sqrt\lambda;

the other blocks get :math:`(B + \lambda I)^{-1}` explicitly. A product at another damping
inverts again first. :meth:`RunningKFAC.model` applies the damped matrix whose inverse
:meth:`RunningKFAC.apply` applies, for the optimizer's quadratic model.

:func:`batch_statistics_as_constants` lets K-FAC see a model with BatchNorm in training mode:
the batch's statistics (biased variance, as the forward pass normalises by) become running
statistics of eval-mode layers for the curvature's passes, so the model computes the same
function at the batch while its samples no longer interact; BatchNorm's affine parameters then
get their exact (dense or diagonal) blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.kfac_blocks import BlockLayout, kron_solve, times_a
from ..curvature.kron_inverse import damped_inverse, factored_damping
from ..curvature.model import FunctionalModel
from ..curvature.random_state import replay

__all__ = ["INVERSES", "RunningKFAC", "batch_statistics_as_constants"]

INVERSES = ("eigen", "cholesky")
"""How :class:`RunningKFAC` inverts: eigendecompositions (exact damping) or explicit inverses."""


def _place(b: dict[str, Any]) -> tuple[int, int, bool]:
    """``(wrow, brow, transposed)`` of a running block (states saved without them: defaults)."""
    return int(b.get("wrow", 0)), int(b.get("brow", 0)), bool(b.get("transposed", False))


class RunningKFAC:
    r"""Exponential averages of K-FAC factors and their eigendecompositions (module docstring).

    Args:
        numels: Entries of each parameter of the flat vector, in order.
        dtype: dtype of the factors.
        inverse: ``"eigen"`` (:math:`(G \otimes A + \lambda I)^{-1}` through
            eigendecompositions) or ``"cholesky"`` (explicit inverses of the factors under
            factored Tikhonov damping; module docstring).

    Attributes:
        inv_damping: The damping of the explicit inverses (``"cholesky"``; None before any).
        fallbacks: Blocks whose last inversion needed the eigendecomposition (a failed or
            non-finite Cholesky factorisation): ``"layer.G"``, ``"layer.A"`` or a parameter
            index.
    """

    def __init__(self, numels: Sequence[int], dtype: torch.dtype, inverse: str = "eigen") -> None:
        self.numels = list(numels)
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.dtype = dtype
        self.blocks: dict[str, dict[str, Any]] = {}
        self.other: dict[int, dict[str, Any]] = {}
        self.updates = 0
        self.inverse = inverse
        self.inv_damping: float | None = None
        self.fallbacks: list[str] = []

    @property
    def ready(self) -> bool:
        """Whether factors and their eigendecompositions (or inverses) exist."""
        parts = [*self.blocks.values(), *self.other.values()]
        if self.inverse == "cholesky":
            return (
                self.updates > 0
                and self.inv_damping is not None
                and all(b.get("inv") is not None for b in parts)
            )
        return self.updates > 0 and all(b["eig"] is not None for b in parts)

    def update(self, op: Any, decay: float) -> None:
        """Average the factors of the operator ``op`` (a ``KFAC``) into the running ones.

        A layout that differs from the running one (another model or parameter selection)
        starts the averages again from ``op``.
        """
        blocks = {
            name: {
                "weight": -1 if b.weight is None else b.weight,
                "bias": -1 if b.bias is None else b.bias,
                "out": b.out,
                "d": b.d,
                "wrow": b.wrow,
                "brow": b.brow,
                "transposed": b.transposed,
                "A": b.A.to(self.dtype),
                "G": b.G.to(self.dtype),
            }
            for name, b in op.blocks.items()
        }
        other = {i: {"kind": b.kind, "value": b.value.to(self.dtype)} for i, b in op._other.items()}
        fresh = self.updates == 0 or self._layout(blocks, other) != self._layout(
            self.blocks, self.other
        )
        if fresh:
            for part in (*blocks.values(), *other.values()):
                part["eig"] = part["inv"] = None
            self.blocks, self.other, self.updates = blocks, other, 0
            self.inv_damping = None
        else:
            for name, b in blocks.items():
                run = self.blocks[name]
                run["A"].mul_(decay).add_(b["A"], alpha=1 - decay)
                run["G"].mul_(decay).add_(b["G"], alpha=1 - decay)
            for i, o in other.items():
                self.other[i]["value"].mul_(decay).add_(o["value"], alpha=1 - decay)
        self.updates += 1

    @staticmethod
    def _layout(blocks: dict[str, Any], other: dict[int, Any]) -> Any:
        kron = sorted(
            (n, b["weight"], b["bias"], b["out"], b["d"], *_place(b), b["A"].ndim)
            for n, b in blocks.items()
        )
        return kron, sorted((i, o["kind"], tuple(o["value"].shape)) for i, o in other.items())

    def decompose(self, damping: float | None = None) -> None:
        """Eigendecompose the factors, or invert them at ``damping`` (``"cholesky"``).

        ``"eigen"``: every running factor and dense block, eigenvalues clamped at 0.
        ``"cholesky"``: the explicit inverses under factored damping (module docstring).

        Raises:
            ValueError: With ``inverse="cholesky"`` and no ``damping``.
        """
        if self.inverse == "cholesky":
            if damping is None:
                raise ValueError('RunningKFAC.decompose: inverse="cholesky" needs the damping')
            self._invert(float(damping))
            return
        for b in self.blocks.values():
            lg, qg = torch.linalg.eigh(b["G"])
            if b["A"].ndim == 1:  # diagonal A: Q_A = I
                b["eig"] = [lg.clamp_min(0), qg, b["A"].clamp_min(0), None]
                continue
            la, qa = torch.linalg.eigh(b["A"])
            b["eig"] = [lg.clamp_min(0), qg, la.clamp_min(0), qa]
        for o in self.other.values():
            if o["kind"] == "dense":
                e, q = torch.linalg.eigh(o["value"])
                o["eig"] = [e.clamp_min(0), q]
            else:
                o["eig"] = [o["value"].clamp_min(0)]

    def _invert(self, damping: float) -> None:
        """Explicit inverses of the damped factors and blocks at ``damping`` (``"cholesky"``)."""
        failed: list[str] = []
        for name, b in self.blocks.items():
            dg, da = factored_damping(b["A"], b["G"], damping)
            gi, ok_g = damped_inverse(b["G"], dg)
            ai, ok_a = damped_inverse(b["A"], da)
            failed += [f"{name}.{f}" for f, ok in (("G", ok_g), ("A", ok_a)) if not ok]
            b["inv"], b["delta"] = [gi, ai], [dg, da]
        for i, o in self.other.items():
            inv, ok = damped_inverse(o["value"], damping)
            o["inv"] = [inv]
            if not ok:
                failed.append(str(i))
        self.inv_damping, self.fallbacks = damping, failed

    # ------------------------------------------------------------- products
    def _placement(self, b: dict[str, Any]) -> BlockLayout:
        wrow, brow, transposed = _place(b)
        weight = b["weight"] if b["weight"] >= 0 else None
        bias = b["bias"] if b["bias"] >= 0 else None
        return BlockLayout.of(self.offsets, weight, bias, b["out"], b["d"], wrow, brow, transposed)

    def _gather(self, x: Tensor, b: dict[str, Any]) -> Tensor:
        """The block's entries of the flat ``x`` as ``(out, d~)``."""
        return self._placement(b).gather(x[:, None])[0]

    def _scatter(self, y: Tensor, b: dict[str, Any], v: Tensor) -> None:
        """Write ``v`` (``(out, d~)``) into the block's entries of the flat ``y``."""
        self._placement(b).scatter(y[:, None], v[None])

    def apply(self, x: Tensor, damping: float | None) -> Tensor:
        r"""``(K + damping I)^{-1} x`` from the last decomposition, or ``K x`` (damping None).

        With ``inverse="cholesky"`` the damped matrix is the factored one (module docstring);
        inverses at another damping are formed again first. Parameters in no block (the
        operator never reached them) get ``x / damping`` (their block is zero) or zero.
        """
        if damping is not None and self.inverse == "cholesky" and damping != self.inv_damping:
            self._invert(float(damping))
        xf = x.to(self.dtype)
        y = xf / damping if damping is not None else torch.zeros_like(xf)
        for b in self.blocks.values():
            v = self._gather(xf, b)
            if damping is None:
                out = times_a(b["G"] @ v, b["A"])
            elif self.inverse == "cholesky":
                gi, ai = b["inv"]
                out = times_a(gi @ v, ai)
            else:
                out = kron_solve(v, b["eig"], damping)
            self._scatter(y, b, out)
        for i, o in self.other.items():
            sl = slice(self.offsets[i], self.offsets[i + 1])
            if damping is None:
                y[sl] = o["value"] @ xf[sl] if o["kind"] == "dense" else o["value"] * xf[sl]
            elif self.inverse == "cholesky":
                inv = o["inv"][0]
                y[sl] = inv @ xf[sl] if inv.ndim == 2 else inv * xf[sl]
            elif o["kind"] == "dense":
                e, q = o["eig"]
                y[sl] = q @ ((q.T @ xf[sl]) / (e + damping))
            else:
                y[sl] = xf[sl] / (o["eig"][0] + damping)
        return y.to(x.dtype)

    def model(self, x: Tensor, damping: float) -> Tensor:
        r"""The damped matrix whose inverse :meth:`apply` applies at ``damping``, times ``x``.

        ``"eigen"``: :math:`(K + \lambda I) x`; ``"cholesky"``: the factored damping of the
        last inversion, :math:`(G + \delta_G I) V (A + \delta_A I)` per layer and
        :math:`(B + \lambda I) x` elsewhere (with the running factors, which are those of the
        inversion unless factors were updated in between).
        """
        if self.inverse != "cholesky":
            return self.apply(x, None) + damping * x
        if damping != self.inv_damping:
            self._invert(float(damping))
        xf = x.to(self.dtype)
        y = damping * xf
        for b in self.blocks.values():
            v = self._gather(xf, b)
            dg, da = b["delta"]
            gv = b["G"] @ v + dg * v
            self._scatter(y, b, times_a(gv, b["A"]) + da * gv)
        for i, o in self.other.items():
            sl = slice(self.offsets[i], self.offsets[i + 1])
            value = o["value"]
            y[sl] = (value @ xf[sl] if value.ndim == 2 else value * xf[sl]) + damping * xf[sl]
        return y.to(x.dtype)

    def to(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move and cast every factor and decomposition (the model was moved or cast)."""
        self.dtype = dtype
        self.load(self.state(), device)

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Plain data (tensors, ints, strings) for ``state_dict``."""
        return {
            "updates": self.updates,
            "inverse": self.inverse,
            "inv_damping": self.inv_damping,
            "blocks": {n: dict(b) for n, b in self.blocks.items()},
            "other": {int(i): dict(o) for i, o in self.other.items()},
        }

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state` (tensors copied onto ``device`` in the factors' dtype)."""

        def put(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device=device, dtype=self.dtype, copy=True)
            if isinstance(v, list):
                return [put(t) for t in v]
            return v

        self.updates = int(state["updates"])
        saved = state.get("inv_damping")
        same = state.get("inverse", "eigen") == self.inverse
        self.inv_damping = float(saved) if saved is not None and same else None
        self.blocks = {n: {k: put(v) for k, v in b.items()} for n, b in state["blocks"].items()}
        self.other = {int(i): {k: put(v) for k, v in o.items()} for i, o in state["other"].items()}


def _batchnorm_in_training(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.running_mean is not None
        and m.running_var is not None
    ]


def _batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over every dimension but the channels' (dimension 1).

    By BatchNorm's own kernel (momentum 1 into fresh buffers: the mean, and the unbiased
    variance rescaled), a fraction of ``torch.var_mean``'s cost over the strided dimensions.
    """
    n = x.numel() // max(1, x.shape[1])
    if x.dtype not in (torch.float32, torch.float64) or n < 2:
        dims = tuple(d for d in range(x.ndim) if d != 1)
        var, mean = torch.var_mean(x, dims, correction=0)
        return mean, var
    mean = x.new_zeros(x.shape[1])
    var = x.new_ones(x.shape[1])
    torch.batch_norm(x, None, None, mean, var, True, 1.0, 0.0, False)
    return mean, var.mul_((n - 1) / n)


@contextmanager
def recorded_batchnorm_inputs(model: nn.Module) -> Iterator[dict[nn.Module, list[Tensor]]]:
    """Record the input of every BatchNorm layer in training mode, one entry per forward pass.

    Yields:
        Layer -> its inputs (detached), for :func:`batch_statistics_as_constants`.
    """
    seen: dict[nn.Module, list[Tensor]] = {m: [] for m in _batchnorm_in_training(model)}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen[module].append(args[0].detach())

    handles = [m.register_forward_pre_hook(hook) for m in seen]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def batch_statistics_as_constants(
    model: nn.Module,
    batches: Sequence[Any],
    seen: dict[nn.Module, list[Tensor]] | None = None,
    fmodel: FunctionalModel | None = None,
) -> Iterator[None]:
    """BatchNorm layers in training mode normalise by ``batches``' statistics as constants.

    Per layer in training mode, the mean and biased variance of its input (pooled over the
    batches) are taken from ``seen`` (:func:`recorded_batchnorm_inputs` around a forward pass
    over ``batches`` at the current parameters) where it holds one input per batch for every
    such layer, else from one forward pass without gradients over every batch; inside the block
    the layers are in eval mode with those as running statistics. Everything is restored on
    exit. With no such layer this does nothing. For a model evaluated in another dtype
    (``fmodel`` mixed: a bfloat16 model's float32 evaluation) that pass is the evaluation's,
    and the statistics stay in its dtype inside the block (not rounded to the buffers').
    """
    layers = _batchnorm_in_training(model)
    if not layers:
        yield
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked) for m in layers]  # type: ignore[union-attr]
    mixed = fmodel is not None and fmodel.mixed
    if mixed:
        assert fmodel is not None
        seen = _evaluation_inputs(fmodel, layers, batches)
    elif seen is None or any(len(seen.get(m, ())) != len(batches) for m in layers):
        with recorded_batchnorm_inputs(model) as seen, torch.no_grad():
            for b in batches:
                with replay(b.inputs):  # in a step: the step's dropout masks
                    model(*b.inputs)
        for m, (rm, rv, nbt) in zip(layers, saved):  # the recording pass moved them: put them back
            m.running_mean.copy_(rm)  # type: ignore[union-attr]
            m.running_var.copy_(rv)  # type: ignore[union-attr]
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)  # type: ignore[union-attr]
    held = [(m._buffers["running_mean"], m._buffers["running_var"]) for m in layers]
    try:
        for m in layers:
            x = torch.cat(seen[m]) if len(seen[m]) > 1 else seen[m][0]
            mean, var = _batch_statistics(x)
            if mixed:  # the evaluation copies the buffers as they are: in its dtype
                m._buffers["running_mean"], m._buffers["running_var"] = mean, var
            else:
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(var)  # type: ignore[union-attr]
            m.eval()
        yield
    finally:
        for m, (rm, rv, nbt), (hm, hv) in zip(layers, saved, held):
            m.train()
            m._buffers["running_mean"], m._buffers["running_var"] = hm, hv
            m.running_mean.copy_(rm)  # type: ignore[union-attr]
            m.running_var.copy_(rv)  # type: ignore[union-attr]
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)  # type: ignore[union-attr]


def _evaluation_inputs(
    fmodel: FunctionalModel, layers: Sequence[nn.Module], batches: Sequence[Any]
) -> dict[nn.Module, list[Tensor]]:
    """The inputs of ``layers`` (modules of ``fmodel.source``) in ``fmodel``'s evaluation.

    One pass without gradients per batch at the current parameters, in ``fmodel.dtype``; the
    evaluation's own running statistics are refreshed from the source at its next pass.
    """
    fmodel.refresh()
    copy_of = {id(src): dst for src, dst in fmodel._pairs}
    with recorded_batchnorm_inputs(fmodel.model) as seen, torch.no_grad():
        values = fmodel.values()
        for b in batches:
            fmodel(values, b.inputs)
    return {m: seen[copy_of[id(m)]] for m in layers}
