"""The ``secondorder hessian-free`` study (seed 003): files, finite numbers, acceptance."""

from __future__ import annotations

import json
import math

import pytest
import torch

from secondorder.experiments import cli

FIGURES = ("rosenbrock_paths.png", "loss_per_step.png", "damping_cg.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hessian_free")
    code = cli.main(["hessian-free", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f)


def test_writes_summary_figures_and_results(study):
    out, payload = study
    assert payload["study"] == "hessian-free"
    for name in ("summary.md", "results.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for title in ("Rosenbrock, Hessian", "Rosenbrock, GGN", "MLP", "Negative curvature"):
        assert title in summary
    for switch in ("no CG backtracking", "no line search", "no preconditioner", "fixed damping"):
        assert switch in summary
    assert "no Martens stop" in summary


def test_numbers_are_finite(study):
    _, payload = study
    results = payload["results"]["results"]
    assert set(results) == {"rosenbrock_hessian", "rosenbrock_ggn", "mlp"}
    for problem in results.values():
        for variant in problem.values():
            # JSON null would mark a NaN or an infinity
            for key in ("f", "batch_loss", "damping", "alpha"):
                assert all(isinstance(v, float) and math.isfinite(v) for v in variant[key]), key
            assert all(isinstance(v, int) and v >= 0 for v in variant["cg_iterations"])
            assert variant["total_cg_iterations"] == sum(variant["cg_iterations"])
            assert variant["time_s"] > 0 and math.isfinite(variant["final_f"])
    for row in payload["results"]["seed_protocol"]:
        assert all(v is not None for v in row.values())


def test_rosenbrock_reaches_1e_6_within_20_steps_with_the_default_variant(study):
    _, payload = study
    results = payload["results"]["results"]
    for key in ("rosenbrock_hessian", "rosenbrock_ggn"):
        default = results[key]["default"]
        assert default["steps_to_1e-6"] is not None and default["steps_to_1e-6"] <= 20, key
        assert min(default["f"][:20]) < 1e-6
        assert default["f"][0] < 404.0  # the first step descends from f(-1, 3) = 404
        path = default["path"]
        assert path[0] == [-1.0, 3.0] and math.dist(path[-1], [1.0, 1.0]) < 1e-3
    # the Hessian's default here continues through negative curvature; stopping is slower
    hessian = results["rosenbrock_hessian"]
    assert hessian["default"]["settings"]["negative_curvature"] == "continue"
    assert hessian["default"]["f"][0] == pytest.approx(4.01, rel=1e-3)
    assert hessian["negative curvature: stop"]["f"][0] > 100


def test_mlp_variants_descend(study):
    _, payload = study
    mlp = payload["results"]["results"]["mlp"]
    for name, variant in mlp.items():
        assert variant["f"][-1] < variant["f0"], name
    assert mlp["default"]["f"][-1] < 0.5 * mlp["default"]["f0"]
