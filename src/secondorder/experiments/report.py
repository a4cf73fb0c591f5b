"""Reports of experiment runs: ``results.json``, ``summary.md``, PNG figures, progress bars.

* :func:`to_jsonable` / :func:`write_json` -- JSON that always parses: tensors and NumPy values
  become numbers and lists, non-finite floats (NaN, ±inf) become ``null``.
* :class:`RunRecorder` -- one run's output directory, wall clock, config and seed; writes
  ``results.json`` with library versions (:func:`environment_info`) and ``summary.md``.
* :func:`markdown_table` -- a markdown table from a list of dicts.
* :func:`plot_curves`, :func:`plot_decision_boundary`, :func:`plot_panels` -- PNG figures,
  drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend (no ``pyplot``
  state, no display needed). :func:`draw_curves` and :func:`draw_decision_boundary` draw on a
  given ``Axes`` and compose into panels.
* :func:`progress` -- a ``tqdm`` bar on stderr that is off unless stderr is a terminal.

Every file is written atomically (:func:`write_atomically`): into a temporary file in the same
directory, then renamed over the destination with ``os.replace``, so a reader (or a run that
fails half-way) never sees a half-written ``results.json``, ``summary.md`` or figure.

``matplotlib`` and ``tqdm`` are imported only when a figure or a bar is made.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "RunRecorder",
    "draw_curves",
    "draw_decision_boundary",
    "environment_info",
    "markdown_table",
    "plot_curves",
    "plot_decision_boundary",
    "plot_panels",
    "progress",
    "save_figure",
    "to_jsonable",
    "write_atomically",
    "write_json",
    "write_markdown",
]

T = TypeVar("T")

Curve = Sequence[float] | Tensor | np.ndarray | tuple[Sequence[float], Sequence[float]]


# ------------------------------------------------------------------------------------ JSON
def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON types.

    Tensors and NumPy arrays become (nested) lists, or numbers when they have 0 dimensions;
    NumPy scalars become Python numbers; non-finite floats (NaN, ``inf``, ``-inf``) become
    ``None`` (JSON ``null``); tuples and sets become lists; mapping keys become strings;
    dataclasses become dicts; ``Path``, ``torch.dtype`` and ``torch.device`` become strings;
    enums become their value.

    Args:
        obj: The object to convert.

    Returns:
        An object made of ``dict``, ``list``, ``str``, ``int``, ``float`` (finite), ``bool``
        and ``None`` only.

    Raises:
        TypeError: If ``obj`` contains a value of another type; the message gives its
            location, e.g. ``results['curves'][3]``.
    """
    return _jsonable(obj, "obj")


def _jsonable(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value, where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where}: cannot convert a value of type {type(obj).__name__} to JSON; expected "
        "numbers, strings, tensors, arrays, lists or dicts"
    )


def _file_mode() -> int:
    """The mode of a new file under the process's umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace ``path`` atomically: ``write`` fills a temporary file, then a rename.

    The temporary file lies in ``path``'s directory (so ``os.replace`` is one atomic rename on
    the same file system) and is removed if ``write`` raises; ``path`` then keeps its old
    content, or does not exist.

    Args:
        path: Destination file; its parent directories are created.
        write: Called with the temporary file's path; writes the whole content there.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, strictly valid JSON (see :func:`to_jsonable`).

    Args:
        path: Destination file, written atomically (:func:`write_atomically`); its parent
            directories are created.
        obj: The object to write.

    Returns:
        The path written.

    Raises:
        TypeError: If ``obj`` holds a value :func:`to_jsonable` cannot convert (then no file
            is written).
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def environment_info() -> dict[str, Any]:
    """Describe the software and hardware a run used.

    Returns:
        Versions of Python, torch, numpy and secondorder, the platform, torch's thread count
        and CUDA availability (with the device name when available).
    """
    from secondorder import __version__

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "secondorder": __version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


# -------------------------------------------------------------------------------- markdown
def _format_cell(value: Any, spec: str) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = format(value, spec) if math.isfinite(value) else str(value)
    elif isinstance(value, int) and spec and spec[-1] in "eEfFgG%":
        text = format(value, spec)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    floatfmt: str = ".4g",
    formats: Mapping[str, str] | None = None,
) -> str:
    """Format a list of dicts as a GitHub-flavoured markdown table.

    Floats are formatted with ``floatfmt`` (or the column's entry of ``formats``), missing
    values and ``None`` are left empty, booleans print as yes/no, and ``|`` is escaped.
    Columns whose values are all numbers are right-aligned.

    Args:
        rows: One mapping per row.
        columns: Column keys, in order; default: every key, in order of first appearance.
        floatfmt: Format spec for floats, e.g. ``".4g"`` or ``".2e"``.
        formats: Per-column format specs overriding ``floatfmt`` (also applied to ints).

    Returns:
        The table, ending with a newline.

    Raises:
        ValueError: If there are no columns to show.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("markdown_table needs at least one column, got none")
    formats = formats or {}
    body = [
        [_format_cell(row.get(col), formats.get(col, floatfmt)) for col in columns] for row in rows
    ]

    def numeric(col: str) -> bool:
        values = [row.get(col) for row in rows if row.get(col) is not None]
        return bool(values) and all(
            isinstance(v, (int, float, np.number, Tensor)) and not isinstance(v, bool)
            for v in values
        )

    header = "| " + " | ".join(_format_cell(c, "") for c in columns) + " |"
    rule = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    lines = [header, rule] + ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, text: str) -> Path:
    """Write markdown text to a file, creating its parent directories.

    Args:
        path: Destination file, written atomically (:func:`write_atomically`).
        text: Markdown; a final newline is added when missing.

    Returns:
        The path written.
    """
    text = text if text.endswith("\n") else text + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------- run recorder
class RunRecorder:
    """The output directory, clock and metadata of one experiment run.

    The clock starts when the recorder is created. :meth:`write_results` writes
    ``results.json`` as ``{"study", "seed", "config", "environment", "wall_time_s",
    "results"}``; :meth:`write_summary` writes ``summary.md``; :meth:`path` names further
    files (figures) inside the directory.

    Args:
        out_dir: Output directory; created if missing.
        study: Name of the study (or experiment).
        config: The run's settings (e.g. ``vars(args)``), stored in ``results.json``.
        seed: The run's seed.

    Example:
        >>> import tempfile
        >>> rec = RunRecorder(tempfile.mkdtemp(), study="demo", config={"lr": 0.1}, seed=0)
        >>> path = rec.write_results({"final_loss": float("nan")})
        >>> path.name
        'results.json'
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        study: str,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.study = study
        self.config: dict[str, Any] = dict(config or {})
        self.seed = seed
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the recorder was created.

        Returns:
            The wall time so far.
        """
        return time.perf_counter() - self._start

    def path(self, name: str) -> Path:
        """Return the path of a file inside the output directory.

        Args:
            name: File name, e.g. ``"loss.png"``.

        Returns:
            ``out_dir / name``.
        """
        return self.out_dir / name

    def write_results(self, results: Mapping[str, Any], name: str = "results.json") -> Path:
        """Write the results with the run's metadata and wall time so far.

        Args:
            results: The numbers of the run (tensors, arrays and NaN are fine).
            name: File name inside the output directory.

        Returns:
            The path written.

        Raises:
            TypeError: If the results or the config hold a value that is not JSON-serializable
                (see :func:`to_jsonable`).
        """
        payload = {
            "study": self.study,
            "seed": self.seed,
            "config": self.config,
            "environment": environment_info(),
            "wall_time_s": self.elapsed(),
            "results": dict(results),
        }
        return write_json(self.path(name), payload)

    def write_summary(self, text: str, name: str = "summary.md") -> Path:
        """Write the markdown summary of the run.

        Args:
            text: Markdown, e.g. headings and :func:`markdown_table` output.
            name: File name inside the output directory.

        Returns:
            The path written.
        """
        return write_markdown(self.path(name), text)


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


# -------------------------------------------------------------------------------- progress
def progress(
    iterable: Iterable[T],
    desc: str | None = None,
    *,
    enabled: bool | None = None,
    total: int | None = None,
) -> Iterator[T]:
    """Wrap an iterable in a ``tqdm`` progress bar written to stderr.

    Args:
        iterable: The iterable to wrap.
        desc: Text in front of the bar.
        enabled: ``True`` or ``False`` forces the bar on or off; ``None`` shows it only when
            stderr is a terminal (so logs and pipes stay clean).
        total: Number of items, when ``len(iterable)`` is not available.

    Returns:
        An iterator over the same items.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False))
