"""Tests of the experiment reports: JSON, markdown, figures and progress bars."""

from __future__ import annotations

import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from secondorder.experiments.report import (
    RunRecorder,
    draw_curves,
    draw_decision_boundary,
    environment_info,
    log_progress,
    markdown_table,
    plot_curves,
    plot_decision_boundary,
    plot_panels,
    progress,
    to_jsonable,
    write_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Point:
    x: float
    y: torch.Tensor


def test_to_jsonable_converts_and_maps_non_finite_to_null():
    obj = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "tensor": torch.tensor([1.0, float("nan")]),
        "scalar": torch.tensor(2.5),
        "array": np.array([[1, 2], [3, 4]], dtype=np.int32),
        "np_float": np.float32(0.5),
        "np_nan": np.float64("nan"),
        "tuple": (1, "a", None, True),
        "path": Path("runs/x"),
        "dtype": torch.float64,
        3: Point(1.0, torch.ones(2)),
    }
    out = to_jsonable(obj)
    assert out == {
        "nan": None,
        "inf": None,
        "tensor": [1.0, None],
        "scalar": 2.5,
        "array": [[1, 2], [3, 4]],
        "np_float": 0.5,
        "np_nan": None,
        "tuple": [1, "a", None, True],
        "path": "runs/x",
        "dtype": "torch.float64",
        "3": {"x": 1.0, "y": [1.0, 1.0]},
    }
    json.dumps(out, allow_nan=False)


def test_to_jsonable_rejects_unknown_types_with_location():
    with pytest.raises(TypeError, match=r"obj\['a'\]\[1\].*object"):
        to_jsonable({"a": [1, object()]})


def test_write_json_is_strict(tmp_path):
    path = write_json(tmp_path / "sub" / "x.json", {"v": float("nan"), "w": [float("inf"), 1]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"v": None, "w": [None, 1]}


def test_run_recorder_writes_results_and_summary(tmp_path):
    rec = RunRecorder(tmp_path / "run", study="demo", config={"lr": 0.1, "out": tmp_path}, seed=7)
    assert rec.path("loss.png") == tmp_path / "run" / "loss.png"
    results = {"losses": torch.tensor([1.0, 0.5, float("nan")]), "acc": np.float64(0.9)}
    path = rec.write_results(results)
    data = json.loads(path.read_text())
    assert data["study"] == "demo" and data["seed"] == 7
    assert data["config"] == {"lr": 0.1, "out": str(tmp_path)}
    assert data["results"] == {"losses": [1.0, 0.5, None], "acc": 0.9}
    assert data["wall_time_s"] >= 0.0
    for key in ("torch", "numpy", "secondorder", "python"):
        assert isinstance(data["environment"][key], str)
    assert environment_info()["torch"] == torch.__version__

    summary = rec.write_summary("# demo\n\n" + markdown_table([{"a": 1}]))
    assert summary.name == "summary.md" and summary.read_text().startswith("# demo")


def test_markdown_table():
    rows = [
        {"method": "GN", "loss": 0.0123456, "iters": 10, "ok": True},
        {"method": "a|b", "loss": float("nan"), "ok": False, "extra": torch.tensor(2.0)},
    ]
    table = markdown_table(rows, floatfmt=".3g")
    lines = table.splitlines()
    assert lines[0] == "| method | loss | iters | ok | extra |"
    assert lines[1] == "|---|---:|---:|---|---:|"
    assert lines[2] == "| GN | 0.0123 | 10 | yes |  |"
    assert lines[3] == "| a\\|b | nan |  | no | 2 |"
    assert table.endswith("\n")

    picked = markdown_table(rows, ["loss", "method"], formats={"loss": ".2e"})
    assert picked.splitlines()[2] == "| 1.23e-02 | GN |"
    with pytest.raises(ValueError, match="column"):
        markdown_table([])


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_plot_curves(tmp_path):
    curves = {
        "Adam": [1.0, 0.5, 0.25, float("nan")],
        "GN": torch.tensor([1.0, 0.1, 0.01]),
        "NGD": (np.array([0, 2, 4]), [1.0, 0.3, 0.05]),
    }
    path = plot_curves(curves, tmp_path / "figs" / "loss.png", logy=True, title="loss")
    assert _is_png(path)
    with pytest.raises(ValueError, match="equal lengths"):
        plot_curves({"bad": ([0, 1], [1.0, 2.0, 3.0])}, tmp_path / "bad.png")


def test_plot_decision_boundary(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 2, generator=g) * 2 - 1
    y = (x[:, 0] > 0).long()

    def logits(points: torch.Tensor) -> torch.Tensor:
        return torch.stack((-points[:, 0], points[:, 0]), dim=1)

    assert _is_png(plot_decision_boundary(logits, x, y, tmp_path / "a.png", resolution=30))
    labels = functools.partial(lambda p: (p[:, 1] > 0).long())
    assert _is_png(plot_decision_boundary(labels, x, y, tmp_path / "b.png", resolution=30))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_decision_boundary(logits, torch.zeros(5, 3), y[:5], tmp_path / "c.png")
    with pytest.raises(ValueError, match="predict must return"):
        plot_decision_boundary(lambda p: p[:5, 0], x, y, tmp_path / "d.png", resolution=10)


def test_plot_panels(tmp_path):
    x = torch.rand(20, 2, generator=torch.Generator().manual_seed(1))
    panels = [
        functools.partial(draw_curves, curves={"a": [3.0, 2.0, 1.0]}, logy=True),
        functools.partial(
            draw_decision_boundary,
            predict=lambda p: (p.sum(1) > 1).long(),
            x=x,
            y=(x.sum(1) > 1).long(),
            resolution=20,
        ),
        lambda ax: ax.hist([1, 2, 2, 3]),
    ]
    assert _is_png(plot_panels(panels, tmp_path / "panels.png", ncols=2, suptitle="all"))
    with pytest.raises(ValueError, match="panel"):
        plot_panels([], tmp_path / "none.png")


def test_progress_off_passes_items_through_silently(capsys):
    assert list(progress(range(3), "off", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("enabled", [None, True])
def test_progress_writes_log_lines_when_stderr_is_not_a_terminal(capsys, enabled):
    # under pytest stderr is captured, not a terminal: a bar would print nothing readable
    assert list(progress(iter("ab"), "auto", enabled=enabled, total=2)) == ["a", "b"]
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == "auto: 0/2" and lines[-1].startswith("auto: done, 2 items in ")
    assert captured.out == ""


def test_log_progress_writes_periodic_lines():
    out = io.StringIO()
    assert list(log_progress(range(3), "loop", interval=0.0, file=out)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[0] == "loop: 0/3"
    assert lines[1].startswith("loop: 1/3 (33%), ") and lines[3].startswith("loop: 3/3 (100%)")
    assert lines[-1].startswith("loop: done, 3 items")
    unsized = io.StringIO()
    list(log_progress(iter([1]), None, interval=0.0, file=unsized))
    first, second = unsized.getvalue().splitlines()[:2]
    assert first == "progress: 0" and second.startswith("progress: 1, ")


def test_progress_shows_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert list(progress(range(4), "bar")) == [0, 1, 2, 3]
    captured = capsys.readouterr()
    assert "bar" in captured.err and "bar: 0/4" not in captured.err and captured.out == ""
