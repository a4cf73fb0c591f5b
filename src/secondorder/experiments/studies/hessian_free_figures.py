"""Seed 003's figures: paths over the Rosenbrock contours and per-step curves of the variants."""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

import numpy as np

from .hessian_free_problems import OPTIMUM, START

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["draw_paths", "draw_variants", "positive"]


# --------------------------------------------------------------------------------- figures
def _rosenbrock_value(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return (1.0 - x0) ** 2 + 100.0 * (x1 - x0**2) ** 2


def draw_paths(ax: Axes, paths: dict[str, list[list[float]]]) -> None:
    """Draw the Rosenbrock paths ``label -> [[x0, x1], ...]`` over log-spaced contours."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import LogLocator

    pts = np.array([p for path in paths.values() for p in path])
    lo = np.minimum(pts.min(axis=0), [-1.5, -0.5]) - 0.25
    hi = np.maximum(pts.max(axis=0), [1.5, 3.5]) + 0.25
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 400))
    values = _rosenbrock_value(g0, g1)
    top = math.ceil(math.log10(values.max()))
    levels = np.logspace(-3, top, 4 * (top + 3) + 1)  # four levels per decade
    clipped = np.clip(values, levels[0], None)
    filled = ax.contourf(g0, g1, clipped, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55)
    ax.contour(g0, g1, clipped, levels=levels[::4], norm=LogNorm(), colors="0.35", linewidths=0.5)
    bar = ax.figure.colorbar(filled, ax=ax, ticks=LogLocator(base=10.0))
    bar.set_label("f(x), log-spaced contour levels")
    markers = ["o", "s", "^", "v", "D", "P"]
    for (label, path), marker in zip(paths.items(), markers):
        xy = np.array(path)
        ax.plot(
            xy[:, 0],
            xy[:, 1],
            marker=marker,
            ms=3.5,
            lw=1.3,
            label=label,
        )
    ax.plot(*START, marker="*", color="black", ms=15, ls="none", label="start (-1, 3), f = 404")
    ax.plot(*OPTIMUM, marker="*", color="red", ms=16, ls="none", label="optimum (1, 1), f = 0")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("$x_0$")
    ax.set_ylabel("$x_1$")
    ax.set_title("Hessian-free on the Rosenbrock function from (-1, 3)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)


def positive(values: list[float]) -> list[float]:
    """Zeros (exact optima) cannot be drawn on a log axis: show them as NaN (left out)."""
    return [v if v > 0 else math.nan for v in values]


_STYLES = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]


def draw_variants(
    ax: Axes,
    curves: dict[str, list[float]],
    *,
    ylabel: str,
    title: str,
    logy: bool = False,
    integer: bool = False,
    first_step: int = 1,
    target: float | None = None,
) -> None:
    """Plot one curve per variant against the step; the default thick and on top.

    Variants whose curve equals the default's exactly are not drawn but named in the legend,
    so that no line hides another.
    """
    from matplotlib.ticker import MaxNLocator

    default = curves["default"]
    steps = list(range(first_step, first_step + len(default)))
    same = [name for name, v in curves.items() if name != "default" and v == default]
    others = [name for name in curves if name != "default" and name not in same]
    for i, name in enumerate(others):
        ax.plot(
            steps,
            curves[name],
            ls=_STYLES[i % len(_STYLES)],
            lw=1.5,
            color=f"C{i + 1}",
            label=name,
            drawstyle="steps-mid" if integer else "default",
        )
    label = "default"
    if same:
        label += "\n" + textwrap.fill("= " + ", ".join(same), width=34, subsequent_indent="   ")
    ax.plot(
        steps,
        default,
        color="black",
        lw=2.4,
        alpha=0.8,
        label=label,
        zorder=5,
        drawstyle="steps-mid" if integer else "default",
    )
    if target is not None:
        ax.axhline(target, color="0.4", lw=0.8, ls=":", label=f"f = {target:g}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max(max(v) for v in curves.values())
        ax.set_ylim(0, top + max(1, 0.08 * top))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
