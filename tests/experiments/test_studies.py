"""Every study runs with --quick and writes finite results, a summary and its figures."""

from __future__ import annotations

import json
import math

from secondorder.experiments.cli import main


def run_study(name, tmp_path, *extra):
    out = tmp_path / name
    code = main([name, "--quick", "--out", str(out), "--no-progress", "--threads", "1", *extra])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "summary.md").read_text().strip()
    return out, results


def all_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from all_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_spiral_quick(tmp_path):
    out, results = run_study("spiral", tmp_path)
    for fig in (
        "loss.png",
        "decision_boundary_adam.png",
        "decision_boundary_gauss_newton.png",
        "decision_boundary_natural_gradient.png",
    ):
        assert (out / fig).stat().st_size > 1000
    res = results["results"] if "results" in results else results
    losses = res["losses"]
    for name, curve in losses.items():
        assert all(math.isfinite(v) for v in curve), name
    # second-order methods make fast progress: 5x lower loss within the quick budget
    assert losses["Natural gradient"][-1] < losses["Natural gradient"][0] / 5
    assert losses["Gauss-Newton"][-1] < losses["Gauss-Newton"][0] / 5
    assert res["eigmax"]["ggn"] > 0


def test_mnist_mlp_quick(tmp_path):
    out, results = run_study("mnist-mlp", tmp_path)
    assert (out / "accuracy_loss.png").stat().st_size > 1000
    res = results["results"] if "results" in results else results
    methods = res["methods"]
    sgd = methods["SGD"]["test_accuracy_per_epoch"][0]
    assert methods["NG (true Fisher, exact)"]["test_accuracy_per_epoch"][0] > sgd
    assert methods["NG (empirical Fisher)"]["test_accuracy_per_epoch"][0] > sgd
    assert all(math.isfinite(x) for x in all_numbers(methods))


def test_mnist_cnn_quick(tmp_path):
    out, results = run_study("mnist-cnn", tmp_path)
    assert (out / "loss_accuracy.png").stat().st_size > 1000
    runs = results["results"]["runs"]
    # the GGN trains the sigmoid CNN, the Hessian and SGD stay near chance
    assert runs["GGN"]["losses"][-1] < 0.8 * runs["Hessian"]["losses"][-1]
    assert runs["SGD lr=0.1"]["losses"][-1] > 2.0
    assert all(math.isfinite(x) for x in all_numbers(runs))


def test_directional_quick(tmp_path):
    out, results = run_study("directional", tmp_path)
    assert (out / "directional.png").stat().st_size > 1000
    res = results["results"]
    assert res["check"]["step_relative_error"] <= 1e-6
    assert res["matches_dense"] is True


def test_bench_quick(tmp_path):
    out, results = run_study("bench", tmp_path)
    res = results["results"]
    assert res["operators"]["returncode"] == 0
    table = (out / "operators.md").read_text()
    assert "GGN·v" in table
