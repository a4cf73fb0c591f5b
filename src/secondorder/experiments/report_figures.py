"""PNG figures of experiment runs: curves, decision boundaries, panels.

Drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend (no ``pyplot`` state,
no display needed). :func:`draw_curves` and :func:`draw_decision_boundary` draw on a given
``Axes`` and compose into panels (:func:`plot_panels`). Every figure is written atomically
(:func:`~.report_files.write_atomically`); ``matplotlib`` is imported only when a figure is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .report_files import to_jsonable, write_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Curve",
    "draw_curves",
    "draw_decision_boundary",
    "plot_curves",
    "plot_decision_boundary",
    "plot_panels",
    "save_figure",
]

Curve = Sequence[float] | Tensor | np.ndarray | tuple[Sequence[float], Sequence[float]]


# --------------------------------------------------------------------------------- figures
def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a figure as PNG, creating the parent directories.

    Args:
        fig: The figure.
        path: Destination file, written atomically (:func:`write_atomically`).
        dpi: Resolution.

    Returns:
        The path written.
    """
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _as_xy(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    # to_jsonable turns tensors into lists and non-finite values into None, which NumPy reads
    # back as NaN with dtype=float; NaN points are left out of the plotted line.
    if isinstance(curve, tuple) and len(curve) == 2:
        x = np.asarray(to_jsonable(curve[0]), dtype=float)
        y = np.asarray(to_jsonable(curve[1]), dtype=float)
    else:
        y = np.asarray(to_jsonable(curve), dtype=float)
        x = np.arange(len(y), dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"a curve must be 1-D values or an (x, y) pair of equal lengths, got shapes "
            f"{x.shape} and {y.shape}"
        )
    return x, y


def draw_curves(
    ax: Axes,
    curves: Mapping[str, Curve],
    *,
    xlabel: str = "iteration",
    ylabel: str = "loss",
    title: str | None = None,
    logy: bool = False,
    logx: bool = False,
) -> None:
    """Draw labeled curves with a legend on an ``Axes``.

    Args:
        ax: The axes to draw on.
        curves: Label to values (plotted against 0, 1, 2, ...) or to an ``(x, y)`` pair.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        title: Title of the axes.
        logy: Whether the y axis is logarithmic.
        logx: Whether the x axis is logarithmic.

    Raises:
        ValueError: If a curve is not 1-D or its ``x`` and ``y`` lengths differ.
    """
    for label, curve in curves.items():
        x, y = _as_xy(curve)
        ax.plot(x, y, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    if curves:
        ax.legend()
    ax.grid(True, alpha=0.3)


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    xlabel: str = "iteration",
    ylabel: str = "loss",
    title: str | None = None,
    logy: bool = False,
    logx: bool = False,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Path:
    """Plot labeled curves (e.g. loss per iteration of several optimizers) to a PNG file.

    Args:
        curves: Label to values (plotted against 0, 1, 2, ...) or to an ``(x, y)`` pair.
        path: Destination PNG file.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        title: Title of the figure.
        logy: Whether the y axis is logarithmic.
        logx: Whether the x axis is logarithmic.
        figsize: Figure size in inches.

    Returns:
        The path written.

    Raises:
        ValueError: If a curve is not 1-D or its ``x`` and ``y`` lengths differ.
    """
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    draw_curves(ax, curves, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy, logx=logx)
    return save_figure(fig, path)


def draw_decision_boundary(
    ax: Axes,
    predict: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    resolution: int = 200,
    margin: float = 0.1,
    title: str | None = None,
    xlabel: str = "x1",
    ylabel: str = "x2",
    cmap: str = "jet",
) -> None:
    """Draw the decision regions of a 2-D classifier and its data on an ``Axes``.

    Args:
        ax: The axes to draw on.
        predict: Maps a float32 CPU tensor of points ``(M, 2)`` to labels ``(M,)`` or scores
            ``(M, C)`` (reduced by argmax); called under ``torch.no_grad()``.
        x: Data points ``(N, 2)``.
        y: Their labels ``(N,)``.
        resolution: Grid points per axis.
        margin: Margin around the data, in data units.
        title: Title of the axes.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        cmap: Matplotlib colormap name.

    Raises:
        ValueError: If ``x`` is not of shape ``(N, 2)`` or ``predict`` returns a wrong shape.
    """
    points = x.detach().cpu().double()
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {tuple(x.shape)}")
    labels = y.detach().cpu().numpy()
    lo = points.min(dim=0).values - margin
    hi = points.max(dim=0).values + margin
    g0 = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    xx, yy = torch.meshgrid(g0, g1, indexing="xy")
    grid = torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1)
    with torch.no_grad():
        out = predict(grid).detach().cpu()
    if out.ndim == 2:
        out = out.argmax(dim=1)
    if out.shape != (grid.shape[0],):
        raise ValueError(
            f"predict must return labels ({grid.shape[0]},) or scores ({grid.shape[0]}, C), "
            f"got shape {tuple(out.shape)}"
        )
    zz = out.reshape(xx.shape).numpy()
    vmin = float(min(zz.min(), labels.min()))
    vmax = float(max(zz.max(), labels.max()))
    ax.contourf(xx.numpy(), yy.numpy(), zz, alpha=0.6, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.scatter(
        points[:, 0].numpy(),
        points[:, 1].numpy(),
        c=labels,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        edgecolors="k",
        linewidths=0.5,
        s=15,
    )
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def plot_decision_boundary(
    predict: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    path: str | Path,
    *,
    resolution: int = 200,
    title: str | None = "Decision boundaries",
    figsize: tuple[float, float] = (5.0, 5.0),
) -> Path:
    """Plot the decision regions of a 2-D classifier and its data to a PNG file.

    Args:
        predict: Maps a float32 CPU tensor of points ``(M, 2)`` to labels ``(M,)`` or scores
            ``(M, C)``; see :func:`draw_decision_boundary`.
        x: Data points ``(N, 2)``.
        y: Their labels ``(N,)``.
        path: Destination PNG file.
        resolution: Grid points per axis.
        title: Title of the figure.
        figsize: Figure size in inches.

    Returns:
        The path written.

    Raises:
        ValueError: If ``x`` is not of shape ``(N, 2)`` or ``predict`` returns a wrong shape.
    """
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    draw_decision_boundary(ax, predict, x, y, resolution=resolution, title=title)
    return save_figure(fig, path)


def plot_panels(
    panels: Sequence[Callable[[Axes], object]],
    path: str | Path,
    *,
    ncols: int = 3,
    panel_size: tuple[float, float] = (4.0, 3.0),
    suptitle: str | None = None,
) -> Path:
    """Draw several panels in a grid and save them as one PNG file.

    Each panel is a callable that draws on the ``Axes`` it receives, e.g.
    ``functools.partial(draw_curves, curves={"GN": losses}, logy=True)``.

    Args:
        panels: One drawing function per panel, filled row by row.
        path: Destination PNG file.
        ncols: Maximum number of columns.
        panel_size: Size of one panel in inches.
        suptitle: Title of the whole figure.

    Returns:
        The path written.

    Raises:
        ValueError: If there are no panels or ``ncols`` is not positive.
    """
    if not panels:
        raise ValueError("plot_panels needs at least one panel, got none")
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    cols = min(ncols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure((panel_size[0] * cols, panel_size[1] * rows))
    for i, draw in enumerate(panels):
        draw(fig.add_subplot(rows, cols, i + 1))
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)
