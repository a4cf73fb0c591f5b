r"""Martens' Hessian-free optimizer: damped curvature, truncated PCG, backtracking, line search.

One step at the parameters :math:`\theta`, each rule with its source (Martens 2010 = [M10],
Martens & Sutskever 2012 = [MS12]; "Martens' code" is his reference implementation,
``nnet_train_2.m`` and ``conjgrad_1.m``, published with [M10]):

1. **Curvature** :math:`C`: the GGN (positive semi-definite, recommended, [M10] §4.2,
   [MS12] §6) or the Hessian, built on the curvature batch; the same forward pass gives the
   loss and the gradient :math:`g` when the batches coincide.
2. **Damped system** (Tikhonov damping, [M10] §4.1, [MS12] §8.1):

   .. math::
       (C + \lambda I)\, \delta = -g, \qquad
       \phi(\delta) = q(\delta) - q(0) = \tfrac12 \delta^\top (C + \lambda I) \delta
       + g^\top \delta,

   solved by preconditioned CG, which minimises the damped model :math:`\phi`:

   * stopped by Martens' relative-progress rule ([M10] §4.4) or ``cg_maxiter``
     (250, [M10] §4.4 and [MS12] §8.7);
   * warm-started from ``cg_decay_x0`` :math:`= 0.95` times the previous step's *final* CG
     iterate, not the backtracked one ([M10] §4.5 and §4.6; the decay from [MS12] §10 and
     Martens' code);
   * preconditioned by :math:`M = (\operatorname{diag}(F_{\mathrm{emp}}) + \lambda)^{3/4}`
     ([M10] §4.7);
   * keeping snapshots of the iterates at iterations :math:`\lceil 1.3^j \rceil` and the last
     one ([M10] §4.6).
3. **CG backtracking** ([M10] §4.6, in the order of Martens' code): evaluate the loss at the
   last kept iterate, then at the earlier ones from the last backwards while the loss keeps
   decreasing; the last improvement is the step. Only descent directions
   (:math:`g^\top \delta < 0`) are candidates.
4. **Reduction ratio** at the iterate chosen by backtracking, before the line search (as in
   Martens' code), on the damped model CG minimised:
   :math:`\rho = (f(\theta + \mathrm{lr}\,\delta) - f(\theta)) / \phi(\mathrm{lr}\,\delta)`,
   and the **Levenberg-Marquardt** rule :math:`\lambda \leftarrow \tfrac32 \lambda` if
   :math:`\rho < \tfrac14`, :math:`\lambda \leftarrow \tfrac23 \lambda` if
   :math:`\rho > \tfrac34` ([M10] §4.1, [MS12] §8.5; :mod:`.damping`).
5. **Line search** ([MS12] §8.8, as in Martens' code): Armijo backtracking on the chosen
   step, starting at :math:`\alpha = 1` (whose loss backtracking already computed), shrinking
   by 0.8 until :math:`f(\theta + \alpha\,\mathrm{lr}\,\delta) \le f(\theta) + 10^{-2}\,
   \alpha\, \mathrm{lr}\, g^\top \delta` (:mod:`.linesearch`); then
   :math:`\theta \leftarrow \theta + \alpha\, \mathrm{lr}\, \delta`.

**Negative curvature** (``curvature="hessian"``; never for the GGN, since
:math:`C + \lambda I \succ 0`). ``negative_curvature="stop"`` (default) ends CG at the first
direction :math:`p` with :math:`p^\top (C + \lambda I) p \le 0` and keeps the iterates before
it, as Martens' code (``conjgrad_1``: "Negative Curvature! Bailing...") and the line-search
Newton-CG of Nocedal & Wright (2006, Algorithm 7.1) do. ``negative_curvature="continue"``
keeps going with the negative step length :math:`\alpha = r^\top z / p^\top A p`, as the CG of
the PyTorchHessianFree reference implementation does: the iterates remain the Galerkin
approximations (residual orthogonal to the Krylov space, Paige & Saunders 1975), the
stationary points of :math:`\phi` on the Krylov spaces, which converge to the damped Newton
step :math:`-(C + \lambda I)^{-1} g` although it is a saddle point of :math:`\phi`; the last
iterate before the first negative direction stays a backtracking candidate, and steps that do
not descend are never taken.

Stopping is the default; the measurements behind the choice (Rosenbrock, small tanh
networks) are in ``BENCHMARKS.md``, "Hessian-free: stopping CG at negative curvature".

Each piece is a separately tested function or class of :mod:`.hessian_free_parts`
(:func:`~.hessian_free_parts.truncated_cg`, :func:`~.hessian_free_parts.cg_backtracking`,
:class:`~.hessian_free_parts.LevenbergMarquardt`, :class:`~.hessian_free_parts.ArmijoLineSearch`);
``preconditioner=``, ``damping_rule=`` and ``linesearch=`` take replacements, and
``adapt_damping``, ``martens_stop``, ``cg_decay_x0 = 0``, ``preconditioner=None``,
``use_cg_backtracking`` and ``use_linesearch`` turn the pieces off one at a time.
One step composes them in :func:`~.hessian_free_step.compute_direction`; the option checks
are in :mod:`.hessian_free_checks`.

References:
    J. Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf

    J. Martens and I. Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", in Neural Networks: Tricks of the Trade, 2012.
    https://www.cs.utoronto.ca/~jmartens/docs/HF_book_chapter.pdf

    C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
    equations", SIAM J. Numer. Anal. 12(4), 1975.

    J. Nocedal and S. Wright, "Numerical Optimization", 2nd ed., Springer, 2006, §7.1.

    L. Tatzel, PyTorchHessianFree. https://github.com/ltatzel/PyTorchHessianFree
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..curvature.diagonal import empirical_fisher_diagonal, per_sample_gradient_diagonal
from ..curvature.losses import supports_likelihood
from ..curvature.model import Batch
from ..curvature.vocabulary import canonical_engine
from ..linalg.cg import CGInfo
from ..linalg.operator import LinearOperator
from ..linalg.preconditioners import JacobiPreconditioner
from .base import CurvatureOptimizer, check_jacobian_factors
from .groups import COMMON_DEFAULTS
from .hessian_free_checks import check_hyperparameters, check_options
from .hessian_free_data import (
    _as_batch_list,
    _valid_damping,
)
from .hessian_free_parts import (
    BACKTRACK_GAMMA,
    ArmijoLineSearch,
    LevenbergMarquardt,
    truncated_cg,
)
from .hessian_free_step import compute_direction

__all__ = ["HessianFree"]

_PRECONDITIONER_EXPONENT = 0.75  # [M10] §4.7


class HessianFree(CurvatureOptimizer):
    r"""Hessian-free optimization (Martens 2010; Martens & Sutskever 2012).

    Each :meth:`step` solves the damped Newton system :math:`(C + \lambda I)\delta = -g` by
    truncated preconditioned CG, picks the best CG iterate by backtracking on the loss, adapts
    :math:`\lambda` by the Levenberg-Marquardt rule on the reduction ratio

    .. math::
        \rho = \frac{f(\theta + \mathrm{lr}\,\delta) - f(\theta)}
        {\phi(\mathrm{lr}\,\delta)}, \qquad
        \phi(\delta) = q(\delta) - q(0) = \tfrac12 \delta^\top (C + \lambda I) \delta
        + g^\top \delta

    (the damped quadratic model that CG minimises, its value read from CG for free; computed
    at the iterate chosen by backtracking, before the line search), and scales the step by an
    Armijo line search: :math:`\theta \leftarrow \theta + \alpha\,\mathrm{lr}\,\delta`. The
    module docstring lists every rule with its source. All loss evaluations after the
    curvature is built are forward passes without graphs
    (:meth:`~secondorder.optim.base.CurvatureOptimizer.loss_along` at
    :math:`\theta + s\,\delta`), and only as many as the
    backtracking and the line search need (the loss at the chosen iterate is reused as the
    line search's first trial).

    :meth:`acc_step` takes separate data for the loss (used by :math:`\rho`, backtracking and the
    line search), the gradient and the curvature, each accumulated exactly over its batches.

    **Negative curvature** (``curvature="hessian"``): with ``negative_curvature="stop"``, CG
    stops at the first direction of non-positive curvature and the kept iterates before it are
    used as usual; since :math:`C + \lambda I` was then not positive definite, :math:`\lambda`
    is raised as for :math:`\rho < 1/4`, whatever :math:`\rho` is (otherwise a short step that
    the model predicts well would lower the damping that failed to make the system definite).
    With ``"continue"``, CG goes on through such directions to the stationary point of the
    damped model (see the module docstring) and :math:`\rho` decides as usual; only a
    breakdown (curvature numerically zero) raises :math:`\lambda` as above. In both modes, if no
    kept iterate is a descent direction (negative curvature in the first iteration, or a warm
    start pointing uphill), the step falls back to the damped gradient step
    :math:`\delta = -g / \lambda`. ``diagnostics["negative_curvature"]``,
    ``["cg_negative_directions"]`` and ``["fallback"]`` report it.

    **Rejections.** A non-finite loss, gradient, preconditioner or CG product rejects the step
    through the base class (parameters unchanged, ``on_nonfinite`` applies) and raises
    :math:`\lambda` by ``3/2`` when it adapts. A failed line search (no step length with
    sufficient decrease) leaves the parameters unchanged with ``diagnostics["accepted"] = False``.

    **Data parallel** (``process_group``): every rank calls :meth:`step` (or :meth:`acc_step`)
    with its shard of the data, in the same way (the same arguments shared or separate). The
    curvature products, loss and gradient (also on separate gradient data), the
    preconditioner's diagonal and every loss evaluation are all-reduced and normalised by the
    global number of samples, so every decision (CG stopping, backtracking, :math:`\lambda`,
    line search) is taken on identical numbers and the parameters stay identical on all ranks
    without being broadcast.

    **Diagnostics** (``opt.diagnostics`` after each step): ``loss``, ``grad_norm``,
    ``damping`` (used) and ``next_damping``, ``cg_iterations``, ``cg_residual``,
    ``cg_status``, ``negative_curvature``, ``cg_negative_directions``, ``warm_start``,
    ``chosen_iterate``, ``fallback``, ``rho``, ``predicted_change``, ``alpha``,
    ``linesearch``, ``new_loss`` (the loss after the step on the loss data),
    ``loss_evaluations``, ``step_norm``, ``accepted`` (``rejected_reason``) and the times
    ``time_curvature``, ``time_preconditioner``, ``time_cg``, ``time_backtracking``,
    ``time_linesearch`` and ``time``.

    The damping, the step length and CG act on the whole step: several param groups are
    accepted when they differ only in ``weight_decay``, ``max_grad_norm`` and ``momentum``
    (e.g. no decay on biases). State (kept on the first parameter,
    carried by ``state_dict``): ``"step"``, ``"damping"`` (the current :math:`\lambda`) and
    ``"x0"`` (the last final CG iterate, the next warm start before decay).

    Args:
        model: The model to train.
        loss_fn: The loss, ``loss_fn(outputs, targets) -> scalar``.
        lr: Scale of the CG step before backtracking, :math:`\rho` and the line search, which
            all evaluate the loss at the point actually taken (default: 1).
        damping: The initial Tikhonov damping :math:`\lambda > 0` (default: 1); with
            ``adapt_damping=False`` the fixed damping, read from the param group every step.
        curvature: ``"ggn"`` (positive semi-definite, recommended) or ``"hessian"``.
        negative_curvature: What CG does at a direction of negative curvature: ``"stop"``
            (default) or ``"continue"`` (see above; only the Hessian has such directions).
        adapt_damping: Update :math:`\lambda` by the Levenberg-Marquardt rule (default: True).
        cg_maxiter: Maximal CG iterations per step (default: 250).
        cg_rtol: CG relative residual tolerance; small, as Martens' rule does the stopping
            (default: 1e-6).
        martens_stop: Stop CG by Martens' relative-progress rule on the quadratic model
            (default: True); otherwise by the residual rule and ``cg_maxiter`` only.
        martens_eps: The :math:`\varepsilon` of Martens' rule (default: 5e-4).
        cg_decay_x0: Warm start :math:`x_0 = \texttt{cg\_decay\_x0} \cdot \delta_{\mathrm{prev}}`
            with :math:`\delta_{\mathrm{prev}}` the previous final CG iterate; ``0`` starts
            from zero (default: 0.95).
        preconditioner: A callable ``build(grad_batches, damping) -> LinearOperator`` (applying
            :math:`M^{-1}`; ``None`` for none), or
            ``"empirical_fisher"``: :math:`M = (\operatorname{diag}(F_{\mathrm{emp}})
            + \lambda)^{3/4}` with the exact empirical-Fisher diagonal on the gradient data
            (:func:`~secondorder.curvature.diagonal.empirical_fisher_diagonal`; for losses
            without a likelihood the squared per-sample gradients,
            :func:`~secondorder.curvature.diagonal.per_sample_gradient_diagonal`), or ``None``.
            It costs one vectorised per-sample gradient pass over the gradient data per step;
            where samples are coupled (train-mode BatchNorm, Dropout) or ``torch.func.vmap``
            fails (GRU, LSTM) it falls back to per-row backward passes of the whole batch
            (:mod:`~secondorder.curvature.per_sample`); ``diagnostics["preconditioner_path"]``
            says which path ran.
        use_cg_backtracking: Choose among the kept CG iterates by the loss (default: True);
            otherwise take the final iterate.
        use_linesearch: Line search on the chosen step (default: True); otherwise take
            it with :math:`\alpha = 1` unless the loss there is not finite.
        ls_c: Armijo constant in ``(0, 1)`` (default: 1e-2).
        ls_shrink: Line-search backtracking factor in ``(0, 1)`` (default: 0.8).
        ls_max_steps: Maximal loss evaluations of the line search (default: 30).
        min_damping: Lower bound of :math:`\lambda` (default: 1e-8).
        max_damping: Upper bound of :math:`\lambda` (default: 1e8).
        damping_rule: A callable ``rule(damping, rho) -> new damping`` (``rho`` is NaN for a
            failed step); default: :class:`~.hessian_free_parts.LevenbergMarquardt` with the
            group's ``min_damping``/``max_damping``. Used when ``adapt_damping``.
        linesearch: A callable ``search(f, f0, slope) -> (alpha, f(alpha), info)`` with
            ``f(alpha)`` the loss at :math:`\theta + \alpha\,\mathrm{lr}\,\delta`; default:
            :class:`~.hessian_free_parts.ArmijoLineSearch` with the group's ``ls_c``,
            ``ls_shrink`` and ``ls_max_steps``. Used when ``use_linesearch``.
        params: Parameters (one group) of ``model``; default: all trainable ones.
        on_nonfinite: ``"skip"`` (reject and warn) or ``"raise"``.
        engine: Linearisation engine of the curvature operators (``"auto"``).
        jacobian_factors: Whether GGN products of an MLP go through its output-Jacobian
            factors (:mod:`~secondorder.curvature.factored`): ``False`` (default) or ``True``
            (MLPs only; see ``BENCHMARKS.md`` for what it saves).
        process_group: A ``torch.distributed`` process group for data-parallel training
            (default: ``None``, one process); see above.
        weight_decay: Decoupled weight decay per param group (default 0; see
            :class:`~secondorder.optim.base.CurvatureOptimizer`).
        max_grad_norm: Clip each param group's gradient to this norm before the direction
            is computed (default ``None``: no clipping).
        momentum: Heavy-ball momentum on the step, per param group (default 0).

    Raises:
        ValueError: For an invalid hyperparameter (the message names it and its value), an
            unknown ``curvature``/``negative_curvature``/``preconditioner``, or param groups
            that differ in another hyperparameter than ``weight_decay`` and ``max_grad_norm``.

    Example:
        >>> import torch
        >>> from secondorder.optim.hessian_free import HessianFree
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 2))
        >>> X, y = torch.randn(32, 4), torch.randn(32, 2)
        >>> opt = HessianFree(model, torch.nn.MSELoss())
        >>> before = opt.step(X, y)
        >>> bool(torch.nn.MSELoss()(model(X), y) < before), opt.diagnostics["accepted"]
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        *,
        curvature: str = "ggn",
        negative_curvature: str = "stop",
        adapt_damping: bool = True,
        cg_maxiter: int = 250,
        cg_rtol: float = 1e-6,
        martens_stop: bool = True,
        martens_eps: float = 5e-4,
        cg_decay_x0: float = 0.95,
        preconditioner: str | Callable[[list[Batch], float], LinearOperator | None] | None = (
            "empirical_fisher"
        ),
        use_cg_backtracking: bool = True,
        use_linesearch: bool = True,
        ls_c: float = 1e-2,
        ls_shrink: float = 0.8,
        ls_max_steps: int = 30,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        damping_rule: Callable[[float, float], float] | None = None,
        linesearch: Callable[..., tuple[float, float, Any]] | None = None,
        params: Any = None,
        on_nonfinite: str = "skip",
        engine: str = "auto",
        jacobian_factors: bool | str = False,
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
    ) -> None:
        check_options(
            curvature,
            negative_curvature,
            preconditioner,
            damping_rule,
            linesearch,
            adapt_damping=adapt_damping,
            martens_stop=martens_stop,
            use_cg_backtracking=use_cg_backtracking,
            use_linesearch=use_linesearch,
        )
        engine = canonical_engine(engine)
        check_jacobian_factors(jacobian_factors, curvature)
        defaults = dict(
            lr=lr,
            damping=damping,
            cg_maxiter=cg_maxiter,
            cg_rtol=cg_rtol,
            martens_eps=martens_eps,
            cg_decay_x0=cg_decay_x0,
            ls_c=ls_c,
            ls_shrink=ls_shrink,
            ls_max_steps=ls_max_steps,
            min_damping=min_damping,
            max_damping=max_damping,
        )
        check_hyperparameters(defaults)
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
        self._check_groups()  # every group, and that they differ only where they may
        self.curvature = curvature
        self.negative_curvature = negative_curvature
        self.adapt_damping = adapt_damping
        self.martens_stop = martens_stop
        self.preconditioner = preconditioner
        self.use_cg_backtracking = use_cg_backtracking
        self.use_linesearch = use_linesearch
        self.damping_rule = damping_rule
        self.linesearch = linesearch
        self.engine = engine
        self.jacobian_factors = jacobian_factors

    _WARM_START_KEYS = ("x0",)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check a group's values; they must equal the first group's (see :meth:`__init__`)."""
        check_hyperparameters(group)
        if self.param_groups and group is not self.param_groups[0]:
            first = self.param_groups[0]
            for key in self.defaults:
                if key in COMMON_DEFAULTS or key == "differentiable":  # torch's own key
                    continue
                if group.get(key) != first.get(key):
                    raise ValueError(
                        f"{key}={group.get(key)!r} differs from the first param group's "
                        f"{first.get(key)!r}: Hessian-free's step length, damping, CG and line "
                        "search act on the whole step, so param groups may differ only in "
                        "weight_decay, max_grad_norm and momentum"
                    )

    # ------------------------------------------------------------------ public steps
    def acc_step(self, loss_data: Any, grad_data: Any, curvature_data: Any) -> Tensor:
        """Take one step with separate data for the loss, the gradient and the curvature.

        Each argument is one batch ``(inputs, targets)`` or an iterable of batches (read once
        into a list); its quantity is accumulated exactly over its batches, weighted like the
        curvature operators (``D_b / D`` for ``reduction="mean"``, with ``D`` the normaliser
        counted over all ranks of the process group, :mod:`~secondorder.curvature.weighting`).
        The gradient comes from the curvature's forward pass when ``grad_data`` holds the same
        tensors as ``curvature_data``, and from one extra forward/backward pass per batch
        otherwise. The reduction ratio, CG backtracking and
        the line search use ``loss_data``.

        Args:
            loss_data: Data of the loss :math:`f`.
            grad_data: Data of the gradient :math:`g`.
            curvature_data: Data of the curvature :math:`C`.

        Returns:
            The loss on ``loss_data`` at the parameters the step started from.
        """
        return self._run_step(
            _as_batch_list(curvature_data, "curvature_data"),
            loss_batches=_as_batch_list(loss_data, "loss_data"),
            grad_batches=_as_batch_list(grad_data, "grad_data"),
        )

    # ------------------------------------------------------------------ internals
    def _current_damping(self) -> float:
        group = self.param_groups[0]
        if not self.adapt_damping:
            return float(group["damping"])
        lam = self.global_state.get("damping", group["damping"])
        if not _valid_damping(lam):  # poisoned: start again from the group's damping
            self.global_state.pop("damping", None)
            self.diagnostics["damping_reset"] = True
            lam = group["damping"]
        return float(lam)

    def _validate_state_dict(self, state_dict: Any) -> None:
        super()._validate_state_dict(state_dict)
        for entry in state_dict["state"].values():
            if "damping" in entry and not _valid_damping(entry["damping"]):
                raise ValueError(
                    f"HessianFree.load_state_dict: the state's damping {entry['damping']!r} is "
                    "not a finite positive number"
                )

    def _damping_rule(self) -> Callable[[float, float], float]:
        """The damping update: the user's, or Levenberg-Marquardt with the group's bounds."""
        if self.damping_rule is not None:
            return self.damping_rule
        group = self.param_groups[0]
        return LevenbergMarquardt(
            min_damping=group["min_damping"], max_damping=group["max_damping"]
        )

    def _linesearch(self) -> Callable[..., tuple[float, float, Any]]:
        """The line search: the user's, or Armijo with the group's constants."""
        if self.linesearch is not None:
            return self.linesearch
        group = self.param_groups[0]
        return ArmijoLineSearch(group["ls_c"], group["ls_shrink"], group["ls_max_steps"])

    def _on_reject(self, reason: str) -> None:
        if self.adapt_damping:
            new_lam = self._damping_rule()(self._current_damping(), math.nan)
            self.global_state["damping"] = new_lam
            self.diagnostics["next_damping"] = new_lam

    def _preconditioner_diagonal(self, batches: list[Batch]) -> tuple[Tensor, str]:
        """The preconditioner's diagonal and the path that computed it (``DiagonalInfo.path``)."""
        params = self.fmodel.params
        diagonal = (
            empirical_fisher_diagonal
            if supports_likelihood(self.loss_fn)
            else per_sample_gradient_diagonal
        )
        d, info = diagonal(
            self.model,
            self.loss_fn,
            batches,
            params=params,
            process_group=self.process_group,
            return_info=True,
        )
        return d, info.path

    def _solve(
        self, A: LinearOperator, b: Tensor, x0: Tensor | None, M: LinearOperator | None
    ) -> tuple[Tensor, CGInfo, list[tuple[int, Tensor, float]]]:
        """Truncated PCG on ``A x = b``; returns ``(x, info, kept iterates)``."""
        group = self.param_groups[0]
        return truncated_cg(
            A,
            b,
            x0,
            M,
            rtol=group["cg_rtol"],
            maxiter=group["cg_maxiter"],
            martens_eps=group["martens_eps"] if self.martens_stop else None,
            backtracking_gamma=BACKTRACK_GAMMA if self.use_cg_backtracking else None,
            negative_curvature=self.negative_curvature,
        )

    def _build_preconditioner(self, grad_batches: list[Batch], lam: float) -> LinearOperator | None:
        """The preconditioner (applying M^-1) for this step; ValueError if unusable."""
        if self.preconditioner is None:
            return None
        if callable(self.preconditioner):
            return self.preconditioner(grad_batches, lam)
        d, self.diagnostics["preconditioner_path"] = self._preconditioner_diagonal(grad_batches)
        # the preconditioner checks d + lam (finite, > 0) in one pass
        return JacobiPreconditioner(d, damping=lam, exponent=_PRECONDITIONER_EXPONENT)

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        loss_batches: list[Batch] = kw.get("loss_batches") or batches
        grad_batches: list[Batch] = kw.get("grad_batches") or batches
        return compute_direction(self, batches, loss_batches, grad_batches)
