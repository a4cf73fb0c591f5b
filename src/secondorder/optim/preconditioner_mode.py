r"""The preconditioner mode: Newton directions for any ``torch.optim`` optimizer.

In a standard loop the user computes the gradient and calls a first-order optimizer;
:class:`CurvaturePreconditioner` goes in between (where kfac-pytorch's ``KFACPreconditioner``
goes) and replaces each parameter's ``.grad`` by the damped curvature-preconditioned direction

.. math::
    g \leftarrow (C + \lambda I)^{-1} g,

solved by CG on the batch of the step, with :math:`C` the GGN, the Hessian or a Fisher
matrix. SGD with momentum, AdamW or Muon then run on Newton directions::

    pre = so.CurvaturePreconditioner(model, loss_fn, damping=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()          # .grad <- (C + damping I)^-1 .grad
        opt.step()

The batch is read from the loop (:class:`~secondorder.optim.closure.BatchRecorder`: the model's
last call with gradients enabled and the ``nn.Module`` loss applied to its output), or given,
``pre.step(x, y)``. ``.grad`` must be the gradient of that batch's loss (with a
``process_group``, averaged over the ranks as DDP does; the curvature is all-reduced). The
damping is fixed (a hyperparameter the user may change between steps): without loss evaluations
at trial points there is no reduction ratio to adapt it by. A NaN/Inf in the gradient or in the
solve leaves ``.grad`` as the loop computed it, counts the step in ``diagnostics["rejected"]``
and warns with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_positive
from ..linalg.cg import cg
from ..linalg.operator import Identity
from ..linalg.precision import autocast_disabled
from ..linalg.status import SolverStatus
from .closure import MISSING, BatchRecorder, batch_of
from .curvatures import CURVATURES, build_curvature
from .guard import NonFiniteStepWarning
from .loop_masks import loop_batch_block
from .warn import warn_at_caller

__all__ = ["CurvaturePreconditioner"]


class CurvaturePreconditioner:
    r"""Replace ``.grad`` by :math:`(C + \lambda I)^{-1}` ``.grad`` (module docstring).

    Args:
        model: The model the loop trains.
        loss_fn: Its loss; an ``nn.Module`` for the batch to be read from the loop.
        curvature: ``"ggn"`` (default), ``"hessian"``, ``"fisher"``, ``"fisher_mc"`` or
            ``"empirical_fisher"``.
        damping: :math:`\lambda > 0`.
        cg_maxiter: CG iterations per step.
        cg_rtol: CG's relative residual tolerance.
        warm_start: Start CG from the previous step's direction.
        params: The parameters to precondition (default: every trainable one).
        num_samples: Monte-Carlo samples of ``"fisher_mc"``.
        generator: Random generator of ``"fisher_mc"``.
        engine: How curvature products are computed (as for the operators).
        process_group: ``torch.distributed`` group (the curvature is all-reduced).

    Raises:
        ValueError: For an invalid hyperparameter or curvature.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        *,
        curvature: str = "ggn",
        damping: float = 1e-3,
        cg_maxiter: int = 20,
        cg_rtol: float = 1e-3,
        warm_start: bool = False,
        params: Any = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        engine: str = "auto",
        process_group: Any = None,
    ) -> None:
        check_choice("curvature", curvature, CURVATURES)
        check_positive("damping", damping)
        check_positive("cg_maxiter", cg_maxiter, integer=True)
        check_positive("cg_rtol", cg_rtol, allow_zero=True)
        self.model, self.loss_fn = model, loss_fn
        self.curvature, self.damping = curvature, damping
        self.cg_maxiter, self.cg_rtol, self.warm_start = cg_maxiter, cg_rtol, warm_start
        self.num_samples, self.engine, self.process_group = num_samples, engine, process_group
        if curvature == "fisher_mc" and generator is None:
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        chosen = model.parameters() if params is None else params
        self.params = [p for p in dict.fromkeys(chosen) if p.requires_grad]
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
        """
        with autocast_disabled():  # the solve runs in the curvature's dtype
            return self._step(inputs, targets)

    def _step(self, inputs: Any, targets: Any) -> dict[str, Any]:
        if inputs is MISSING:
            batch = self._recorder.batch(
                "call pre.step(inputs, targets) with the batch of the gradient instead"
            )
        else:
            if targets is MISSING:
                raise TypeError("CurvaturePreconditioner.step: got inputs but no targets")
            batch = batch_of(inputs, targets)
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise ValueError(
                f"CurvaturePreconditioner.step: parameters {missing} have no .grad; call "
                "loss.backward() first"
            )
        self.state["step"] += 1
        diag = {
            "step": self.state["step"],
            "accepted": False,
            "rejected": self.diagnostics["rejected"],
        }
        self.diagnostics = diag
        grad = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        if not bool(torch.isfinite(grad).all()):
            return self._reject("the gradient is not finite")
        # the curvature of the network with the loop's own dropout masks (a recorded batch)
        recorded = inputs is MISSING
        with loop_batch_block(
            self._recorder, self.model, self.params, batch, recorded, "CurvaturePreconditioner"
        ):
            C = build_curvature(
                self.curvature,
                self.model,
                self.loss_fn,
                [batch],
                self.params,
                generator=self.generator,
                engine=self.engine,
                cache=True,
                process_group=self.process_group,
                **({"num_samples": self.num_samples} if self.curvature == "fisher_mc" else {}),
            )
            grad = grad.to(C.dtype)  # solved in float32 for bfloat16/float16 parameters
            A = C + Identity(C.shape[0], dtype=C.dtype, device=grad.device) * self.damping
            x0 = self.state.get("x0") if self.warm_start else None
            d, info = cg(A, grad, x0, rtol=self.cg_rtol, maxiter=self.cg_maxiter)
        diag.update(cg_iterations=info.iterations, cg_residual=info.residual_norm)
        diag.update(cg_status=info.status.name.lower(), damping=self.damping)
        if info.status == SolverStatus.NONFINITE or not bool(torch.isfinite(d).all()):
            return self._reject("a curvature product was not finite during CG")
        if self.warm_start:
            self.state["x0"] = d.detach().clone()
        with torch.no_grad():
            for p, part in zip(self.params, d.split([p.numel() for p in self.params])):
                p.grad.copy_(part.view_as(p))  # type: ignore[union-attr]  # rounded to p.dtype
        diag["accepted"] = True
        return diag

    def _reject(self, reason: str) -> dict[str, Any]:
        self.diagnostics["rejected"] += 1
        self.diagnostics["rejected_reason"] = reason
        self.state.pop("x0", None)
        warn_at_caller(
            f"CurvaturePreconditioner: step {self.state['step']}: {reason}; .grad was left as "
            "the loop computed it",
            NonFiniteStepWarning,
        )
        return self.diagnostics

    def state_dict(self) -> dict[str, Any]:
        """The step count, the warm start, the damping and the generator's state."""
        out = {**self.state, "damping": self.damping}
        if self.generator is not None:
            out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        state = dict(state)
        self.damping = state.pop("damping", self.damping)
        gen_state = state.pop("generator_state", None)
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        self.state = state
