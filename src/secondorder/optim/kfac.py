r"""K-FAC as a torch.optim optimizer: running Kronecker factors, periodic inverses.

Each layer with a Kronecker form (``nn.Linear``, ``nn.Conv1d/2d``; see
:class:`~secondorder.curvature.KFAC`) has its block of the Fisher / GGN approximated by
:math:`G \otimes A` with :math:`A = \mathbb E[\tilde a \tilde a^\top]` (the layer's inputs, with a
one for the bias) and :math:`G = \mathbb E[g g^\top]` (the gradients of the loss with respect to
its outputs, for targets drawn from the model by default). Every ``factor_every`` steps the
factors of the step's batch enter exponential averages with decay ``factor_decay``
(:class:`~secondorder.optim.kfac_state.RunningKFAC`); every ``inverse_every`` steps the averages
are eigendecomposed, :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G Q_G^\top`.
The step is, per layer (``V``: the gradient of ``[W | b]`` as an ``(out, d+1)`` matrix),

.. math::
    s = Q_G \big[(Q_G^\top V Q_A) \oslash (\lambda_G \lambda_A^\top + \lambda)\big] Q_A^\top
    = \operatorname{mat}\big((G \otimes A + \lambda I)^{-1} \operatorname{vec} V\big),
    \qquad \theta \leftarrow \theta - \mathrm{lr}\, \nu\, s,

the exact inverse of the damped Kronecker block (kfac-pytorch's eigen form). With
``inverse="cholesky"`` the block is damped as Martens & Grosse's factored Tikhonov
:math:`(G + \tfrac{\sqrt\lambda}{\pi} I) \otimes (A + \pi\sqrt\lambda I)`,
:math:`\pi = \sqrt{(\operatorname{tr} A / \dim A) / (\operatorname{tr} G / \dim G)}`, and
the step is :math:`s = (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1} V (A + \pi\sqrt\lambda I)^{-1}`
with the two inverses formed by Cholesky factorisations every ``inverse_every`` steps (and
when the damping changes): cheaper to form than eigendecompositions and two matrix products
per layer and step instead of four, but the matrix is :math:`G \otimes A + \lambda I` plus
:math:`\pi\sqrt\lambda\, G \otimes I + \tfrac{\sqrt\lambda}{\pi} I \otimes A`, which
damps the directions where one factor's eigenvalue is large and the other's small far more
than :math:`\lambda` (:mod:`~secondorder.curvature.kron_inverse`). Parameters outside the
Kronecker layers (BatchNorm's and LayerNorm's affine parameters, ...) get
:math:`(B + \lambda I)^{-1}` of their running exact block ``B`` (dense for up to 64 entries, else
diagonal). :math:`\nu = \min(1, \sqrt{\kappa_{\mathrm{KL}} / (\mathrm{lr}^2 g^\top s)})` with
``kl_clip`` :math:`\kappa_{\mathrm{KL}}` (kfac-pytorch's KL clipping; 1 when ``kl_clip`` is None).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..curvature.base import allreduce_sum
from ..curvature.kfac import KFAC
from ..curvature.kfac_factors import APPROXES, FISHERS
from ..curvature.model import Batch
from ..curvature.weighting import batch_weights
from .adaptive import Trial, adaptive_direction
from .base import CurvatureOptimizer, check_positive
from .kfac_state import (
    INVERSES,
    RunningKFAC,
    batch_statistics_as_constants,
    recorded_batchnorm_inputs,
)

__all__ = ["KFACOptimizer"]


class KFACOptimizer(CurvatureOptimizer):
    r"""K-FAC (Martens & Grosse, 2015) with running factors and periodic inverses (module doc).

    Args:
        model: The model to train (BatchNorm in training mode is allowed: for the curvature its
            batch statistics are constants, :func:`~.kfac_state.batch_statistics_as_constants`;
            dropout in training mode: the factor pass replays the step's masks, those of its
            loss and gradient).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        lr: Step size (default 0.3).
        damping: :math:`\lambda`, added to every Kronecker block's eigenvalues (default 1e-2;
            split over the two factors with ``inverse="cholesky"``);
            the smallest used under ``adapt_damping``. A param-group hyperparameter that must
            be the same in every group.
        factor_decay: :math:`\beta` of the running averages in [0, 1) (default 0.95; 0: the
            last batch's factors only).
        factor_every: Steps between factor updates (default 10: a factor pass costs about a
            gradient on an MLP and several on a CNN whose layers the graph engine cannot split).
        inverse_every: Steps between eigendecompositions or inversions (default 10).
        fisher: ``"mc"`` (one target drawn from the model per sample, the default),
            ``"exact"`` (K-FAC of the GGN) or ``"empirical"``.
        approx: ``"expand"`` or ``"reduce"`` (weight sharing; see ``so.KFAC``).
        num_samples: Targets drawn per sample for ``"mc"``.
        kl_clip: Scale the step so that :math:`\mathrm{lr}^2 g^\top s \le` ``kl_clip``
            (default 1e-2; None: no clipping).
        adapt_damping: Levenberg-Marquardt on the reduction ratio of the K-FAC quadratic model
            every ``damping_every`` steps (:mod:`~secondorder.optim.adaptive`): such a step is
            taken only if the loss on the batch did not rise, else damping x10 and retried
            (default True).
        damping_every: Steps between damping adaptations (default 5; each costs a forward).
        damping_retries: Retries of a rejected adapted step before it is skipped (default 3).
        generator: Random generator of ``"mc"`` (its state travels in ``state_dict``; default:
            seeded with the rank).
        params: Parameters or param groups (own ``lr``, ``weight_decay``, ...).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        process_group: ``torch.distributed`` group: gradients, losses and factors are
            all-reduced, every rank takes the same step.
        weight_decay: Decoupled weight decay (default 0).
        max_grad_norm: Clip each group's gradient before preconditioning (default None).
        momentum: Heavy-ball momentum on the step (default 0).
        inverse: ``"eigen"`` (the default: the exact damped inverse through
            eigendecompositions) or ``"cholesky"`` (factored Tikhonov damping with explicit
            inverses, module docstring: cheaper steps, a more heavily damped matrix; it
            trained the benchmark MLP to a lower accuracy than ``"eigen"`` at every damping
            tried, hence not the default). A failed Cholesky factorisation (or a
            non-finite inverse) falls back to that factor's eigendecomposition, named in
            ``diagnostics["inverse_fallbacks"]``.

    Tuning: the defaults (``lr=0.3``, ``damping=1e-2``, ``kl_clip=1e-2``) were chosen on seed
    002's MLP and the ResNet with BatchNorm of ``benchmarks/training.py`` (batches of 128 and
    64). ``damping`` trades the curvature against a gradient step of length
    ``lr / damping``; raise it (1e-1) when the loss is noisy or ``diagnostics["rejections"]``
    grow, lower it (1e-3) for larger batches. ``lr`` and ``kl_clip`` bound the step;
    ``inverse_every`` and ``factor_every`` trade cost against fresh curvature.
    ``diagnostics`` report ``damping``, ``kl_scale``, ``factors_updated``, ``inverted``,
    under adaptation ``rho`` and ``rejections``, and with ``inverse="cholesky"``
    ``inverse_fallbacks`` after each inversion.

    Raises:
        ValueError: For invalid hyperparameters, or groups with different ``damping``.
    """

    _STATS_FROM_FIRST_PASS = True  # _loss_and_grad's forward moves BatchNorm's statistics

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 0.3,
        damping: float = 1e-2,
        *,
        factor_decay: float = 0.95,
        factor_every: int = 10,
        inverse_every: int = 10,
        fisher: str = "mc",
        approx: str = "expand",
        num_samples: int = 1,
        kl_clip: float | None = 1e-2,
        adapt_damping: bool = True,
        damping_every: int = 5,
        damping_retries: int = 3,
        generator: torch.Generator | None = None,
        params: Any = None,
        on_nonfinite: str = "skip",
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
        inverse: str = "eigen",
    ) -> None:
        check_choice("fisher", fisher, FISHERS)
        check_choice("inverse", inverse, INVERSES)
        check_choice("approx", approx, APPROXES)
        for name, value in (
            ("factor_every", factor_every),
            ("inverse_every", inverse_every),
            ("num_samples", num_samples),
            ("damping_every", damping_every),
        ):
            check_positive(name, value, integer=True)
        check_positive("damping_retries", damping_retries, allow_zero=True, integer=True)
        check_positive("factor_decay", factor_decay, allow_zero=True)
        if factor_decay >= 1:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        if fisher != "mc" and num_samples != 1:
            raise ValueError(f"num_samples applies to fisher='mc' only, got {num_samples}")
        defaults = {"lr": lr, "damping": damping}
        self._check_group(defaults)
        super().__init__(
            model,
            loss_fn,
            defaults,
            params=params,
            on_nonfinite=on_nonfinite,
            process_group=process_group,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            momentum=momentum,
        )
        self.factor_decay, self.factor_every, self.inverse_every = (
            float(factor_decay),
            factor_every,
            inverse_every,
        )
        self.fisher, self.approx, self.num_samples = fisher, approx, num_samples
        self.kl_clip, self.inverse = kl_clip, inverse
        self.adapt_damping, self.damping_every = bool(adapt_damping), damping_every
        self.damping_retries = damping_retries
        self.generator = generator
        if fisher == "mc" and generator is None:
            rank = torch.distributed.get_rank(process_group) if process_group is not None else 0
            self.generator = torch.Generator(device=self.fmodel.device).manual_seed(rank)
        self._running = self._new_running()
        self._engine = "auto"

    def _new_running(self) -> RunningKFAC:
        dtype = torch.float64 if self.fmodel.dtype == torch.float64 else torch.float32
        return RunningKFAC(self.fmodel.numels, dtype, self.inverse)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"])
        check_positive("damping", group["damping"], allow_zero=True)

    def _check_groups(self) -> None:
        super()._check_groups()
        values = {float(g["damping"]) for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"KFACOptimizer: every param group must have the same damping (it is added to "
                f"Kronecker blocks that span groups), got {sorted(values)}"
            )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # noqa: D102 - torch's docstring applies
        out = super().state_dict()
        out["kfac"] = self._running.state()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: groups, step counters, damping and the running factors.

        Raises:
            ValueError: For a state of another optimizer or model.
        """
        super().load_state_dict(state_dict)
        running = self._new_running()
        saved = state_dict.get("kfac")
        if saved is not None:
            running.load(saved, self.fmodel.device)
        self._running = running

    # ----------------------------------------------------------------- step
    def _loss_and_grad(self, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        """The loss on ``batches`` and its flat gradient (weighted as the operators).

        On a step that updates the factors, BatchNorm's inputs are recorded on the way
        (``self._bn_inputs``, for :func:`~.kfac_state.batch_statistics_as_constants`).
        """
        fm = self.fmodel
        weighting = batch_weights(self.loss_fn, batches, fm, self.process_group)
        total: Tensor | None = None
        weights = weighting.weights(batches)
        # a low-precision model: float32 leaves (its gradient unrounded); else the parameters
        # themselves, by a plain call of the module
        leaves = fm.leaves() if fm.mixed else fm.params
        record = recorded_batchnorm_inputs(self.model) if self._updates_factors() else None
        with torch.enable_grad(), record or contextlib.nullcontext() as seen:
            self._bn_inputs = seen
            for b, w in zip(batches, weights):
                if w == 0.0:
                    continue
                z = fm(leaves, b.inputs) if fm.mixed else fm.call_own(b.inputs)
                value = self.loss_fn(z, b.targets)
                value = value * w if w != 1.0 else value
                total = value if total is None else total + value
            # this forward pass moved the running statistics as the plain pass would have
            self._record_running_stats(batches, all(w != 0.0 for w in weights))
            if total is None:
                loss = torch.zeros((), dtype=fm.dtype, device=fm.device)
                grad = torch.zeros(fm.dim, dtype=fm.dtype, device=fm.device)
            else:
                parts = torch.autograd.grad(total, leaves, allow_unused=True)
                grad = torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(leaves, parts)
                    ]
                )
                loss = total.detach()
        if self.process_group is not None:
            loss, grad = allreduce_sum([loss.reshape(1), grad], self.process_group)
            loss = loss.reshape(())
        return loss, grad

    def _updates_factors(self) -> bool:
        """Whether this step updates the running factors."""
        run, step = self._running, int(self.global_state["step"])
        return (
            run.numels != self.fmodel.numels
            or run.updates == 0
            or (step - 1) % self.factor_every == 0
        )

    def _refresh(self, batches: list[Batch]) -> None:
        """Update the running factors and decompose them, as the step count says."""
        step = int(self.global_state["step"])
        run = self._running
        seen, self._bn_inputs = getattr(self, "_bn_inputs", None), None
        if run.numels != self.fmodel.numels:  # parameters frozen or added: start again
            run = self._running = self._new_running()
            self._engine = "auto"
        fresh = self._new_running()
        if run.dtype != fresh.dtype or any(
            b["A"].device != self.fmodel.device for b in run.blocks.values()
        ):  # the model was cast or moved after construction: follow it
            run.to(fresh.dtype, self.fmodel.device)
        update = run.updates == 0 or (step - 1) % self.factor_every == 0
        if update:
            with batch_statistics_as_constants(self.model, batches, seen, self.fmodel):
                op = KFAC(
                    self.model,
                    self.loss_fn,
                    batches,
                    fisher=self.fisher,
                    approx=self.approx,
                    num_samples=self.num_samples,
                    generator=self.generator,
                    params=self.fmodel.params,
                    factor_dtype=run.dtype,
                    process_group=self.process_group,
                    engine=self._engine,
                )
            if op.engine == "autograd" and not self.process_group:
                self._engine = "autograd"  # the graph engine refused this model: skip its trace
            run.update(op, self.factor_decay)
        invert = not run.ready or (step - 1) % self.inverse_every == 0
        if invert:
            run.decompose(self._damping())
        self.diagnostics.update(factors_updated=update, inverted=invert)
        if invert and self.inverse == "cholesky":
            self.diagnostics["inverse_fallbacks"] = list(run.fallbacks)

    def _damping(self, kappa: float | None = None) -> float:
        """The damping at the scale ``kappa`` (default: the state's, as the next step uses)."""
        if kappa is None:
            kappa = float(self.global_state.get("damping_scale", 1.0))
        kappa = kappa if math.isfinite(kappa) and kappa > 0 else 1.0
        return float(self.param_groups[0]["damping"]) * kappa

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        loss, grad = self._loss_and_grad(batches)
        if not self._check_loss_and_gradient(loss, grad):
            self._bn_inputs = None
            return loss, None
        self._refresh(batches)
        state = self.global_state
        adapt = self.adapt_damping and (int(state["step"]) - 1) % self.damping_every == 0
        if adapt:
            direction = adaptive_direction(
                self, loss, grad, batches, lambda k: self._solve(grad, k, True)
            )
        else:
            trial = self._solve(grad, None, False)
            direction = None if trial is None else trial.direction
        return loss, direction

    def _solve(self, grad: Tensor, kappa: float | None, model: bool) -> Trial | None:
        r"""The trial :math:`-\nu s`, :math:`s = (K + \kappa\lambda I)^{-1} g`, with its model.

        ``"cholesky"``: ``K + κλI`` stands for the factored damping, and inverses at another
        damping than the last inversion's are formed again first (a damping adaptation).
        """
        lam = self._damping(kappa)
        run = self._running
        if self.inverse == "cholesky" and lam != run.inv_damping:
            run.decompose(lam)
            self.diagnostics.update(inverted=True, inverse_fallbacks=list(run.fallbacks))
        s = run.apply(grad, lam)
        gs = float(grad @ s)
        lr = self._group_vector("lr")
        lr_max = float(lr.max()) if isinstance(lr, Tensor) else lr
        nu = 1.0
        if self.kl_clip is not None and gs > 0:
            nu = min(1.0, math.sqrt(self.kl_clip / (lr_max * lr_max * gs)))
        self.diagnostics.update(damping=lam, kl_scale=nu)
        if nu != 1.0:
            s = s * nu

        def apply(v: Tensor) -> Tensor:  # per-group lr: the model along lr * d (current factors)
            return run.model(v, lam)

        # the quadratic model of the last decomposition, K~ (whose damped inverse gave s):
        # q(-nu s0) - q(0) = -nu g's0 + nu^2 s0'(K~ + lam) s0 / 2 = (nu^2 / 2 - nu) g's0
        change = (0.5 * nu * nu - nu) * gs if model else math.nan
        return Trial(-s, change, apply)

    def _on_reject(self, reason: str) -> None:
        """A non-finite step raises the damping scale tenfold (as a rejected trial)."""
        state = self.global_state
        kappa = float(state.get("damping_scale", 1.0))
        state["damping_scale"] = min((kappa if math.isfinite(kappa) else 1.0) * 10.0, 1e8)
