"""Machinery shared by every curvature-based optimizer.

A :class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that holds the model and the loss
and takes the batch: ``loss = opt.step(inputs, targets)``. One call is one training step; it
returns the loss at the parameters it started from and leaves ``opt.diagnostics``.

The contract implemented once, here, for every subclass:

- hyperparameters live in ``param_groups`` and are read, and checked, on every step (LR
  schedulers work; a value made invalid after construction raises ``ValueError`` naming the
  group before anything is touched);
  what evolves (step count, damping, CG warm start, random-generator state) lives in ``state``
  on the first parameter, so ``state_dict()``/``load_state_dict()`` round-trip exactly;
- a subclass computes a *direction* ``d`` (flat, in the parameters' device and the compute
  dtype ``self.fmodel.dtype``: the parameters' dtype, or float32 for bfloat16/float16
  parameters) without touching the parameters; the base applies
  ``theta_g <- theta_g + lr_g * d_g`` per group, rounding to the parameters' dtype only there
  (``diagnostics["stalled_fraction"]``: the share of coordinates whose nonzero update
  rounded away in bfloat16/float16). Inside ``torch.autocast`` the step's passes, products
  and solves run with autocast switched off, in the compute dtype;
- the non-finite guard: a NaN/Inf in the loss, the gradient, a curvature product or the
  direction leaves the parameters exactly as they were, marks the step rejected, lets the
  subclass react (raise its damping), warns with the reason on every rejection (counted in
  ``state["rejections"]``), and with ``on_nonfinite="raise"`` raises :class:`NonFiniteError`.
  The guard covers the scaled step actually applied (``lr_g * d_g``). A rejected step drops
  the CG warm start it could have poisoned; a step that raises leaves
  ``diagnostics["accepted"] = False``;
- the trainable parameters are those of the param groups with ``requires_grad``, read on
  every step: a parameter frozen after construction is skipped (as torch's optimizers do) and
  :meth:`~CurvatureOptimizer.add_param_group` adds parameters to the flat vector;
- running statistics of normalisation layers in training mode (BatchNorm) change as one
  forward pass at the step's starting parameters on its batches would change them, however
  many passes the method makes (:mod:`secondorder.curvature.running_stats`);
- ``state_dict()`` holds plain data (``torch.load(weights_only=True)`` reads it) and names the
  optimizer class and parameter shapes; ``load_state_dict`` refuses a state of another class or
  model with a ``ValueError``;
- ``copy.deepcopy(opt)`` and ``pickle`` copy the model with the optimizer (the copy trains a
  copy of the model, as a deep-copied torch optimizer steps copies of its parameters);
  ``copy.deepcopy((model, opt))`` gives an independent pair in which the copied optimizer
  trains the copied model. An optimizer with a ``process_group`` cannot be copied;
- with a ``process_group``, construction checks with one collective that every rank holds
  parameters of the same shapes and values, and raises the same ``ValueError`` on every rank
  otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..curvature import CurvatureOperator
from ..curvature.model import Batch, FunctionalModel
from ..curvature.random_state import one_draw_per_batch, replay
from ..curvature.running_stats import (
    restore_running_stats,
    running_stat_modules,
    snapshot_running_stats,
)
from ..linalg.precision import autocast_disabled
from .closure import FORMS, MISSING, batch_of, record_closure
from .curvatures import CURVATURES, build_curvature
from .distributed import check_ranks_agree
from .groups import (
    COMMON_DEFAULTS,
    check_cg_group,
    check_common_group,
    check_jacobian_factors,
    check_positive,
)
from .guard import NonFiniteError, NonFiniteGuard, NonFiniteStepWarning, all_finite, vector_norm
from .habits import GradientHabits
from .losses_at import TrialLosses
from .state import META_KEY, settle_loaded_state, validate_state_dict

__all__ = [
    "CURVATURES",
    "CurvatureOptimizer",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "all_finite",
    "check_cg_group",
    "check_jacobian_factors",
    "check_positive",
    "vector_norm",
]


class CurvatureOptimizer(TrialLosses, GradientHabits, NonFiniteGuard, Optimizer):
    r"""Base class: holds the model and loss, the flat parameter view, diagnostics and the guard.

    Args:
        model: The ``nn.Module`` to train. Compiled by ``torch.compile``, the step's own passes
            run the module underneath; a closure's call is recorded on the module given here.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        defaults: Default hyperparameters of the param groups.
        params: Parameters or param-group dicts (default: every trainable parameter of
            ``model``). All must belong to ``model``.
        on_nonfinite: ``"skip"`` (reject the step and warn) or ``"raise"``.
        weight_decay: Decoupled weight decay (as ``AdamW``): an applied step is
            :math:`\theta_g \leftarrow (1 - \mathrm{lr}_g \lambda_g)\,\theta_g +
            \mathrm{lr}_g d_g`; a param-group hyperparameter (default 0).
        max_grad_norm: Scale each param group's gradient to at most this norm before the
            direction is computed from it (``None``: no clipping, the default); a param-group
            hyperparameter. ``.grad`` keeps the unclipped batch gradient.
        momentum: Heavy-ball momentum on the direction, :math:`v = d + \mu v_{prev}`, applied
            as :math:`\theta \mathrel{+}= lr\, v` (default 0; a param-group hyperparameter in
            [0, 1), so ``OneCycleLR``'s momentum cycling works).
        allow_groups: Whether several param groups are supported by the method.
        process_group: A ``torch.distributed`` group for data-parallel training (``None``: one
            process). Each rank passes its shard of the batch; curvature products, gradients
            and losses are all-reduced, so every rank computes the same step and the
            parameters stay identical without being broadcast. Construction checks (one
            ``all_gather``) that every rank holds parameters of the same shapes and values.

    After a step that computed a finite gradient, each trained parameter's ``.grad`` holds the
    batch gradient at the parameters the step started from (as after ``loss.backward()``).

    Copies: ``copy.deepcopy(opt)`` and ``pickle`` carry the model and the loss with the
    optimizer, so the copy trains a copy of the model and leaves the original alone (as a
    deep-copied ``torch.optim`` optimizer steps copies of its parameters). Copy the model and the
    optimizer in one call, ``model2, opt2 = copy.deepcopy((model, opt))``, to get a pair in which
    ``opt2`` trains ``model2``. An LR scheduler's wrapper of ``step`` is not copied.

    Raises:
        ValueError: For invalid arguments, unsupported param groups, or ranks of the process
            group that hold different parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        defaults: dict[str, Any],
        *,
        params: Iterable[Any] | None = None,
        on_nonfinite: str = "skip",
        allow_groups: bool = True,
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
    ) -> None:
        common = {"weight_decay": weight_decay, "max_grad_norm": max_grad_norm}
        common["momentum"] = momentum
        check_common_group(common)
        defaults = {**defaults, **common}
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if params is None:
            params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        self._allow_groups = allow_groups
        self._flat_view_built = False
        super().__init__(params, defaults)
        if len(self.param_groups) > 1 and not allow_groups:
            raise ValueError(
                f"{type(self).__name__} supports a single param group (its damping adapts "
                f"globally), got {len(self.param_groups)}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.on_nonfinite = on_nonfinite
        self.process_group = process_group
        self.diagnostics: dict[str, Any] = {}
        self._build_flat_view()
        if process_group is not None:
            params_ = [p for g in self.param_groups for p in g["params"]]
            check_ranks_agree(params_, process_group, type(self).__name__)

    _STATS_FROM_FIRST_PASS: ClassVar[bool] = False
    """The subclass's first pass of a step runs every batch in training mode at the starting
    parameters and calls :meth:`_record_running_stats` after it: that pass moves the running
    statistics exactly as the plain pass would, which is then skipped."""

    _WARM_START_KEYS: ClassVar[tuple[str, ...]] = ()
    """State entries holding a flat vector carried from step to step (a CG warm start): reset
    by a rejected step and when the trainable parameters change."""

    def _build_flat_view(self) -> None:
        """(Re)build the flat parameter view over the trainable parameters of the groups."""
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(self).__name__}: no parameter to train: every parameter of the param "
                "groups has requires_grad=False"
            )
        rebuilt = self._flat_view_built
        self.fmodel = FunctionalModel(self.model, trainable)
        # flat slices of each group, in the FunctionalModel's order
        offsets, start = {}, 0
        for p, n in zip(self.fmodel.params, self.fmodel.numels):
            offsets[id(p)] = (start, start + n)
            start += n
        self._group_slices = [
            [offsets[id(p)] for p in g["params"] if id(p) in offsets] for g in self.param_groups
        ]
        self._param_list: list[Tensor] = list(self.fmodel.params)  # for torch._foreach_add_
        self._trainable = tuple(trainable)
        self._placement = tuple((p.dtype, p.device) for p in trainable)
        self._norm_layers = running_stat_modules(self.model, training_only=False)
        self._flat_view_built = True
        if rebuilt:  # the flat vector changed meaning: a warm start of the old one is void
            for key in self._WARM_START_KEYS:
                self.global_state.pop(key, None)

    def _sync_flat_view(self) -> None:
        """Follow parameters frozen or unfrozen (``requires_grad``), cast or moved since."""
        now = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        old = self._trainable
        if len(now) != len(old) or any(a is not b for a, b in zip(now, old)):
            self._build_flat_view()
        elif tuple((p.dtype, p.device) for p in now) != self._placement:
            # model.double() / model.to(device) after construction: follow the parameters
            self._build_flat_view()
            dtype, device = self.fmodel.dtype, self.fmodel.device
            for key, value in list(self.global_state.items()):
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.global_state[key] = value.to(device=device, dtype=dtype)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its parameters join the flat vector from the next step on.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``; its parameters must
                belong to the model.

        Raises:
            ValueError: For a method with a single param group, parameters that are not the
                model's, or invalid hyperparameters.
        """
        if not getattr(self, "_flat_view_built", False):  # called by torch's __init__
            super().add_param_group(param_group)
            return
        if not self._allow_groups:
            raise ValueError(
                f"{type(self).__name__} supports a single param group (its damping adapts "
                "globally): add_param_group is not supported"
            )
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            self._build_flat_view()
        except (ValueError, TypeError):  # nothing was rebuilt: drop the group again
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check one param group's hyperparameters (subclass hook; raise ``ValueError``)."""
        check_positive("lr", group["lr"])

    def _check_groups(self) -> None:
        """Check every param group's hyperparameters, as they are now.

        Raises:
            ValueError: Naming the group and the invalid value.
        """
        for i, group in enumerate(self.param_groups):
            try:
                check_common_group(group)
                self._check_group(group)
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: param group {i}: {err}") from None

    # ------------------------------------------------------------- copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """Everything, the model and loss included (torch's keeps only groups and state).

        Raises:
            TypeError: For an optimizer bound to a process group.
        """
        if self.__dict__.get("process_group") is not None:
            raise TypeError(
                f"{type(self).__name__} with a process_group cannot be copied or pickled; "
                "build a new optimizer on the copied model in each process"
            )
        state = dict(self.__dict__)
        # an LR scheduler's wrapper of `step` (an instance attribute) stays with the original,
        # as with torch's optimizers
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`__getstate__` (torch adds its hooks)."""
        super().__setstate__(state)

    # --------------------------------------------------------------------- state
    generator: torch.Generator | None = None
    """Random generator of a stochastic method; its state travels in ``state_dict``."""

    def state_dict(self) -> dict[str, Any]:  # noqa: D102 - torch's docstring applies
        if self.generator is not None:
            self.global_state["generator_state"] = self.generator.get_state()
        out = super().state_dict()
        out[META_KEY] = {
            "optimizer": type(self).__name__,
            "param_shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, after checking it belongs here.

        Args:
            state_dict: The state of an optimizer of the same class on a model with the same
                parameter shapes.

        Raises:
            ValueError: For a state of another optimizer class or model (parameter count or
                shapes), missing hyperparameters, invalid values or a warm start of another
                length.
        """
        self._validate_state_dict(state_dict)
        super().load_state_dict(state_dict)
        settle_loaded_state(self, COMMON_DEFAULTS)

    def _validate_state_dict(self, state_dict: Any) -> None:
        validate_state_dict(self, state_dict)

    @property
    def global_state(self) -> dict[str, Any]:
        """State shared by all parameters.

        Kept on the first parameter of the first group, so ``state_dict`` carries it.
        """
        return self.state[self.param_groups[0]["params"][0]]

    def _group_vector(self, key: str) -> float | Tensor:
        """A group hyperparameter as a scalar if all groups agree, else a per-coordinate vector."""
        if len(self.param_groups) == 1:
            return float(self.param_groups[0][key])
        values = [float(g[key]) for g in self.param_groups]
        if len(set(values)) == 1:
            return values[0]
        out = torch.empty(self.fmodel.dim, dtype=self.fmodel.dtype, device=self.fmodel.device)
        for value, slices in zip(values, self._group_slices):
            for a, b in slices:
                out[a:b] = value
        return out

    # --------------------------------------------------------------------- helpers
    _batch = staticmethod(batch_of)

    def _curvature(
        self, kind: str, data: Any, *, generator: torch.Generator | None = None, **kw: Any
    ) -> CurvatureOperator:
        """Build the curvature operator ``kind`` (one of ``CURVATURES``) on ``data``."""
        kw.setdefault("process_group", self.process_group)
        return build_curvature(
            kind, self.model, self.loss_fn, data, self.fmodel.params, generator=generator, **kw
        )

    def step(self, inputs: Any = MISSING, targets: Any = MISSING) -> Tensor:  # type: ignore[override]
        """Take one training step on the batch ``(inputs, targets)``, or on a closure's batch.

        Args:
            inputs: A tensor or a tuple of tensors; the model is called as ``model(*inputs)``.
                Or a closure in the torch.optim form, called once, which calls the model once
                and returns ``loss_fn(outputs, targets)`` (``loss_fn`` an ``nn.Module``) or
                ``(outputs, targets)`` (:mod:`~secondorder.optim.closure`).
            targets: The targets handed to ``loss_fn`` (not with a closure).

        Returns:
            The loss at the parameters the step started from.

        Raises:
            TypeError: If called without a batch or a closure (the message names both forms).
            ValueError: For an empty batch, a closure that does not reveal its batch, or a
                hyperparameter made invalid in ``param_groups`` (nothing is touched then).
        """
        if inputs is MISSING or (callable(inputs) and not isinstance(inputs, (Tensor, nn.Module))):
            if inputs is MISSING or targets is not MISSING:
                raise TypeError(
                    f"{type(self).__name__}.step: expected {FORMS}; got "
                    + ("no arguments" if inputs is MISSING else "a closure and targets")
                    + ". A curvature optimizer needs the batch: a step after loss.backward() "
                    "alone cannot be computed"
                )
            return self._run_step([record_closure(self.model, self.loss_fn, inputs)])
        if targets is MISSING:
            raise TypeError(
                f"{type(self).__name__}.step: got inputs but no targets; expected {FORMS}"
            )
        return self._run_step([batch_of(inputs, targets)])

    @staticmethod
    def _check_not_empty(batches: Sequence[Batch], what: str) -> None:
        for i, b in enumerate(batches):
            if b.size == 0:
                where = f"batch {i} of {what}" if len(batches) > 1 else what
                raise ValueError(
                    f"{where} holds no samples (its leading dimension is 0); a step needs at "
                    "least one sample"
                )

    def _run_step(self, batches: list[Batch], **kw: Any) -> Tensor:
        # step pre/post hooks run in torch.optim.Optimizer's wrapper of `step`
        start = time.perf_counter()
        self._check_groups()
        self._check_not_empty(batches, "the batch")
        for key, value in kw.items():
            if isinstance(value, list):  # HessianFree.acc_step's loss_data and grad_data
                self._check_not_empty(value, key.replace("_batches", "_data"))
        self._sync_flat_view()
        state = self.global_state
        state["step"] = state.get("step", 0) + 1
        self.diagnostics = {"step": state["step"], "accepted": True}
        # running statistics: one plain forward pass at the starting parameters updates them;
        # whatever the method's own passes do to them is undone below
        norms = [m for m in self._norm_layers if m.training]
        stats_before = snapshot_running_stats(norms) if norms else None
        stats_after = None
        self._stats_pending: list[nn.Module] | None = None
        self._stats_recorded: Any = None
        try:
            # every pass of the step on a batch draws the same random numbers (one dropout
            # mask per batch for the loss, the gradient and every product of the step)
            with one_draw_per_batch(self.fmodel.device):
                if norms and self._STATS_FROM_FIRST_PASS and not self.fmodel.mixed:
                    self._stats_pending = norms  # recorded by the subclass's first pass
                elif norms:
                    stats_after = self._running_stats_pass(batches, norms)
                with autocast_disabled():  # the step computes in self.fmodel.dtype
                    loss = self._step_body(batches, **kw)
                if self._stats_pending is not None:
                    raise RuntimeError(
                        f"{type(self).__name__}: the running statistics were not recorded"
                    )
                stats_after = self._stats_recorded if stats_after is None else stats_after
        except BaseException as err:
            diag = self.diagnostics
            if diag.get("accepted", True):
                diag["rejected_reason"] = f"the step raised {type(err).__name__}: {err}"
            diag.update(accepted=False, step_norm=0.0, time=time.perf_counter() - start)
            if stats_before is not None:
                restore_running_stats(stats_before)
            raise
        if stats_after is not None and stats_before is not None:
            accepted = self.diagnostics.get("accepted", True)
            restore_running_stats(stats_after if accepted else stats_before)
        self.diagnostics["time"] = time.perf_counter() - start
        return loss

    def _running_stats_pass(self, batches: Sequence[Batch], norms: list[nn.Module]) -> Any:
        """One plain forward pass per batch (it moves the running statistics); their snapshot."""
        with torch.no_grad():
            for b in batches:  # a compiled model: the module underneath
                with replay(b.inputs):
                    self.fmodel.source(*b.inputs)
        return snapshot_running_stats(norms)

    def _record_running_stats(self, batches: Sequence[Batch], ran: bool) -> None:
        """After the first pass of a step (``_STATS_FROM_FIRST_PASS``): snapshot the statistics.

        Args:
            batches: The step's batches.
            ran: Whether that pass ran the model in training mode on every batch at the
                starting parameters; if not, the plain pass runs now (call this before any
                parameter moves).
        """
        norms, self._stats_pending = getattr(self, "_stats_pending", None), None
        if norms is None:
            return
        if ran:
            self._stats_recorded = snapshot_running_stats(norms)
        else:
            self._stats_recorded = self._running_stats_pass(batches, norms)

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        """Return (loss before the step, flat direction or None if rejected). Subclass hook."""
        raise NotImplementedError
