"""Machinery shared by every curvature-based optimizer.

A :class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that holds the model and the loss
and takes the batch: ``loss = opt.step(inputs, targets)``. One call is one training step; it
returns the loss at the parameters it started from and leaves ``opt.diagnostics``.

The contract implemented once, here, for every subclass:

- hyperparameters live in ``param_groups`` and are read on every step (LR schedulers work);
  what evolves (step count, damping, CG warm start, random-generator state) lives in ``state``
  on the first parameter, so ``state_dict()``/``load_state_dict()`` round-trip exactly;
- a subclass computes a *direction* ``d`` (flat, in the parameters' dtype and device) without
  touching the parameters; the base applies ``theta_g <- theta_g + lr_g * d_g`` per group;
- the non-finite guard: a NaN/Inf in the loss, the gradient, a curvature product or the
  direction leaves the parameters exactly as they were, marks the step rejected, lets the
  subclass react (raise its damping), warns once, and with ``on_nonfinite="raise"`` raises
  :class:`NonFiniteError`.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor, nn
from torch.optim import Optimizer

from ..curvature import GGN, CurvatureOperator, Fisher, Hessian
from ..curvature.base import allreduce_sum
from ..curvature.jacobian_factors import check_jacobian_factors_option
from ..curvature.model import Batch, FunctionalModel
from ..curvature.weighting import batch_weights

__all__ = [
    "CurvatureOptimizer",
    "NonFiniteError",
    "NonFiniteStepWarning",
    "check_cg_group",
    "check_jacobian_factors",
    "check_positive",
]

CURVATURES = ("ggn", "hessian", "fisher", "fisher_mc", "empirical_fisher")


class NonFiniteError(FloatingPointError):
    """A step met a NaN/Inf and ``on_nonfinite="raise"`` was requested."""


class NonFiniteStepWarning(UserWarning):
    """A step met a NaN/Inf; it was rejected and the parameters were left unchanged."""


def check_positive(
    name: str, value: Any, *, allow_zero: bool = False, integer: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite positive (or non-negative) number.

    Args:
        name: The hyperparameter's name, for the message.
        value: Its value.
        allow_zero: Accept 0.
        integer: Require an ``int``.

    Raises:
        ValueError: If the value is invalid.
    """
    kind = "int" if integer else "number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name} value: {value!r} (expected a finite {kind} {bound})")


def vector_norm(t: Tensor) -> float:
    """The Euclidean norm of a flat vector, through one BLAS dot product.

    NaN and Inf entries give a NaN or Inf norm (as ``t.norm()``); so do squares beyond the
    dtype's range. The dot product runs on one thread, which for the vectors of a step is
    faster than the parallel reduction behind ``Tensor.norm`` (no wake-up of the pool).
    """
    return float(torch.dot(t, t)) ** 0.5


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, at the cost of one reduction.

    A finite sum proves it (NaN and Inf propagate through a sum); only a non-finite sum, which
    may also be an overflow of finite entries, is confirmed entry by entry.
    """
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def check_jacobian_factors(value: Any, curvature: str) -> None:
    """Check an optimizer's ``jacobian_factors`` option against its curvature.

    Raises:
        ValueError: Unless ``value`` is ``True``, ``False`` or ``"auto"``, or for ``True`` with
            the Hessian.
    """
    check_jacobian_factors_option(value)
    if value is True and curvature == "hessian":
        raise ValueError("jacobian_factors=True serves GGN and Fisher products, not the Hessian")


def check_cg_group(group: dict[str, Any]) -> None:
    """Check the hyperparameters of a damped Newton-CG param group (or of the defaults).

    Args:
        group: Holds ``lr``, ``damping``, ``cg_maxiter``, ``cg_rtol`` and ``cg_atol``.

    Raises:
        ValueError: Naming the first invalid value.
    """
    check_positive("lr", group["lr"])
    check_positive("damping", group["damping"], allow_zero=True)
    check_positive("cg_maxiter", group["cg_maxiter"], integer=True)
    check_positive("cg_rtol", group["cg_rtol"], allow_zero=True)
    check_positive("cg_atol", group["cg_atol"], allow_zero=True)


class CurvatureOptimizer(Optimizer):
    """Base class: holds the model and loss, the flat parameter view, diagnostics and the guard.

    Args:
        model: The ``nn.Module`` to train.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        defaults: Default hyperparameters of the param groups.
        params: Parameters or param-group dicts (default: every trainable parameter of
            ``model``). All must belong to ``model``.
        on_nonfinite: ``"skip"`` (reject the step, warn once) or ``"raise"``.
        allow_groups: Whether several param groups are supported by the method.
        process_group: A ``torch.distributed`` group for data-parallel training (``None``: one
            process). Each rank passes its shard of the batch; curvature products, gradients
            and losses are all-reduced, so every rank computes the same step and the
            parameters stay identical without being broadcast.

    Raises:
        ValueError: For invalid arguments or unsupported param groups.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if params is None:
            params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
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
        all_params = [p for g in self.param_groups for p in g["params"]]
        self.fmodel = FunctionalModel(model, all_params)
        # flat slices of each group, in the FunctionalModel's order
        offsets, start = {}, 0
        for p, n in zip(self.fmodel.params, self.fmodel.numels):
            offsets[id(p)] = (start, start + n)
            start += n
        self._group_slices = [[offsets[id(p)] for p in g["params"]] for g in self.param_groups]
        self.diagnostics: dict[str, Any] = {}
        self._warned_nonfinite = False
        self._param_list: list[Tensor] = list(self.fmodel.params)  # for torch._foreach_add_

    # ----------------------------------------------------------- step wrapper
    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """``torch.optim.Optimizer``'s wrapper of ``step``, profiling only while profiled.

        The wrapper runs the global and per-optimizer step pre-hooks (which may replace the
        arguments) and post-hooks around ``step``, as torch's does. Torch's also opens a
        ``record_function`` range on every step, which costs 10 µs warm and about 70 µs
        after another model's step on a CPU even with no profiler listening; here the range
        is opened (by torch's own wrapper) only when ``torch.autograd._profiler_enabled()``.
        """
        profiled = Optimizer.profile_hook_step(func)
        pre_global = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
        post_global = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
        if pre_global is None or post_global is None:  # a torch without them: its wrapper
            return profiled

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if torch.autograd._profiler_enabled():
                return profiled(*args, **kwargs)
            self = args[0]
            for pre_hook in itertools.chain(
                pre_global.values(), self._optimizer_step_pre_hooks.values()
            ):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{func} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
                    args, kwargs = result
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in itertools.chain(
                self._optimizer_step_post_hooks.values(), post_global.values()
            ):
                post_hook(self, args, kwargs)
            return out

        return wrapper

    # --------------------------------------------------------------------- state
    generator: torch.Generator | None = None
    """Random generator of a stochastic method; its state travels in ``state_dict``."""

    def state_dict(self) -> dict[str, Any]:  # noqa: D102 - torch's docstring applies
        if self.generator is not None:
            self.global_state["generator_state"] = self.generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state_dict)
        gen_state = self.global_state.get("generator_state")
        if self.generator is not None and gen_state is not None:
            self.generator.set_state(gen_state.to("cpu", torch.uint8))

    @property
    def global_state(self) -> dict[str, Any]:
        """State shared by all parameters (kept on the first one, so state_dict carries it)."""
        return self.state[self.fmodel.params[0]]

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
    @staticmethod
    def _batch(inputs: Any, targets: Any) -> Batch:
        return Batch(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), targets)

    def _curvature(
        self, kind: str, data: Any, *, generator: torch.Generator | None = None, **kw: Any
    ) -> CurvatureOperator:
        """Build the curvature operator ``kind`` (one of ``CURVATURES``) on ``data``.

        ``jacobian_factors`` in ``kw`` goes to the GGN and Fisher operators (the Hessian has
        no such products).
        """
        params = self.fmodel.params
        kw.setdefault("process_group", self.process_group)
        if kind == "hessian":
            kw.pop("jacobian_factors", None)
        if kind == "ggn":
            return GGN(self.model, self.loss_fn, data, params=params, **kw)
        if kind == "hessian":
            return Hessian(self.model, self.loss_fn, data, params=params, **kw)
        if kind == "fisher":
            return Fisher(self.model, self.loss_fn, data, kind="exact", params=params, **kw)
        if kind == "fisher_mc":
            return Fisher(
                self.model, self.loss_fn, data, kind="mc", params=params, generator=generator, **kw
            )
        if kind == "empirical_fisher":
            return Fisher(self.model, self.loss_fn, data, kind="empirical", params=params, **kw)
        raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}")

    @torch.no_grad()
    def loss_at(self, theta: Tensor, batches: Sequence[Batch]) -> Tensor:
        """The loss at the flat parameters ``theta`` on ``batches`` (weighted as the operators).

        Args:
            theta: Flat parameter vector (the model's parameters are not modified).
            batches: The data.

        Returns:
            The loss (a 0-dim tensor).
        """
        return self._loss_of(self.fmodel.unflatten(theta), batches)

    @torch.no_grad()
    def loss_along(self, direction: Tensor, scale: float, batches: Sequence[Batch]) -> Tensor:
        r"""The loss at :math:`\theta + \mathrm{scale} \cdot d` on ``batches``.

        :math:`\theta` are the current parameters, which are not modified. The trial point
        is built parameter by parameter (one batched add), without a flat copy of
        :math:`\theta`.

        Args:
            direction: Flat direction :math:`d`, shape ``(dim,)``.
            scale: The step length along it.
            batches: The data.

        Returns:
            The loss (a 0-dim tensor).
        """
        point = torch._foreach_add(
            self._param_list,  # type: ignore[arg-type]
            self.fmodel.unflatten(direction),
            alpha=scale,
        )
        return self._loss_of(point, batches)

    def _loss_of(self, tensors: Sequence[Tensor], batches: Sequence[Batch]) -> Tensor:
        """The loss at the parameter values ``tensors`` (in parameter shapes) on ``batches``."""
        weighting = batch_weights(self.loss_fn, batches, self.fmodel, self.process_group)
        loss: Tensor | None = None
        for b, w in zip(batches, weighting.weights(batches)):
            if w == 0.0:  # every target ignored (its own mean is 0/0)
                continue
            value = self.loss_fn(self.fmodel(tensors, b.inputs), b.targets)
            value = value * w if w != 1.0 else value
            loss = value if loss is None else loss + value
        if loss is None:  # every batch of this rank has weight 0
            loss = torch.zeros((), dtype=self.fmodel.dtype, device=self.fmodel.device)
        return self._allreduce_sum(loss.detach())

    def _allreduce_sum(self, value: Tensor) -> Tensor:
        """Sum a tensor over the process group (identity with one process)."""
        return allreduce_sum([value], self.process_group)[0]

    @torch.no_grad()
    def _apply_direction(self, direction: Tensor, direction_norm: float) -> float:
        """``theta_g += lr_g * d_g`` for every group; returns the norm of the applied step."""
        lr = self._group_vector("lr")
        if isinstance(lr, Tensor):
            step = direction * lr
            torch._foreach_add_(self._param_list, self.fmodel.unflatten(step))  # type: ignore[arg-type]
            return vector_norm(step)
        torch._foreach_add_(self._param_list, self.fmodel.unflatten(direction), alpha=lr)
        return abs(lr) * direction_norm

    def _reject(self, reason: str) -> None:
        """Mark the step rejected for a non-finite value; warn once or raise."""
        self.diagnostics["accepted"] = False
        self.diagnostics["rejected_reason"] = reason
        self._on_reject(reason)
        message = (
            f"{type(self).__name__}: step {self.global_state.get('step', 0)} rejected: {reason}; "
            "the parameters were left unchanged"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        if not self._warned_nonfinite:
            warnings.warn(message, NonFiniteStepWarning, stacklevel=3)
            self._warned_nonfinite = True

    def _on_reject(self, reason: str) -> None:
        """Hook: react to a rejected step (e.g. raise the damping)."""

    # ----------------------------------------------------------------------- step
    def step(self, inputs: Any = None, targets: Any = None) -> Tensor:  # type: ignore[override]
        """Take one training step on the batch ``(inputs, targets)``.

        Args:
            inputs: A tensor or a tuple of tensors; the model is called as ``model(*inputs)``.
            targets: The targets handed to ``loss_fn``.

        Returns:
            The loss at the parameters the step started from.
        """
        return self._run_step([self._batch(inputs, targets)])

    def _run_step(self, batches: list[Batch], **kw: Any) -> Tensor:
        # step pre/post hooks run in torch.optim.Optimizer's wrapper of `step`
        start = time.perf_counter()
        state = self.global_state
        state["step"] = state.get("step", 0) + 1
        self.diagnostics = {"step": state["step"], "accepted": True}
        loss, direction = self._compute_direction(batches, **kw)
        diag = self.diagnostics
        if "loss" not in diag:  # _check_loss_and_gradient has read it already
            diag["loss"] = float(loss)
        if diag.get("accepted", True) and direction is not None:
            # a finite norm proves every entry finite (one reduction for the check and the
            # step norm); an infinite one may be an overflow of finite entries
            norm = vector_norm(direction)
            if not math.isfinite(norm) and not all_finite(direction):
                self._reject("the step direction is not finite")
            else:
                diag["step_norm"] = self._apply_direction(direction, norm)
        if not diag.get("accepted", True):
            diag["step_norm"] = 0.0
        diag["time"] = time.perf_counter() - start
        return loss

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        """Return (loss before the step, flat direction or None if rejected). Subclass hook."""
        raise NotImplementedError

    def _check_loss_and_gradient(self, loss: Tensor, grad: Tensor) -> bool:
        """Record loss and gradient norm; reject and return False if either is non-finite."""
        grad_norm = vector_norm(grad)
        loss_f = float(loss)
        self.diagnostics.update(loss=loss_f, grad_norm=grad_norm)
        if not math.isfinite(loss_f):
            self._reject("the loss is not finite")
            return False
        # a finite norm proves every entry finite; an infinite one may be an overflow
        if not math.isfinite(grad_norm) and not bool(torch.isfinite(grad).all()):
            self._reject("the gradient is not finite")
            return False
        return True
