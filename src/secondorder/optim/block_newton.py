r"""Block-diagonal CG-Newton: one damped Newton system per parameter tensor.

Each step solves, for every trainable parameter tensor :math:`\theta_i` (weights and biases are
separate blocks),

.. math::

    (C_{\theta_i} + \lambda_i I)\, s_i = \nabla_{\theta_i} L, \qquad
    \theta_i \leftarrow \theta_i - \mathrm{lr}_i\, s_i,

with :math:`C_{\theta_i}` the exact diagonal block of the GGN, the Hessian or the
positive-curvature Hessian on the batch
(:class:`~secondorder.curvature.blockwise.BlockDiagonalCurvature`) and :math:`\lambda_i`,
:math:`\mathrm{lr}_i` taken from the parameter's group. The systems are solved by CG in
lock-step (:func:`~secondorder.linalg.block_cg.block_cg`): one sweep through the network per
iteration serves every block still running, and each block stops on its own tolerance.

This is the CG-Newton optimizer of BackPACK's example "Matrix-free second-order optimization"
(Dangel et al., 2020) with its hyperparameters as defaults and its plain CG: stop when
``norm(r) <= max(cg_rtol * norm(g), cg_atol)`` or after ``cg_maxiter`` iterations, and step
along directions of negative curvature too (``negative_curvature="continue"``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.blockwise import (
    CURVATURES,
    ENGINES,
    BlockDiagonalCurvature,
    sequential_blocks,
)
from ..curvature.model import Batch, unwrap_compiled
from ..curvature.vocabulary import canonical_engine
from ..linalg.block_cg import block_cg
from ..linalg.status import SolverStatus
from .adaptive import Trial, adaptive_direction
from .base import CurvatureOptimizer, check_cg_group, check_positive

__all__ = ["BlockDiagonalNewtonCG"]

_NEGATIVE = ("continue", "stop")


class BlockDiagonalNewtonCG(CurvatureOptimizer):
    r"""Newton steps on the diagonal blocks of a curvature matrix, one CG solve per block.

    Args:
        model: The network; an ``nn.Sequential`` of the layers listed in
            :func:`~secondorder.curvature.blockwise.sequential_blocks` gets the fast
            module-wise engine, any other module the autograd engine (see ``engine``).
        loss_fn: The loss, ``loss_fn(outputs, targets) -> scalar``.
        lr: Step size applied to each block's solution (default: 0.1).
        damping: Tikhonov damping :math:`\lambda` added to each block (default: 1e-2).
        curvature: ``"ggn"``, ``"hessian"``, ``"pch_abs"`` or ``"pch_clip"`` (default:
            ``"ggn"``).
        cg_maxiter: Maximum CG iterations per block and step (default: 20).
        cg_rtol: CG relative residual tolerance per block (default: 0.1).
        cg_atol: CG absolute residual tolerance per block (default: 1e-6).
        negative_curvature: What CG does on a direction with :math:`p^\top (C + \lambda I)p
            \le 0` (only possible for ``"hessian"``): ``"continue"`` (default, plain CG as in
            BackPACK's example: step along it anyway) or ``"stop"`` (keep the last iterate;
            if that is the first, the block takes the plain gradient step).
        params: Parameters or param-group dicts; groups may set their own ``lr``, ``damping``,
            ``cg_maxiter``, ``cg_rtol`` and ``cg_atol``.
        on_nonfinite: ``"skip"`` (reject the step and warn) or ``"raise"``.
        engine: ``"auto"`` (default), ``"sequential"`` or ``"autograd"``: how the blocks are
            computed (see :class:`~secondorder.curvature.blockwise.BlockDiagonalCurvature`);
            the fast module-wise engine serves ``nn.Sequential`` models of supported layers,
            ``"sequential"`` refuses other models with an error naming the layer.
        process_group: ``torch.distributed`` group for data-parallel training (see
            :class:`~secondorder.optim.base.CurvatureOptimizer`): block products, loss and
            gradient are all-reduced, so every rank runs the same lock-step CG.
        weight_decay: Decoupled weight decay per param group (default 0; see
            :class:`~secondorder.optim.base.CurvatureOptimizer`).
        max_grad_norm: Clip each param group's gradient to this norm before the direction
            is computed (default ``None``: no clipping).
        momentum: Heavy-ball momentum on the step, per param group (default 0).
        adapt_damping: Levenberg-Marquardt on a scale of the damping, with step acceptance, as
            for :class:`~secondorder.optim.newton_cg.NewtonCG` (:mod:`..adaptive`; the model's
            change costs one block-diagonal product per trial). Default True.
        damping_retries: Solves after a rejected trial before the step is skipped (default 3).

    After each step ``diagnostics`` holds ``loss``, ``grad_norm``; per block (lists in
    parameter order, the names in ``blocks``) ``cg_block_iterations``, ``cg_residuals``,
    ``cg_status`` and, if the groups differ, ``damping``; the totals ``cg_iterations`` (CG
    iterations summed over blocks) and ``cg_sweeps`` (lock-step sweeps through the network,
    the largest block count); ``step_norm``, ``accepted`` and ``time``.

    Raises:
        ValueError: For invalid hyperparameters, or an unsupported model with
            ``engine="sequential"``.

    Example:
        >>> import torch, secondorder as so
        >>> from secondorder.optim.block_newton import BlockDiagonalNewtonCG
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(),
        ...                             torch.nn.Linear(8, 3))
        >>> opt = BlockDiagonalNewtonCG(model, torch.nn.CrossEntropyLoss(), curvature="pch_abs")
        >>> X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = opt.step(X, y)
        >>> len(opt.diagnostics["cg_block_iterations"])  # one CG per parameter tensor
        4
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 0.1,
        damping: float = 1e-2,
        *,
        curvature: str = "ggn",
        cg_maxiter: int = 20,
        cg_rtol: float = 0.1,
        cg_atol: float = 1e-6,
        negative_curvature: str = "continue",
        params: Any = None,
        on_nonfinite: str = "skip",
        engine: str = "auto",
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
        adapt_damping: bool = True,
        damping_retries: int = 3,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if negative_curvature not in _NEGATIVE:
            raise ValueError(
                f"negative_curvature must be one of {_NEGATIVE}, got {negative_curvature!r}"
            )
        defaults = dict(
            lr=lr, damping=damping, cg_maxiter=cg_maxiter, cg_rtol=cg_rtol, cg_atol=cg_atol
        )
        check_cg_group(defaults)
        engine = canonical_engine(engine, ENGINES)
        if engine == "sequential":
            sequential_blocks(unwrap_compiled(model))  # raises naming an unsupported layer
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
        self.adapt_damping = bool(adapt_damping)
        check_positive("damping_retries", damping_retries, allow_zero=True, integer=True)
        self.damping_retries = damping_retries
        self.negative_curvature = negative_curvature
        self.engine = engine

    def _check_group(self, group: dict[str, Any]) -> None:
        check_cg_group(group)

    def _block_groups(self) -> list[dict[str, Any]]:
        """The param group of every block, in ``self.fmodel.params`` order."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return [group_of[id(p)] for p in self.fmodel.params]

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        C = BlockDiagonalCurvature(
            self.model,
            self.loss_fn,
            batches,
            curvature=self.curvature,
            params=self.fmodel.params,
            engine=self.engine,
            process_group=self.process_group,
        )
        loss, grad = C.loss, C.gradient()
        if not self._check_loss_and_gradient(loss, grad):
            return loss, None
        direction = adaptive_direction(
            self, loss, grad, batches, lambda kappa: self._solve(C, grad, kappa)
        )
        return loss, direction

    def _solve(self, C: BlockDiagonalCurvature, grad: Tensor, kappa: float) -> Trial | None:
        r"""Block CG on :math:`(C_i + \kappa\lambda_i I) s_i = g_i`; the trial direction."""
        # per-block hyperparameters: scalars when one group holds every block (the usual case)
        if len(self.param_groups) == 1:
            group = self.param_groups[0]
            damping: float | list[float] = float(group["damping"]) * kappa
            rtol: float | list[float] = float(group["cg_rtol"])
            atol: float | list[float] = float(group["cg_atol"])
            maxiter: int | list[int] = int(group["cg_maxiter"])
        else:
            groups = self._block_groups()
            damping = [float(g["damping"]) * kappa for g in groups]
            rtol = [float(g["cg_rtol"]) for g in groups]
            atol = [float(g["cg_atol"]) for g in groups]
            maxiter = [int(g["cg_maxiter"]) for g in groups]
        # the right-hand sides -g_i, one flat vector; the solutions land in `direction`
        rhs = torch.neg(grad)
        blocks = list(range(len(C.block_sizes)))

        def damped_blocks(indices: list[int], vectors: list[Tensor]) -> list[Tensor]:
            # (C_i + lambda_i I) v_i, the damping fused into the block products
            shift = damping if isinstance(damping, float) else [damping[i] for i in indices]
            return C.apply_blocks(indices, vectors, shift=shift)

        def damped(v: Tensor) -> Tensor:
            return torch.cat(damped_blocks(blocks, list(v.split(C.block_sizes))))

        direction = torch.empty_like(grad)  # the solutions land here, block after block
        solutions, info = block_cg(
            damped_blocks,
            rhs,
            sizes=C.block_sizes,
            rtol=rtol,
            atol=atol,
            maxiter=maxiter,
            negative_curvature=self.negative_curvature,
            out=direction,
        )
        fallback = []
        for i, (status, its) in enumerate(zip(info.status, info.iterations)):
            if status == SolverStatus.NEGATIVE_CURVATURE and its == 0:
                # no descent direction found: the gradient step (-g_i, untouched in rhs as no
                # step was taken)
                fallback.append(i)
        if fallback:
            pieces = rhs.split(C.block_sizes)
            for i in fallback:
                solutions[i].copy_(pieces[i])
        self.diagnostics.update(
            blocks=list(self.fmodel.names),
            cg_iterations=sum(info.iterations),
            cg_block_iterations=info.iterations,
            cg_sweeps=info.sweeps,
            cg_residuals=info.residual_norms,
            cg_status=[s.name.lower() for s in info.status],
            damping=damping if isinstance(damping, float) or len(set(damping)) > 1 else damping[0],
        )
        if fallback:
            self.diagnostics["fallback_gradient_blocks"] = fallback
        if SolverStatus.NONFINITE in info.status:
            bad = [
                self.fmodel.names[i]
                for i, s in enumerate(info.status)
                if s == SolverStatus.NONFINITE
            ]
            self._reject(f"a curvature product was not finite during CG (blocks {bad})")
            return None
        if not self.adapt_damping:
            return Trial(direction, math.nan)
        # the damped block model's change g'd + d'(C + lambda) d / 2 (one block product)
        change = float(grad @ direction + 0.5 * (direction @ damped(direction)))
        return Trial(direction, change, damped)
