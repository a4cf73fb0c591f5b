r"""Curvature spectra of a trained model: top eigenvalues, trace and density, per layer.

For a model, a loss and one fixed evaluation batch, :func:`curvature_spectra` builds the
Hessian and the GGN (:class:`~secondorder.Hessian`, :class:`~secondorder.GGN`) of the whole
model and of each layer -- the operator restricted to that layer's parameters (``params=``),
i.e. the diagonal block :math:`\partial^2 L / \partial\theta_\ell^2` of the full matrix -- and
reports

* the ``k`` largest (algebraic) eigenvalues by thick-restart Lanczos (:func:`~secondorder.
  lanczos`), with whether they converged within the product budget;
* the trace by Hutch++ (:func:`~secondorder.hutchpp_trace`);
* the spectral density by stochastic Lanczos quadrature (:func:`~secondorder.
  spectral_density`), on a grid of 200 points.

Every random vector comes from a ``torch.Generator`` seeded per operator, so the numbers
are reproducible. :func:`plot_spectra` draws the densities of several model states (e.g.
at the start and after training with two optimizers) in one panel per layer and operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import GGN, Hessian, hutchpp_trace, lanczos, spectral_density
from .report_figures import draw_curves, plot_panels

__all__ = ["SpectraConfig", "curvature_spectra", "layer_groups", "plot_spectra"]

OPERATORS: Mapping[str, Any] = {"Hessian": Hessian, "GGN": GGN}


@dataclass(frozen=True)
class SpectraConfig:
    """Budgets of :func:`curvature_spectra`.

    Attributes:
        top_k: Eigenvalues per operator.
        lanczos_maxiter: Products Lanczos may use.
        lanczos_tol: Relative tolerance on the Ritz residuals.
        trace_matvecs: Products of Hutch++ (>= 3).
        slq_probes: Probe vectors of the density.
        slq_steps: Lanczos steps per probe.
    """

    top_k: int = 3
    lanczos_maxiter: int = 40
    lanczos_tol: float = 1e-2
    trace_matvecs: int = 24
    slq_probes: int = 2
    slq_steps: int = 24


def layer_groups(model: nn.Module, group_of: Callable[[str], str]) -> dict[str, list[Tensor]]:
    """Group the trainable parameters by layer.

    Args:
        model: The model.
        group_of: Maps a parameter's name to its layer's name.

    Returns:
        Layer name -> its parameters, in the order of ``named_parameters``.
    """
    groups: dict[str, list[Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(name), []).append(p)
    return groups


def _one(
    operator: Any,
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[Tensor, Tensor],
    params: list[Tensor] | None,
    config: SpectraConfig,
    seed: int,
) -> dict[str, Any]:
    A = operator(model, loss_fn, batch, params=params)
    n = A.shape[0]
    k = min(config.top_k, n)
    evals, _, info = lanczos(
        A,
        k,
        "largest",
        tol=config.lanczos_tol,
        maxiter=max(config.lanczos_maxiter, k + 1),
        generator=torch.Generator(device=A.device).manual_seed(seed),
        return_info=True,
    )
    trace = hutchpp_trace(
        A,
        max(3, min(config.trace_matvecs, 3 * n)),  # 3n: an exact sketch of the range
        generator=torch.Generator(device=A.device).manual_seed(seed + 1),
    )
    grid, density = spectral_density(
        A,
        num_probes=config.slq_probes,
        num_steps=min(config.slq_steps, n),
        generator=torch.Generator(device=A.device).manual_seed(seed + 2),
        num_points=200,
    )
    return {
        "dim": n,
        "top_eigenvalues": sorted((float(e) for e in evals), reverse=True),
        "lanczos_converged": bool(info.converged),
        "lanczos_matvecs": int(info.num_matvecs),
        "trace": float(trace),
        "density": {"grid": grid.tolist(), "density": density.tolist()},
    }


def curvature_spectra(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[Tensor, Tensor],
    group_of: Callable[[str], str],
    config: SpectraConfig,
    *,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Top eigenvalues, trace and spectral density of the Hessian and the GGN, per layer.

    Args:
        model: The model (evaluated in its current mode; use one without dropout).
        loss_fn: The loss.
        batch: The fixed evaluation batch ``(inputs, targets)``.
        group_of: Maps a parameter's name to its layer's name (:func:`layer_groups`).
        config: The budgets.
        seed: Seed of the random start and probe vectors.

    Returns:
        ``{"model" or layer name: {"Hessian" | "GGN": {"dim", "top_eigenvalues"
        (descending), "lanczos_converged", "lanczos_matvecs", "trace", "density":
        {"grid", "density"}}}}``.
    """
    groups: dict[str, list[Tensor] | None] = {"model": None}
    groups.update(layer_groups(model, group_of))
    out: dict[str, dict[str, Any]] = {}
    for i, (name, params) in enumerate(groups.items()):
        out[name] = {
            op_name: _one(op, model, loss_fn, batch, params, config, seed + 10 * i)
            for op_name, op in OPERATORS.items()
        }
    return out


def plot_spectra(
    states: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Any, *, title: str
) -> Any:
    """Plot the spectral densities of several model states, one panel per layer and operator.

    Args:
        states: State name (e.g. ``"start"``) -> result of :func:`curvature_spectra`.
        path: Destination PNG file.
        title: Title of the figure.

    Returns:
        The path written.
    """
    first = next(iter(states.values()))
    panels = []
    for layer in first:
        for op_name in OPERATORS:

            def draw(ax: Any, layer: str = layer, op_name: str = op_name) -> None:
                curves = {}
                for state, spectra in states.items():
                    d = spectra[layer][op_name]["density"]
                    floor = [max(v, 1e-6) if math.isfinite(v) else math.nan for v in d["density"]]
                    curves[state] = (d["grid"], floor)
                draw_curves(
                    ax,
                    curves,
                    xlabel="eigenvalue",
                    ylabel="density",
                    title=f"{op_name}, {layer}",
                    logy=True,
                )
                ax.legend(fontsize=7)

            panels.append(draw)
    return plot_panels(panels, path, ncols=2, panel_size=(5.0, 3.2), suptitle=title)
