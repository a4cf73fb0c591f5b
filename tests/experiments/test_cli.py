"""Tests of the ``secondorder`` command line, with a dummy study injected into the registry."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from secondorder.experiments import cli

DUMMY = "cli_test_dummy_study"


def make_dummy_study(name: str = "dummy") -> types.ModuleType:
    module = types.ModuleType(DUMMY)
    module.NAME = name
    module.HELP = "A dummy study for testing the CLI.\nSecond line."
    module.calls = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--width", type=int, default=3, help="dummy width")

    def run(args: argparse.Namespace) -> dict:
        module.calls.append(args)
        (args.out / "summary.md").write_text("# dummy\n")
        return {
            "width": args.width,
            "quick": args.quick,
            "loss": torch.tensor([1.0, float("nan")]),
            "random": torch.rand(1).item(),
            "threads": torch.get_num_threads(),
        }

    module.add_arguments = add_arguments
    module.run = run
    return module


@pytest.fixture
def dummy(monkeypatch):
    module = make_dummy_study()
    monkeypatch.setitem(sys.modules, DUMMY, module)
    monkeypatch.setattr(
        cli,
        "STUDIES",
        {"dummy": DUMMY, "ghost": "secondorder.experiments.studies.ghost_study_missing"},
    )
    return module


def test_registry_lists_all_studies():
    assert list(cli.STUDIES) == [
        "spiral",
        "mnist-cnn",
        "mnist-mlp",
        "hessian-free",
        "directional",
        "vit",
        "charlm",
        "bench",
    ]
    assert cli.STUDIES["mnist-cnn"] == "secondorder.experiments.studies.mnist_cnn"


def test_help_lists_registered_studies(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.STUDIES:
        assert name in out


def test_help_describes_dummy_and_marks_missing(dummy, capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "A dummy study for testing the CLI." in out
    assert "ghost" in out and "unavailable" in out


def test_study_help_has_common_and_own_options(dummy, capsys):
    assert cli.main(["dummy", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--seed", "--out", "--device", "--data", "--threads", "--width"):
        assert option in out
    assert "Second line." in out
    assert dummy.calls == []


def test_missing_study_module_is_a_clear_error(dummy, capsys):
    assert cli.main(["ghost", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "ghost" in err and "secondorder.experiments.studies.ghost_study_missing" in err
    assert "Traceback" not in err


def test_missing_dependency_of_a_study_is_reported(monkeypatch, tmp_path, capsys):
    (tmp_path / "cli_test_broken_study.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "STUDIES", {"broken": "cli_test_broken_study"})
    assert cli.main(["broken"]) == 1
    err = capsys.readouterr().err
    assert "cli_test_broken_study" in err and "no_such_dependency_xyz" in err
    assert "not installed" in err
    assert cli.main(["--help"]) == 0
    assert "unavailable" in capsys.readouterr().out


def test_study_without_protocol_is_rejected(monkeypatch, capsys):
    monkeypatch.setattr(cli, "STUDIES", {"json": "json"})
    assert cli.main(["json"]) == 1
    assert "add_arguments" in capsys.readouterr().err


def test_unknown_study_is_a_usage_error(dummy, capsys):
    assert cli.main(["nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_dummy_study_writes_into_out(dummy, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    threads = torch.get_num_threads()
    try:
        code = cli.main(["dummy", "--quick", "--seed", "5", "--out", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    (args,) = dummy.calls
    assert args.out == out and args.quick and args.seed == 5 and args.width == 3
    assert args.device == "cpu" and args.data is None and args.progress is None

    data = json.loads((out / "results.json").read_text())
    assert data["study"] == "dummy" and data["seed"] == 5
    assert data["config"]["quick"] is True and data["config"]["out"] == str(out)
    assert data["results"]["loss"] == [1.0, None]
    assert data["results"]["threads"] == 1
    expected = torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    assert data["results"]["random"] == expected
    assert "torch" in data["environment"]
    assert (out / "summary.md").exists()

    printed = capsys.readouterr().out
    assert str(out) in printed and "results.json" in printed and "summary.md" in printed


def test_seed_makes_runs_reproducible(dummy, tmp_path):
    cli.main(["dummy", "--out", str(tmp_path / "1"), "--seed", "3"])
    cli.main(["dummy", "--out", str(tmp_path / "2"), "--seed", "3"])
    first, second = (
        json.loads((tmp_path / d / "results.json").read_text())["results"] for d in "12"
    )
    assert first == second


def test_default_out_dir_is_runs_study(dummy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["dummy"]) == 0
    assert (tmp_path / "runs" / "dummy" / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error(dummy, tmp_path, capsys):
    assert cli.main(["dummy", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert dummy.calls == []


def test_bad_arguments(dummy, tmp_path, capsys):
    assert cli.main(["dummy", "--threads", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert cli.main(["dummy", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    assert "existing directory" in capsys.readouterr().err


def test_non_dict_result_is_an_error(dummy, tmp_path, capsys):
    dummy.run = lambda args: [1, 2]
    assert cli.main(["dummy", "--out", str(tmp_path)]) == 1
    assert "must return a dict" in capsys.readouterr().err


def test_name_mismatch_is_an_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, DUMMY, make_dummy_study(name="other"))
    monkeypatch.setattr(cli, "STUDIES", {"dummy": DUMMY})
    assert cli.main(["dummy"]) == 1
    assert "NAME='other'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import secondorder.__main__ as entry

    assert entry.main is cli.main
