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
* :func:`progress` -- a ``tqdm`` bar on a terminal, periodic log lines elsewhere
  (:mod:`.progress`).

Every file is written atomically (:func:`write_atomically`): into a temporary file in the same
directory, then renamed over the destination with ``os.replace``, so a reader (or a run that
fails half-way) never sees a half-written ``results.json``, ``summary.md`` or figure.

``matplotlib`` and ``tqdm`` are imported only when a figure or a bar is made. The files and JSON
live in :mod:`.report_files`, the tables in :mod:`.report_tables`, the figures in
:mod:`.report_figures`; every name is re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .progress import log_progress, progress
from .report_figures import (
    Curve,
    _new_figure,
    draw_curves,
    draw_decision_boundary,
    plot_curves,
    plot_decision_boundary,
    plot_panels,
    save_figure,
)
from .report_files import (
    environment_info,
    to_jsonable,
    write_atomically,
    write_json,
    write_markdown,
)
from .report_tables import markdown_table

__all__ = [
    "Curve",
    "RunRecorder",
    "_new_figure",
    "draw_curves",
    "draw_decision_boundary",
    "environment_info",
    "log_progress",
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
