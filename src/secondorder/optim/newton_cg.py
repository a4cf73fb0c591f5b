r"""Damped Newton steps solved by conjugate gradient: Newton-CG, Gauss-Newton, natural gradient.

Each step solves

.. math::
    (C + \Lambda)\, s = \nabla L(\theta), \qquad \theta \leftarrow \theta - \mathrm{lr}\; s,

with :math:`C` the chosen curvature on the batch, :math:`\Lambda` the Tikhonov damping
(:math:`\lambda I`, or block-constant when param groups carry their own ``damping``), by
(preconditioned) CG to ``cg_rtol``/``cg_atol`` in at most ``cg_maxiter`` iterations. The
forward pass that builds the curvature also gives the loss and the gradient.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..curvature.model import Batch
from ..linalg.cg import CGStatus, cg
from ..linalg.operator import Diagonal, Identity, LinearOperator
from .adaptive import Trial, adaptive_direction
from .base import (
    CURVATURES,
    CurvatureOptimizer,
    check_cg_group,
    check_jacobian_factors,
    check_positive,
)

__all__ = ["GaussNewton", "NaturalGradient", "NewtonCG"]


class NewtonCG(CurvatureOptimizer):
    r"""Damped Newton-CG with a chosen curvature matrix.

    Args:
        model: The model to train.
        loss_fn: The loss, ``loss_fn(outputs, targets) -> scalar``.
        lr: Step size applied to the solution (default: 1).
        damping: Tikhonov damping :math:`\lambda`, the smallest used under ``adapt_damping``
            (default: 1).
        curvature: ``"ggn"``, ``"hessian"``, ``"fisher"`` (exact), ``"fisher_mc"`` or
            ``"empirical_fisher"`` (default: ``"ggn"``).
        cg_maxiter: Maximum CG iterations per step (default: 20).
        cg_rtol: CG relative residual tolerance (default: 1e-3).
        cg_atol: CG absolute residual tolerance (default: 0).
        warm_start: Start CG from the previous step's solution (default: False).
        preconditioner: ``None`` or a callable ``(curvature_operator, damping) -> M`` returning
            a :class:`~secondorder.linalg.LinearOperator` that applies :math:`M^{-1}`.
        num_samples: Samples per row for ``"fisher_mc"``.
        generator: Random generator for ``"fisher_mc"`` (its state is saved in ``state_dict``).
        params: Parameters or param-group dicts; groups may set their own ``lr`` and ``damping``.
        on_nonfinite: ``"skip"`` or ``"raise"``.
        engine: Linearisation engine of the curvature operators (``"auto"``).
        jacobian_factors: Whether GGN and Fisher products of an MLP go through its
            output-Jacobian factors (:mod:`~secondorder.curvature.factored`): ``False``
            (default) or ``True`` (MLPs only; see ``BENCHMARKS.md`` for what it saves).
        process_group: ``torch.distributed`` group for data-parallel training (see
            :class:`~secondorder.optim.base.CurvatureOptimizer`). With ``"fisher_mc"`` and no
            ``generator``, rank ``r`` draws from a generator seeded with ``r``, so ranks draw
            different targets, reproducibly.
        weight_decay: Decoupled weight decay per param group (default 0; see
            :class:`~secondorder.optim.base.CurvatureOptimizer`).
        max_grad_norm: Clip each param group's gradient to this norm before the direction
            is computed (default ``None``: no clipping).
        momentum: Heavy-ball momentum on the step, per param group (default 0).
        adapt_damping: Adapt a scale of the damping by Levenberg-Marquardt on the reduction
            ratio and accept a step only if the loss on the batch fell; a rejected trial is
            solved again with 10x the damping (:mod:`~secondorder.optim.adaptive`). Default
            True; ``False`` keeps the damping fixed and takes every finite step.
        damping_retries: Solves after a rejected trial before the step is skipped (default 3).

    The damping used is ``damping * state["damping_scale"]``: the scale starts at 1, rises when
    the model predicts the loss poorly or a trial is rejected, and relaxes back to 1
    (``diagnostics`` report ``damping``, ``rho``, ``rejections``). Tuning: on mini-batches the
    default ``damping=1`` keeps steps from fitting their batch too closely; on full-batch
    problems a small ``damping`` (1e-3) lets steps approach Newton's; ``lr`` below 1 shortens
    steps on noisy batches.

    With ``curvature="hessian"`` the matrix may be indefinite: CG stops at the first direction
    of non-positive curvature and the last iterate (a descent direction) is used; if that
    happens in the first iteration the step falls back to the gradient. Either way
    ``diagnostics["cg_status"]`` says so.

    Raises:
        ValueError: For invalid hyperparameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        *,
        curvature: str = "ggn",
        cg_maxiter: int = 20,
        cg_rtol: float = 1e-3,
        cg_atol: float = 0.0,
        warm_start: bool = False,
        preconditioner: Any = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        params: Any = None,
        on_nonfinite: str = "skip",
        engine: str = "auto",
        jacobian_factors: bool | str = False,
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
        adapt_damping: bool = True,
        damping_retries: int = 3,
    ) -> None:
        defaults = dict(
            lr=lr, damping=damping, cg_maxiter=cg_maxiter, cg_rtol=cg_rtol, cg_atol=cg_atol
        )
        check_cg_group(defaults)
        check_positive("num_samples", num_samples, integer=True)
        check_positive("damping_retries", damping_retries, allow_zero=True, integer=True)
        check_choice("curvature", curvature, CURVATURES)
        check_jacobian_factors(jacobian_factors, curvature)
        if preconditioner is not None and not callable(preconditioner):
            raise ValueError(
                f"preconditioner must be None or a callable (operator, damping) -> M, "
                f"got {type(preconditioner).__name__}"
            )
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
        for group in self.param_groups:
            check_cg_group(group)
        self.curvature = curvature
        self.warm_start = warm_start
        self.adapt_damping = bool(adapt_damping)
        self.damping_retries = damping_retries
        self.preconditioner = preconditioner
        self.num_samples = num_samples
        self.engine = engine
        self.jacobian_factors = jacobian_factors
        self.generator = generator
        if curvature == "fisher_mc" and generator is None:
            rank = torch.distributed.get_rank(process_group) if process_group is not None else 0
            self.generator = torch.Generator(device=self.fmodel.device).manual_seed(rank)

    _WARM_START_KEYS = ("cg_x0",)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_cg_group(group)

    # -------------------------------------------------------------------- step
    def _damping_operator(self, scale: float = 1.0) -> LinearOperator:
        lam = self._group_vector("damping")
        if isinstance(lam, Tensor):
            return Diagonal(lam * scale)
        eye = Identity(self.fmodel.dim, dtype=self.fmodel.dtype, device=self.fmodel.device)
        return eye * (lam * scale)

    def _build(self, batches: list[Batch]) -> Any:
        kw: dict[str, Any] = {
            "engine": self.engine,
            "cache": True,
            "jacobian_factors": self.jacobian_factors,
        }
        if self.curvature == "fisher_mc":
            kw.update(generator=self.generator, num_samples=self.num_samples)
        return self._curvature(self.curvature, batches, **kw)

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        C = self._build(batches)
        loss, grad = C.loss, C.gradient()
        if not self._check_loss_and_gradient(loss, grad):
            return loss, None
        x0 = None
        if self.warm_start:
            x0 = self._check_warm_start("cg_x0")
            if not self.diagnostics["accepted"]:
                return loss, None
        direction = adaptive_direction(
            self, loss, grad, batches, lambda kappa: self._solve(C, grad, x0, kappa)
        )
        if direction is not None and self.warm_start:
            self.global_state["cg_x0"] = (-direction).detach().clone()
        return loss, direction

    def _solve(self, C: Any, grad: Tensor, x0: Tensor | None, kappa: float) -> Trial | None:
        r"""CG on :math:`(C + \kappa\Lambda) s = g`; the trial direction :math:`-s`."""
        group = self.param_groups[0]
        A = C + self._damping_operator(kappa)
        M = None
        if self.preconditioner:
            M = self.preconditioner(C, self._group_vector("damping") * kappa)
        s, info = cg(
            A,
            grad,
            x0,
            rtol=group["cg_rtol"],
            atol=group["cg_atol"],
            maxiter=group["cg_maxiter"],
            M=M,
        )
        diag = self.diagnostics
        diag.update(
            cg_iterations=info.iterations,
            cg_residual=info.residual_norm,
            cg_status=info.status.name.lower(),
            damping=float(group["damping"]) * kappa,
        )
        if info.status == CGStatus.NONFINITE:
            self._reject("a curvature product was not finite during CG")
            return None
        change = info.quadratic_values[-1]  # phi(s) = q(-s) - q(0)
        if info.status == CGStatus.NEGATIVE_CURVATURE and info.iterations == 0 and x0 is None:
            s = grad.clone()  # no descent direction found: fall back to the gradient
            diag["fallback"] = "gradient"
            change = float(0.5 * (s @ A.matvec(s)) - grad @ s)
        return Trial(-s, change, A.matvec)


class GaussNewton(NewtonCG):
    r"""Damped Gauss-Newton: :class:`NewtonCG` with the GGN, :math:`(G + \lambda I) s = g`.

    Args:
        model: The model to train.
        loss_fn: The loss.
        lr: Step size (default: 1).
        damping: Tikhonov damping, the smallest used under ``adapt_damping`` (default: 1).
        **kwargs: Further :class:`NewtonCG` options (``cg_maxiter``, ``cg_rtol``, ...).
    """

    def __init__(
        self, model: nn.Module, loss_fn: Any, lr: float = 1.0, damping: float = 1.0, **kwargs: Any
    ) -> None:
        if "curvature" in kwargs:
            raise ValueError("GaussNewton uses the GGN; use NewtonCG to choose another curvature")
        super().__init__(model, loss_fn, lr, damping, curvature="ggn", **kwargs)


class NaturalGradient(NewtonCG):
    r"""Natural gradient: :class:`NewtonCG` with a Fisher matrix, :math:`(F + \lambda I) s = g`.

    Args:
        model: The model to train.
        loss_fn: The loss (cross-entropy, MSE or BCE-with-logits: a likelihood is needed).
        lr: Step size (default: 1).
        damping: Tikhonov damping, the smallest used under ``adapt_damping`` (default: 1).
        fisher: ``"exact"``, ``"mc"`` (targets sampled from the model) or ``"empirical"``.
        **kwargs: Further :class:`NewtonCG` options (``num_samples``, ``generator``, ...).

    Raises:
        ValueError: For an unknown ``fisher`` kind.
    """

    _KIND: ClassVar[dict[str, str]] = {
        "exact": "fisher",
        "mc": "fisher_mc",
        "empirical": "empirical_fisher",
    }

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        fisher: str = "exact",
        **kwargs: Any,
    ) -> None:
        check_choice("fisher", fisher, tuple(self._KIND))
        if "curvature" in kwargs:
            raise ValueError("NaturalGradient takes `fisher=`, not `curvature=`")
        self.fisher = fisher
        super().__init__(model, loss_fn, lr, damping, curvature=self._KIND[fisher], **kwargs)
