r"""K-FAC in the preconditioner mode: ``.grad`` replaced by the K-FAC direction.

For standard loops (kfac-pytorch's ``KFACPreconditioner``): after ``loss.backward()``,
``pre.step()`` replaces every parameter's ``.grad`` by :math:`(K + \lambda I)^{-1}` ``.grad``
with the running K-FAC factors of :class:`~secondorder.optim.kfac.KFACOptimizer`
(:class:`~secondorder.optim.kfac_state.RunningKFAC`), then any ``torch.optim`` optimizer
steps::

    pre = so.KFACPreconditioner(model, loss_fn, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()          # .grad <- (K + damping I)^-1 .grad
        opt.step()

The batch is read from the loop (:class:`~secondorder.optim.closure.BatchRecorder`) or given,
``pre.step(x, y)``. With dropout in training mode, the factors of a recorded batch belong to
the loop's own masks (the factor pass replays the generator state of the loop's forward pass,
:func:`~secondorder.optim.loop_masks.check_loop_draw` refuses masks it cannot replay, e.g. of a
fused attention kernel); with a given batch the factor pass draws masks of its own. The damping
is fixed (no loss at trial points to adapt it by). A NaN/Inf gradient or direction leaves
``.grad`` as the loop computed it, is counted in ``diagnostics["rejected"]`` and warned about.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_positive
from ..curvature.kfac import KFAC
from ..curvature.kfac_factors import APPROXES, FISHERS
from ..curvature.low_precision import LOW_PRECISION
from ..curvature.model import Batch, FunctionalModel
from .closure import MISSING, BatchRecorder, batch_of
from .guard import NonFiniteStepWarning
from .kfac_state import INVERSES, RunningKFAC, batch_statistics_as_constants
from .loop_masks import loop_batch_block
from .warn import warn_at_caller

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner:
    r"""Replace ``.grad`` by the damped K-FAC direction (module docstring).

    Args:
        model: The model the loop trains.
        loss_fn: Its loss (an ``nn.Module`` for the batch to be read from the loop).
        damping: :math:`\lambda > 0` (default 1e-2).
        factor_decay: Decay of the running factors in [0, 1) (default 0.95).
        factor_every: Steps between factor updates (default 10).
        inverse_every: Steps between eigendecompositions or inversions (default 10).
        fisher: ``"mc"`` (default), ``"exact"`` or ``"empirical"``.
        approx: ``"expand"`` or ``"reduce"``.
        num_samples: Targets drawn per sample for ``"mc"``.
        kl_clip: Scale the direction ``d`` by :math:`\nu = \min(1, \sqrt{\kappa /
            (\mathrm{lr}^2 g^\top d)})` (kfac-pytorch's KL clipping; default 1e-3, None: off).
        lr: The learning rate of the optimizer that follows, for ``kl_clip`` (default 0.1;
            update it with the optimizer's schedule).
        generator: Random generator of ``"mc"`` (default: seeded with 0).
        params: The parameters to precondition (default: every trainable one).
        process_group: ``torch.distributed`` group (factors all-reduced; ``.grad`` must be
            averaged over the ranks already, as DDP does).
        inverse: ``"eigen"`` or ``"cholesky"`` (factored Tikhonov damping with explicit
            inverses, formed again when ``damping`` changes; see ``KFACOptimizer``).

    Raises:
        ValueError: For an invalid hyperparameter.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        *,
        damping: float = 1e-2,
        factor_decay: float = 0.95,
        factor_every: int = 10,
        inverse_every: int = 10,
        fisher: str = "mc",
        approx: str = "expand",
        num_samples: int = 1,
        kl_clip: float | None = 1e-3,
        lr: float = 0.1,
        generator: torch.Generator | None = None,
        params: Any = None,
        process_group: Any = None,
        inverse: str = "eigen",
    ) -> None:
        check_choice("fisher", fisher, FISHERS)
        check_choice("inverse", inverse, INVERSES)
        check_choice("approx", approx, APPROXES)
        check_positive("damping", damping)
        check_positive("lr", lr)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        check_positive("factor_decay", factor_decay, allow_zero=True)
        if factor_decay >= 1:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
        for name, value in (
            ("factor_every", factor_every),
            ("inverse_every", inverse_every),
            ("num_samples", num_samples),
        ):
            check_positive(name, value, integer=True)
        self.model, self.loss_fn, self.damping = model, loss_fn, float(damping)
        self.factor_decay, self.factor_every, self.inverse_every = (
            float(factor_decay),
            factor_every,
            inverse_every,
        )
        self.fisher, self.approx, self.num_samples = fisher, approx, num_samples
        self.process_group, self.kl_clip, self.lr = process_group, kl_clip, float(lr)
        if fisher == "mc" and generator is None:
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        chosen = model.parameters() if params is None else params
        self.params = [p for p in dict.fromkeys(chosen) if p.requires_grad]
        if not self.params:
            raise ValueError("KFACPreconditioner: no trainable parameter")
        dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.running = RunningKFAC([p.numel() for p in self.params], dtype, inverse)
        self.state: dict[str, Any] = {"step": 0}
        self.diagnostics: dict[str, Any] = {"rejected": 0}
        self._recorder = BatchRecorder(model, loss_fn).attach()

    def remove(self) -> None:
        """Remove the hooks that read the batch from the loop."""
        self._recorder.detach()

    def step(self, inputs: Any = MISSING, targets: Any = MISSING) -> dict[str, Any]:
        """Precondition ``.grad`` in place, on the recorded batch or on ``(inputs, targets)``.

        Returns:
            The diagnostics of this step (also in :attr:`diagnostics`).

        Raises:
            ValueError: If a parameter has no ``.grad`` or no batch can be found.
            TypeError: For inputs without targets.
        """
        if inputs is MISSING:
            batch = self._recorder.batch(
                "call pre.step(inputs, targets) with the batch of the gradient instead"
            )
        else:
            if targets is MISSING:
                raise TypeError("KFACPreconditioner.step: got inputs but no targets")
            batch = batch_of(inputs, targets)
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise ValueError(
                f"KFACPreconditioner.step: parameters {missing} have no .grad; call "
                "loss.backward() first"
            )
        self.state["step"] += 1
        step = self.state["step"]
        diag = {"step": step, "accepted": False, "rejected": self.diagnostics["rejected"]}
        self.diagnostics = diag
        grad = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        if not bool(torch.isfinite(grad).all()):
            return self._reject("the gradient is not finite")
        run = self.running
        update = run.updates == 0 or (step - 1) % self.factor_every == 0
        if update:
            # the curvature of the network with the loop's own dropout masks (a recorded batch)
            recorded = inputs is MISSING
            with loop_batch_block(
                self._recorder, self.model, self.params, batch, recorded, "KFACPreconditioner"
            ):
                # a low-precision model: its batch statistics from the float32 evaluation
                low = self.params[0].dtype in LOW_PRECISION
                fm = FunctionalModel(self.model, self.params) if low else None
                with batch_statistics_as_constants(self.model, [batch], None, fm):
                    op = self._factors(batch, run.dtype)
            run.update(op, self.factor_decay)
        invert = not run.ready or (step - 1) % self.inverse_every == 0
        if invert or (run.inverse == "cholesky" and self.damping != run.inv_damping):
            invert = True
            run.decompose(self.damping)
            if run.inverse == "cholesky":
                diag["inverse_fallbacks"] = list(run.fallbacks)
        grad = grad.to(run.dtype)  # a low-precision gradient: the direction in float32
        d = run.apply(grad, self.damping)
        nu, gd = 1.0, float(grad @ d)
        if self.kl_clip is not None and gd > 0:
            nu = min(1.0, (self.kl_clip / (self.lr * self.lr * gd)) ** 0.5)
            d = d * nu
        diag.update(factors_updated=update, inverted=invert, damping=self.damping, kl_scale=nu)
        if not bool(torch.isfinite(d).all()):
            return self._reject("the K-FAC direction is not finite")
        with torch.no_grad():
            for p, part in zip(self.params, d.split([p.numel() for p in self.params])):
                p.grad.copy_(part.view_as(p))  # type: ignore[union-attr]
        diag["accepted"] = True
        return diag

    def _factors(self, batch: Batch, dtype: torch.dtype) -> KFAC:
        """The K-FAC operator of ``batch`` (its factors enter the running averages)."""
        return KFAC(
            self.model,
            self.loss_fn,
            [batch],
            fisher=self.fisher,
            approx=self.approx,
            num_samples=self.num_samples,
            generator=self.generator,
            params=self.params,
            factor_dtype=dtype,
            process_group=self.process_group,
        )

    def _reject(self, reason: str) -> dict[str, Any]:
        self.diagnostics["rejected"] += 1
        self.diagnostics["rejected_reason"] = reason
        warn_at_caller(
            f"KFACPreconditioner: step {self.state['step']}: {reason}; .grad was left as the "
            "loop computed it",
            NonFiniteStepWarning,
        )
        return self.diagnostics

    def state_dict(self) -> dict[str, Any]:
        """Step count, damping, the running factors and the generator's state."""
        out = {**self.state, "damping": self.damping, "kfac": self.running.state()}
        if self.generator is not None:
            out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        state = dict(state)
        self.damping = float(state.pop("damping", self.damping))
        gen_state = state.pop("generator_state", None)
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        saved = state.pop("kfac", None)
        running = RunningKFAC(self.running.numels, self.running.dtype, self.running.inverse)
        if saved is not None:
            running.load(saved, self.params[0].device)
        self.running = running
        self.state = state
