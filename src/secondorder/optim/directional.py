r"""Directionally damped Newton steps along chosen GGN eigendirections (ViViT).

For every param group :math:`g` the GGN block :math:`G_g = V_g V_g^\top` is diagonalised
through its Gram matrix (:class:`~secondorder.curvature.lowrank.LowRankGGN`); the group's
``criterion`` picks eigenpairs :math:`(\lambda_k, e_k)`, its ``damping`` gives a damping
:math:`\delta_k` per direction, and the step is

.. math::
    s_g = \sum_k \frac{-\gamma_k}{\lambda_k + \delta_k}\, e_k, \qquad
    \theta_g \leftarrow \theta_g + \mathrm{lr}_g\, s_g,

with :math:`\gamma_k = \frac1N \sum_n \gamma_{nk} = \nabla L^\top e_k` and
:math:`\lambda_k = \frac1N \sum_n \lambda_{nk}` the batch means of the per-sample directional
derivatives. Outside the chosen directions the parameters do not move. The damping callable sees
the per-sample :math:`\gamma_{nk}, \lambda_{nk}`, so it can adapt to their noise.

References:
    Dangel, Tatzel, Hennig. ViViT: Curvature access through the generalized Gauss-Newton's
    low-rank structure. TMLR 2022. https://arxiv.org/abs/2106.02624
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._checks import LIKELIHOOD_LOSSES, check_choice, check_positive
from ..curvature.losses import supports_likelihood
from ..curvature.lowrank import LowRankGGN
from ..curvature.model import Batch
from ..curvature.vocabulary import EIGENSOLVERS, NON_GRAPH_ENGINES, canonical_engine
from .adaptive import Trial, adaptive_direction
from .base import CurvatureOptimizer
from .directional_rules import (
    ConstantDamping,
    Criterion,
    Damping,
    TopK,
    _as_damping,
    _decode_group,
    _encode_group,
    constant_damping,
    top_k,
)

__all__ = ["ConstantDamping", "DirectionalDampedNewton", "TopK", "constant_damping", "top_k"]

_DIAGNOSTICS = ("indices", "evals", "gammas", "lambdas", "dampings", "num_dropped", "eigensolver")


def _gather_batches(batches: list[Batch], group: Any) -> list[Batch]:
    """Every rank's batches, in rank order (the global batch), on this rank's device.

    The directional step needs the eigenpairs of the Gram matrix of the *global* batch, which
    couples samples across ranks; the batches (inputs and targets, small beside the model's
    work) are gathered instead, so every rank computes the identical step.
    """
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    cpu = [Batch(tuple(_to_cpu(x) for x in b.inputs), _to_cpu(b.targets)) for b in batches]
    torch.distributed.all_gather_object(gathered, cpu, group=group)
    device = next((x.device for b in batches for x in b.inputs if isinstance(x, Tensor)), None)
    return [
        Batch(tuple(_to(x, device) for x in b.inputs), _to(b.targets, device))
        for rank_batches in gathered
        for b in rank_batches
    ]


def _to_cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, Tensor) else x


def _to(x: Any, device: Any) -> Any:
    return x.to(device) if isinstance(x, Tensor) and device is not None else x


class DirectionalDampedNewton(CurvatureOptimizer):
    r"""Newton steps along chosen GGN eigendirections, damped per direction (ViViT).

    See the module docstring for the step. Each param group carries

    - ``criterion(evals) -> indices``: ``evals`` are the group's Gram eigenvalues in ascending
      order, shape ``(D,)``; it returns positions into them (a sequence of ints or a 1-D
      integer tensor, distinct, in range). A criterion that only looks at the largest
      eigenvalues declares how many with an int attribute ``num_leading = m`` (as
      :class:`TopK` does): it then receives only the ``min(m, D)`` largest, ascending, its
      positions refer to those, and only those eigenpairs are computed (by block Krylov
      iteration where that is cheaper than a full eigendecomposition). Without it, the full
      spectrum is computed. ``diagnostics["indices"]`` holds positions in the full spectrum
      either way. Eigenvalues that are numerically zero
      (:meth:`~secondorder.curvature.lowrank.LowRankGGN.tolerance`) have no GGN eigenvector and
      are dropped (counted in ``diagnostics["num_dropped"]``).
    - ``damping(evals, evecs, gammas, lambdas) -> deltas``: with the chosen eigenvalues
      ``(K,)``, their Gram eigenvectors ``(D, K)`` and the per-sample directional gradients
      and curvatures ``(N, K)`` (normalised so that their means are :math:`\gamma_k` and
      :math:`\lambda_k`, see :mod:`secondorder.curvature.lowrank`), it returns a tensor of
      shape ``(K,)``. A number means :func:`constant_damping`.

    A step with a non-finite damping or a denominator :math:`\lambda_k + \delta_k \le 0` is
    rejected (the parameters stay, ``diagnostics["rejected_reason"]`` says why).

    Args:
        model: The model to train (any ``nn.Module``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``, no weights): the GGN's low-rank factor needs a likelihood.
        lr: Step size (default: 1).
        criterion: Default criterion of the groups (default: ``top_k(10)``).
        damping: Default damping of the groups, a callable or a number (default: 1.0).
        params: Parameters or param-group dicts; groups may set ``lr``, ``criterion`` and
            ``damping``. Each group gets its own GGN block (cross-group curvature is ignored).
        mc_samples: 0 for the exact GGN, else the number of targets sampled per sample for a
            Monte-Carlo factor (the Gram matrix then has size :math:`N M`).
        generator: Random generator for ``mc_samples > 0`` (default: seeded with 0; its state
            is saved in ``state_dict``).
        on_nonfinite: ``"skip"`` (reject the step and warn) or ``"raise"``.
        engine: ``"auto"``, ``"kron"`` or ``"autograd"``
            (see :class:`~secondorder.curvature.lowrank.LowRankGGN`).
        eigensolver: ``"auto"`` (block Krylov for criteria with ``num_leading`` where it pays
            off), ``"torch"`` (always a full ``torch.linalg.eigh``) or ``"lapack"`` (see
            :class:`~secondorder.curvature.lowrank.LowRankGGN`).
        process_group: ``torch.distributed`` group (``None``: one process). The Gram matrix
            couples all samples of the global batch, so each step gathers the ranks' batches
            (inputs and targets) and every rank computes the same step on the global batch:
            correct and identical across ranks, but not split across them. With
            ``mc_samples > 0`` give every rank the same generator seed (the default does), so
            all ranks draw the same targets for the global batch.
        weight_decay: Decoupled weight decay per param group (default 0; see
            :class:`~secondorder.optim.base.CurvatureOptimizer`).
        max_grad_norm: Clip each param group's gradient to this norm before the direction
            is computed (default ``None``: no clipping).
        momentum: Heavy-ball momentum on the step, per param group (default 0).
        adapt_damping: Levenberg-Marquardt on a scale :math:`\kappa \ge 1` of every
            :math:`\delta_k`, with step acceptance (:mod:`~secondorder.optim.adaptive`; the model
            change :math:`-\tfrac12\sum_k \gamma_k^2/(\lambda_k + \kappa\delta_k)` is exact in the
            subspace). Default True; the seed's constant damping is ``adapt_damping=False``.
        damping_retries: Solves after a rejected trial before the step is skipped (default 3).

    Raises:
        ValueError: For invalid hyperparameters or a loss without a likelihood.
        TypeError: For a criterion or damping that is not callable.

    Example:
        >>> import torch, secondorder as so
        >>> from secondorder.optim.directional import DirectionalDampedNewton, top_k
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2))
        >>> opt = DirectionalDampedNewton(model, torch.nn.MSELoss(), criterion=top_k(3))
        >>> X, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> loss = opt.step(X, y)
        >>> len(opt.diagnostics["evals"][0])
        3
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        *,
        criterion: Criterion | None = None,
        damping: Damping | float = 1.0,
        params: Any = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        on_nonfinite: str = "skip",
        engine: str = "auto",
        eigensolver: str = "auto",
        process_group: Any = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        momentum: float = 0.0,
        adapt_damping: bool = True,
        damping_retries: int = 3,
    ) -> None:
        check_positive("lr", lr)
        check_positive("mc_samples", mc_samples, allow_zero=True, integer=True)
        check_positive("damping_retries", damping_retries, allow_zero=True, integer=True)
        engine = canonical_engine(engine, NON_GRAPH_ENGINES)
        check_choice("eigensolver", eigensolver, EIGENSOLVERS)
        if not supports_likelihood(loss_fn):
            raise ValueError(
                "DirectionalDampedNewton needs a loss with a likelihood: "
                f"{LIKELIHOOD_LOSSES}; got {loss_fn!r}"
            )
        defaults = dict(
            lr=lr,
            criterion=top_k(10) if criterion is None else criterion,
            damping=_as_damping(damping, "damping"),
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
        for i, group in enumerate(self.param_groups):
            try:
                self._check_group(group)
            except TypeError as err:
                raise TypeError(f"param group {i}: {err}") from None
        self.mc_samples = mc_samples
        self.engine = engine
        self.eigensolver = eigensolver
        self.generator = generator
        self.adapt_damping = bool(adapt_damping)
        self.damping_retries = damping_retries
        if mc_samples > 0 and generator is None:
            self.generator = torch.Generator(device=self.fmodel.device).manual_seed(0)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check ``lr``, ``criterion`` and ``damping``; a number as damping becomes a callable."""
        check_positive("lr", group["lr"])
        if not callable(group["criterion"]):
            raise TypeError(
                "criterion must be a callable evals -> indices, got "
                f"{type(group['criterion']).__name__}"
            )
        group["damping"] = _as_damping(group["damping"], "damping")

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The state with plain data only (``torch.load(weights_only=True)`` reads it).

        :class:`TopK` and :class:`ConstantDamping` are stored as ``{"top_k": k}`` and
        ``{"constant_damping": delta}``; any other callable as ``{"callable": repr(obj)}``,
        which :meth:`load_state_dict` replaces by the loading optimizer's own callable.

        Returns:
            The state dict.
        """
        out = super().state_dict()
        out["param_groups"] = [_encode_group(g) for g in out["param_groups"]]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (see there for how callables are stored).

        Args:
            state_dict: The state.

        Raises:
            ValueError: See :meth:`~secondorder.optim.base.CurvatureOptimizer.load_state_dict`.
        """
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            groups = state_dict["param_groups"]
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [
                _decode_group(g, self.param_groups[i] if i < len(self.param_groups) else None)
                for i, g in enumerate(groups)
            ]
        super().load_state_dict(state_dict)

    # -------------------------------------------------------------------- step
    @staticmethod
    def _check_indices(raw: Any, D: int, group: int) -> list[int]:
        where = f"param group {group}: criterion"
        if isinstance(raw, Tensor):
            if raw.ndim != 1 or raw.dtype.is_floating_point or raw.dtype.is_complex:
                raise ValueError(
                    f"{where} must return a 1-D integer tensor or a sequence of ints, got a "
                    f"tensor of dtype {raw.dtype} and shape {tuple(raw.shape)}"
                )
            indices = [int(i) for i in raw.tolist()]
        else:
            try:
                items = list(raw)
            except TypeError:
                raise ValueError(
                    f"{where} must return a sequence of ints, got {type(raw).__name__}"
                ) from None
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                got = sorted({type(i).__name__ for i in items})
                raise ValueError(f"{where} must return ints, got elements of type {got}")
            indices = [int(i) for i in items]
        bad = [i for i in indices if not 0 <= i < D]
        if bad:
            raise ValueError(f"{where} returned indices {bad} outside [0, {D}) (D eigenvalues)")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{where} returned repeated indices: {indices}")
        return indices

    def _chosen_pairs(
        self, lowrank: LowRankGGN, group: dict[str, Any], gi: int
    ) -> tuple[Tensor, Tensor, list[int]]:
        r"""The group's chosen eigenpairs above the tolerance, and their positions.

        Returns :math:`\lambda` ``(K,)``, ``U`` ``(D, K)`` and the positions in the full
        ascending spectrum. A criterion with ``num_leading = m`` sees the ``m`` leading eigenvalues
        (:meth:`~secondorder.curvature.lowrank.LowRankGGN.leading_eigh`), any other the full
        spectrum. Numerically zero eigenvalues are dropped and counted.
        """
        params = [p for p in group["params"] if p.requires_grad]
        criterion = group["criterion"]
        D = lowrank.num_columns
        m = getattr(criterion, "num_leading", None)
        if isinstance(m, int) and not isinstance(m, bool) and m >= 1:
            evals, evecs = lowrank.leading_eigh(m, params)
        else:
            evals, evecs = lowrank.eigvalsh(params), None
        chosen = self._check_indices(criterion(evals), evals.numel(), gi)
        tol = lowrank.tolerance(params)
        values = evals.tolist()
        keep = [i for i in chosen if values[i] > tol]
        self.diagnostics["num_dropped"].append(len(chosen) - len(keep))
        offset = D - evals.numel()
        positions = [offset + i for i in keep]
        if evecs is None:
            return evals[keep], lowrank.gram_eigenvectors(positions, params), positions
        return evals[keep], evecs[:, keep], positions

    def _compute_direction(self, batches: list[Batch], **kw: Any) -> tuple[Tensor, Tensor | None]:
        if self.process_group is not None:
            batches = _gather_batches(batches, self.process_group)
        lowrank = LowRankGGN(
            self.model,
            self.loss_fn,
            batches,
            params=self.fmodel.params,
            mc_samples=self.mc_samples,
            generator=self.generator,
            engine=self.engine,
            eigensolver=self.eigensolver,
        )
        loss, grad = lowrank.loss, lowrank.gradient()
        if not self._check_loss_and_gradient(loss, grad):
            return loss, None
        diag = self.diagnostics
        for key in _DIAGNOSTICS:
            diag[key] = []
        pieces = []  # per group: (index, slices, params, U, lam, gamma, lambda, delta)
        for gi, (group, slices) in enumerate(zip(self.param_groups, self._group_slices)):
            params = [p for p in group["params"] if p.requires_grad]
            if not params:  # every parameter of the group is frozen
                for key in _DIAGNOSTICS:
                    diag[key].append([])
                continue
            try:
                lam, U, positions = self._chosen_pairs(lowrank, group, gi)
            except (FloatingPointError, torch.linalg.LinAlgError) as err:
                self._reject(f"param group {gi}: {err}")
                return loss, None
            diag["eigensolver"].append(lowrank.eigensolver_used(params))
            diag["indices"].append(positions)
            if not positions:
                for key in ("evals", "gammas", "lambdas", "dampings"):
                    diag[key].append([])
                continue
            gammas, lambdas = lowrank.derivatives_of_pairs(lam, U, params)
            delta = group["damping"](lam, U, gammas, lambdas)
            if not isinstance(delta, Tensor) or delta.shape != lam.shape:
                got = tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
                raise ValueError(
                    f"param group {gi}: damping must return a tensor of shape "
                    f"({len(positions)},), got {got}"
                )
            delta = delta.detach().to(device=lam.device, dtype=lam.dtype)
            gamma_k, lambda_k = gammas.mean(0), lambdas.mean(0)
            diag["evals"].append(lam.tolist())
            diag["gammas"].append(gamma_k.tolist())
            diag["lambdas"].append(lambda_k.tolist())
            diag["dampings"].append(delta.tolist())
            if not bool(torch.isfinite(delta).all()):
                self._reject(f"param group {gi}: the damping is not finite")
                return loss, None
            if bool((lambda_k + delta <= 0).any()):
                bad = [i for i, d in zip(positions, (lambda_k + delta).tolist()) if d <= 0]
                self._reject(
                    f"param group {gi}: lambda_k + delta_k <= 0 for eigenvalues {bad} (the step "
                    "would be infinite or point uphill)"
                )
                return loss, None
            pieces.append((gi, slices, params, U, lam, gamma_k, lambda_k, delta))

        def solve(kappa: float) -> Trial:
            r"""Steps :math:`-\gamma_k / (\lambda_k + \kappa\delta_k)` along each direction."""
            fm = self.fmodel
            direction = torch.zeros(fm.dim, dtype=fm.dtype, device=fm.device)
            # along e_k the step lr * c_k, c_k = -gamma_k / denom_k, changes the model by
            # (lr^2 / 2 - lr) gamma_k^2 / denom_k (the groups' subspaces are orthogonal)
            weights: list[tuple[dict[str, Any], float]] = []
            for gi, slices, params, U, lam, gamma_k, lambda_k, delta in pieces:
                denom = lambda_k + delta * kappa
                coeffs = U @ (
                    -gamma_k / (denom * lam.sqrt())
                )  # s = V (sum_k c_k u_k / sqrt(lam_k))
                step = lowrank.factor_matmul(coeffs, params)
                for (a, b), part in zip(slices, step.split([b - a for a, b in slices])):
                    direction[a:b] = part
                weights.append((self.param_groups[gi], float((gamma_k**2 / denom).sum())))

            def predict() -> float:
                return sum((0.5 * g["lr"] ** 2 - g["lr"]) * w for g, w in weights)

            return Trial(direction, -0.5 * sum(w for _, w in weights), predict=predict)

        return loss, adaptive_direction(self, loss, grad, batches, solve)
