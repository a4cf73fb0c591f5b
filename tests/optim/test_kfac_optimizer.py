"""KFACOptimizer and KFACPreconditioner against references built another way.

References: the operator ``so.KFAC`` (its own tests check it against hand-built Kronecker
products and the exact GGN), the dense GGN :math:`J^\\top H J` from ``jacrev`` and
``jacrev(grad)`` solved by ``torch.linalg.solve``, and gradients from ``torch.func.grad``.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

import secondorder as so

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "curvature"))
from test_kfac import SmallResNet

DT = torch.float64


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


MODELS = {"mlp": (mlp, (4,)), "cnn": (cnn, (2, 4, 4))}
LOSSES = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss()}


def problem(kind="mlp", loss="ce", n=8, seed=0):
    make, shape = MODELS[kind] if kind in MODELS else (bn_net, (4,))
    torch.manual_seed(seed)
    model = make().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    if loss == "ce":
        y = torch.randint(0, 3, (n,), generator=g)
    elif loss == "bce":
        y = torch.rand(n, 3, generator=g, dtype=DT).round()
    else:
        y = torch.randn(n, 3, generator=g, dtype=DT)
    return model, LOSSES[loss], X, y


def ref_grad(model, loss_fn, X, y) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    return torch.cat([g[k].reshape(-1) for k in params])


PLAIN = dict(factor_decay=0.0, factor_every=1, inverse_every=1, kl_clip=None, adapt_damping=False)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_step_is_the_kfac_operators_damped_inverse_of_the_gradient(kind, loss, fisher):
    model, loss_fn, X, y = problem(kind, loss)
    lam = 0.05
    for _ in range(2):  # the second step: new factors at new parameters
        before = flat(model)
        K = so.KFAC(model, loss_fn, (X, y), fisher=fisher)  # MC: generator seeded 0, as opt's
        expected = before - 0.7 * (K.inverse(lam) @ ref_grad(model, loss_fn, X, y))
        opt = so.KFACOptimizer(model, loss_fn, lr=0.7, damping=lam, fisher=fisher, **PLAIN)
        opt.step(X, y)
        torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_one_sample_linear_step_is_the_damped_ggn_newton_step(loss):
    torch.manual_seed(3)
    model = nn.Linear(4, 3).to(DT)
    loss_fn = LOSSES[loss]
    X = torch.randn(1, 4, dtype=DT)
    y = torch.randn(1, 3, dtype=DT) if loss == "mse" else torch.tensor([1])
    if loss == "bce":
        y = torch.tensor([[1.0, 0.0, 1.0]], dtype=DT)
    names = [k for k, _ in model.named_parameters()]
    theta = flat(model)
    sizes = [p.numel() for p in model.parameters()]

    def out(t):
        parts = dict(zip(names, (v.view_as(p) for v, p in zip(t.split(sizes), model.parameters()))))
        return functional_call(model, parts, (X,))

    J = jacrev(out)(theta).reshape(-1, theta.numel())
    z = out(theta).detach()
    H = jacrev(grad(lambda z_: loss_fn(z_.view_as(z), y)))(z.reshape(-1))
    ggn = J.T @ H @ J
    g = ref_grad(model, loss_fn, X, y)
    lam = 1e-2
    expected = theta - torch.linalg.solve(ggn + lam * torch.eye(len(theta), dtype=DT), g)
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **PLAIN)
    opt.step(X, y)
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-11)


def test_running_averages_equal_the_hand_computed_average():
    model, loss_fn, X, y = problem("mlp", "ce", n=12)
    twin = copy.deepcopy(model)
    beta = 0.8
    opt = so.KFACOptimizer(
        model,
        loss_fn,
        fisher="exact",
        factor_decay=beta,
        factor_every=2,
        inverse_every=3,
        adapt_damping=False,
    )
    batches = [(X[:6], y[:6]), (X[6:], y[6:]), (X[:4], y[:4]), (X[4:], y[4:])]
    expected: dict[str, dict[str, torch.Tensor]] = {}
    eig_at: dict[str, torch.Tensor] = {}
    for k, (xb, yb) in enumerate(batches):
        twin.load_state_dict(model.state_dict())
        K = so.KFAC(twin, loss_fn, (xb, yb), fisher="exact")
        if k % 2 == 0:  # factor steps 1 and 3
            for name, b in K.blocks.items():
                if name not in expected:
                    expected[name] = {"A": b.A.clone(), "G": b.G.clone()}
                else:
                    expected[name]["A"] = beta * expected[name]["A"] + (1 - beta) * b.A
                    expected[name]["G"] = beta * expected[name]["G"] + (1 - beta) * b.G
        opt.step(xb, yb)
        assert opt.diagnostics["factors_updated"] == (k % 2 == 0)
        assert opt.diagnostics["inverted"] == (k % 3 == 0)
        for name, e in expected.items():
            run = opt._running.blocks[name]
            torch.testing.assert_close(run["A"], e["A"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(run["G"], e["G"], rtol=1e-12, atol=1e-14)
        name = sorted(expected)[0]
        qa = opt._running.blocks[name]["eig"][3]
        if k % 3 == 0:
            eig_at[name] = qa.clone()
        assert torch.equal(qa, eig_at[name])  # kept between decompositions


def resumed_equals_uninterrupted(make, problem_of, batches, split):
    """Train on ``batches``, and from a checkpoint after ``split`` steps in a fresh model and
    optimizer (``make(model)``; ``problem_of(seed)`` builds the model): the same parameters."""
    model = problem_of(0)
    opt = make(model)
    for xb, yb in batches[:split]:
        opt.step(xb, yb)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for xb, yb in batches[split:]:
        opt.step(xb, yb)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = problem_of(5)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    for xb, yb in batches[split:]:
        opt2.step(xb, yb)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.global_state["step"] == opt.global_state["step"] == len(batches)
    return saved["opt"]


@pytest.mark.parametrize("split", [3, 4])  # resumed at a decomposition step, and between two
@pytest.mark.parametrize("inverse", ["eigen", "cholesky"])
def test_resume_is_bit_for_bit(inverse, split):
    _, loss_fn, X, y = problem("mlp", "ce", n=16)

    def make(m):
        return so.KFACOptimizer(
            m, loss_fn, momentum=0.9, inverse_every=3, damping_every=2, inverse=inverse
        )

    batches = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)] * 2
    resumed_equals_uninterrupted(
        make, lambda seed: problem("mlp", "ce", n=16, seed=seed)[0], batches, split
    )


def test_load_state_dict_refuses_another_optimizer():
    model, loss_fn, X, y = problem()
    other = so.GaussNewton(model, loss_fn)
    other.step(X, y)
    with pytest.raises(ValueError, match="GaussNewton"):
        so.KFACOptimizer(model, loss_fn).load_state_dict(other.state_dict())


def test_param_groups_have_their_own_lr_and_weight_decay():
    model, loss_fn, X, y = problem()
    lam = 0.1
    theta = flat(model)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    d = K.inverse(lam) @ ref_grad(model, loss_fn, X, y)
    first = [model[0].weight, model[0].bias]
    groups = [
        {"params": first, "lr": 0.5, "weight_decay": 0.1},
        {"params": [model[2].weight, model[2].bias], "lr": 0.2},
    ]
    opt = so.KFACOptimizer(model, loss_fn, damping=lam, fisher="exact", params=groups, **PLAIN)
    opt.step(X, y)
    n0 = sum(p.numel() for p in first)
    rest = len(theta) - n0
    lr = torch.cat([torch.full((n0,), 0.5, dtype=DT), torch.full((rest,), 0.2, dtype=DT)])
    wd = torch.cat([torch.full((n0,), 0.1, dtype=DT), torch.zeros(rest, dtype=DT)])
    torch.testing.assert_close(flat(model), (1 - lr * wd) * theta - lr * d, rtol=1e-10, atol=1e-12)
    opt.param_groups[1]["damping"] = 0.2
    with pytest.raises(ValueError, match="same damping"):
        opt.step(X, y)


def test_one_cycle_scheduler_and_grad_after_step():
    model, loss_fn, X, y = problem()
    opt = so.KFACOptimizer(model, loss_fn, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
    lrs, moms = [], []
    for _ in range(5):
        opt.step(X, y)
        assert opt.diagnostics["accepted"]
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
    assert len(set(lrs)) == 5 and min(moms) < 0.9
    before = copy.deepcopy(model)
    opt.step(X, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, ref_grad(before, loss_fn, X, y), rtol=1e-10, atol=1e-12)
    assert (got - ref_grad(model, loss_fn, X, y)).norm() > 1e-6  # not at the new point


def test_closure_form_equals_the_batch_form():
    model, loss_fn, X, y = problem()
    twin = copy.deepcopy(model)
    a = so.KFACOptimizer(model, loss_fn)
    b = so.KFACOptimizer(twin, loss_fn)
    for _ in range(3):
        a.step(X, y)
        b.step(lambda: loss_fn(twin(X), y))
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=0)
    with pytest.raises(TypeError, match="closure"):
        a.step()


def test_nonfinite_step_is_rejected_reported_and_raises_damping():
    model, loss_fn, X, y = problem()
    opt = so.KFACOptimizer(model, loss_fn)
    opt.step(X, y)
    before = flat(model)
    scale = opt.global_state.get("damping_scale", 1.0)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(so.NonFiniteStepWarning, match="not finite"):
        opt.step(bad, y)
    assert torch.equal(flat(model), before)
    assert opt.diagnostics["accepted"] is False and opt.global_state["rejections"] >= 1
    assert opt.global_state["damping_scale"] == pytest.approx(10 * scale)
    raising = so.KFACOptimizer(model, loss_fn, on_nonfinite="raise")
    with pytest.raises(so.NonFiniteError):
        raising.step(bad, y)
    assert torch.equal(flat(model), before)


def test_nonfinite_factors_never_reach_the_parameters():
    model, loss_fn, X, y = problem()
    opt = so.KFACOptimizer(model, loss_fn, inverse_every=100, adapt_damping=False)
    opt.step(X, y)
    before = flat(model)
    name = sorted(opt._running.blocks)[0]
    opt._running.blocks[name]["eig"][0].fill_(float("inf"))  # poisoned inverse
    opt._running.blocks[name]["eig"][1].fill_(float("nan"))
    with pytest.warns(so.NonFiniteStepWarning, match="direction"):
        opt.step(X, y)
    assert torch.equal(flat(model), before)


def test_adaptive_damping_rejects_a_step_that_raises_the_loss():
    model, loss_fn, X, y = problem()
    opt = so.KFACOptimizer(model, loss_fn, lr=50.0, damping=1e-4, kl_clip=None, damping_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = float(opt.step(X, y))
            assert opt.diagnostics["accepted"] is False or opt.diagnostics["new_loss"] <= loss
    assert any(issubclass(w.category, so.RejectedStepWarning) for w in caught)
    assert opt.global_state["damping_scale"] > 1


def test_batchnorm_statistics_are_constants_of_the_curvature():
    model, loss_fn, X, y = problem("bn", "ce", n=10)
    model.train()
    frozen = copy.deepcopy(model).eval()
    bn = frozen[1]
    var, mean = torch.var_mean(model[0](X).detach(), 0, correction=0)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    lam = 0.1
    K = so.KFAC(frozen, loss_fn, (X, y), fisher="exact")
    assert K.structure["1.weight"] in ("dense", "diagonal")
    running_before = model[1].running_mean.clone()
    probe = copy.deepcopy(model)  # the gradient at batch statistics (train mode), by backward
    loss_fn(probe(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    expected = flat(model) - K.inverse(lam) @ g
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **PLAIN)
    opt.step(X, y)
    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)
    assert model[1].training
    torch.testing.assert_close(model[1].running_mean, 0.9 * running_before + 0.1 * mean)


def _running(model):
    ends = ("running_mean", "running_var", "num_batches_tracked")
    return [b.clone() for n, b in model.named_buffers() if n.endswith(ends)]


@pytest.mark.parametrize("form", ["batch", "closure"])
def test_running_statistics_move_as_one_plain_forward_pass(form):
    """The gradient's forward pass moves BatchNorm's statistics (no separate plain pass)."""
    model, loss_fn, X, y = problem("bn", "ce", n=10)
    model.train()
    twin = copy.deepcopy(model)
    opt = so.KFACOptimizer(model, loss_fn, factor_every=2, damping_every=2)
    for _ in range(4):
        with torch.no_grad():
            twin.load_state_dict(model.state_dict())
            twin(X)
        if form == "batch":
            opt.step(X, y)
        else:
            opt.step(lambda: loss_fn(model(X), y))
        for got, want in zip(_running(model), _running(twin)):
            assert torch.equal(got, want)


def test_batchnorm_statistics_come_from_the_gradients_forward_pass(monkeypatch):
    """Factor steps take BatchNorm's batch statistics from the gradient's forward pass: no
    extra forward, and the same steps as with the statistics' own forward pass."""
    from contextlib import contextmanager

    from secondorder.optim import kfac as kfac_module
    from secondorder.optim import kfac_state

    model, loss_fn, X, y = problem("bn", "ce", n=10)
    model.train()
    twin = copy.deepcopy(model)
    calls = []
    original = kfac_state.recorded_batchnorm_inputs

    @contextmanager
    def counted(m):
        calls.append(m)
        with original(m) as seen:
            yield seen

    monkeypatch.setattr(kfac_state, "recorded_batchnorm_inputs", counted)  # its own pass only
    kw = dict(lr=0.5, damping=0.1, factor_every=1, fisher="exact")
    opt = so.KFACOptimizer(model, loss_fn, **kw)
    for _ in range(3):
        opt.step(X, y)
    assert not calls

    @contextmanager
    def nothing(m):
        yield {}

    monkeypatch.setattr(kfac_module, "recorded_batchnorm_inputs", nothing)
    ref = so.KFACOptimizer(twin, loss_fn, **kw)
    for _ in range(3):
        ref.step(X, y)
    assert len(calls) == 3
    torch.testing.assert_close(flat(model), flat(twin), rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["cnn", "bn"])
@pytest.mark.parametrize("recorded", [True, False])
def test_preconditioner_mode_gives_sgd_the_optimizers_step(recorded, kind):
    """Also with BatchNorm (dense exact blocks from the graph engine, which the loop's hooks
    kept away before: the preconditioner got the autograd engine's diagonals)."""
    model, loss_fn, X, y = problem(kind, "ce")
    twin = copy.deepcopy(model)
    kw = dict(factor_decay=0.5, factor_every=1, inverse_every=2, fisher="exact")
    pre = so.KFACPreconditioner(model, loss_fn, damping=0.1, kl_clip=0.01, lr=0.3, **kw)
    ref = so.KFACOptimizer(
        twin, loss_fn, lr=0.3, damping=0.1, kl_clip=0.01, adapt_damping=False, **kw
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        sgd.zero_grad()
        loss_fn(model(X), y).backward()
        diag = pre.step() if recorded else pre.step(X, y)
        assert diag["accepted"]
        sgd.step()
        ref.step(X, y)
        torch.testing.assert_close(flat(model), flat(twin), rtol=1e-10, atol=1e-12)
    kinds = sorted(o["kind"] for o in pre.running.other.values())
    assert kinds == sorted(o["kind"] for o in ref._running.other.values())
    assert kinds == (["dense", "dense"] if kind == "bn" else [])
    assert len(pre._recorder._handles) == 3  # the loop's hooks are back
    state = pre.state_dict()
    assert state["step"] == 3 and "kfac" in state


def test_preconditioner_mode_leaves_a_nonfinite_gradient():
    model, loss_fn, X, y = problem()
    pre = so.KFACPreconditioner(model, loss_fn)
    loss_fn(model(X), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(so.NonFiniteStepWarning, match="gradient"):
        pre.step()
    assert pre.diagnostics["rejected"] == 1 and model[0].weight.grad[0, 0].isnan()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0.0}, "lr"),
        ({"damping": -1.0}, "damping"),
        ({"factor_decay": 1.0}, "factor_decay"),
        ({"factor_every": 0}, "factor_every"),
        ({"inverse_every": 1.5}, "inverse_every"),
        ({"fisher": "true"}, "fisher"),
        ({"approx": "mean"}, "approx"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"damping_every": 0}, "damping_every"),
        ({"num_samples": 2, "fisher": "exact"}, "num_samples"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_arguments(kw, match):
    model, loss_fn, _, _ = problem()
    with pytest.raises(ValueError, match=match):
        so.KFACOptimizer(model, loss_fn, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"damping": 0.0}, "damping"),
        ({"factor_decay": -0.1}, "factor_decay"),
        ({"inverse_every": 0}, "inverse_every"),
        ({"fisher": "x"}, "fisher"),
        ({"kl_clip": -1.0}, "kl_clip"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_preconditioner_bad_arguments(kw, match):
    model, loss_fn, _, _ = problem()
    with pytest.raises(ValueError, match=match):
        so.KFACPreconditioner(model, loss_fn, **kw)


def test_freezing_and_casting_after_construction():
    model, loss_fn, X, y = problem()
    model.float()
    opt = so.KFACOptimizer(model, loss_fn, **PLAIN)
    opt.step(X.float(), y)
    model[0].weight.requires_grad_(False)  # the flat vector changes: the factors start again
    frozen = model[0].weight.detach().clone()
    opt.step(X.float(), y)
    assert torch.equal(model[0].weight, frozen)
    assert sum(b["weight"] >= 0 for b in opt._running.blocks.values()) == 1
    model[0].weight.requires_grad_(True)
    model.double()
    before = flat(model)
    opt.step(X, y)
    assert all(p.dtype == DT for p in model.parameters())
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), before)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_kfac_operator_autograd_engine_gives_the_same_factors(kind):
    model, loss_fn, X, y = problem(kind, "ce")
    auto = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    forced = so.KFAC(model, loss_fn, (X, y), fisher="exact", engine="autograd")
    assert auto.engine == "sequential" and forced.engine == "autograd"
    torch.testing.assert_close(forced.to_dense(), auto.to_dense(), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="engine"):
        so.KFAC(model, loss_fn, (X, y), engine="graph")


def test_optimizer_skips_the_graph_engine_after_a_refusal():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)
    ).to(DT)
    _, loss_fn, X, y = problem("cnn", "ce")
    opt = so.KFACOptimizer(model, loss_fn, factor_every=1)
    opt.step(X, y)
    engine = opt._engine
    opt.step(X, y)
    assert opt.diagnostics["accepted"]
    K = so.KFAC(model, loss_fn, (X, y))
    assert engine == ("autograd" if K.engine == "autograd" else "auto")


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_predicted_change_is_the_kfac_quadratic_model(kl_clip):
    model, loss_fn, X, y = problem("cnn", "mse")
    lam, lr = 0.05, 0.8
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact").to_dense()
    g = ref_grad(model, loss_fn, X, y)
    M = K + lam * torch.eye(len(g), dtype=DT)
    s = torch.linalg.solve(M, g)
    nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / (lr * lr * float(g @ s))) ** 0.5)
    step = -lr * nu * s
    expected = float(g @ step + 0.5 * step @ (M @ step))
    kw = {**PLAIN, "adapt_damping": True, "kl_clip": kl_clip}
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher="exact", **kw)
    opt.step(X, y)
    assert opt.diagnostics["predicted_change"] == pytest.approx(expected, rel=1e-9)
    assert (nu < 1) == (kl_clip is not None)


def test_max_grad_norm_clips_the_gradient_before_preconditioning():
    model, loss_fn, X, y = problem()
    lam = 0.1
    g = ref_grad(model, loss_fn, X, y)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    limit = 0.25 * float(g.norm())
    expected = flat(model) - K.inverse(lam) @ (g * (limit / g.norm()))
    opt = so.KFACOptimizer(
        model, loss_fn, lr=1.0, damping=lam, fisher="exact", max_grad_norm=limit, **PLAIN
    )
    opt.step(X, y)
    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)
    assert opt.diagnostics["grad_clip"] == pytest.approx(0.25)


def test_preconditioner_resume_is_bit_for_bit():
    model, loss_fn, X, y = problem("mlp", "ce", n=16)

    def pair(m):
        return so.KFACPreconditioner(m, loss_fn, factor_every=2, inverse_every=3), (
            torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        )

    def train(m, pre, sgd, chunks):
        for i in chunks:
            xb, yb = X[i : i + 4], y[i : i + 4]
            sgd.zero_grad()
            loss_fn(m(xb), yb).backward()
            pre.step()
            sgd.step()

    pre, sgd = pair(model)
    train(model, pre, sgd, [0, 4, 8])
    buf = io.BytesIO()
    torch.save([model.state_dict(), pre.state_dict(), sgd.state_dict()], buf)
    train(model, pre, sgd, [12, 0, 4, 8])
    buf.seek(0)
    m_state, p_state, s_state = torch.load(buf, weights_only=True)
    model2 = problem("mlp", "ce", seed=7)[0]
    model2.load_state_dict(m_state)
    pre2, sgd2 = pair(model2)
    pre2.load_state_dict(p_state)
    sgd2.load_state_dict(s_state)
    train(model2, pre2, sgd2, [12, 0, 4, 8])
    assert torch.equal(flat(model), flat(model2))


def test_a_new_layout_is_decomposed_before_use():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    _, loss_fn, X, y = problem()
    opt = so.KFACOptimizer(model, loss_fn, factor_every=1, inverse_every=10)
    opt.step(X, y)
    for m in (model[0], model[3]):
        m.requires_grad_(False)  # only LayerNorm's parameters (no Kronecker block) remain
    opt.step(X, y)
    assert opt.diagnostics["accepted"] and opt.diagnostics["inverted"]
    assert not opt._running.blocks and opt._running.other


class TinyTransformer(nn.Module):
    """Embedding (padding 0) -> encoder layer -> cross-attention on its input -> head."""

    def __init__(self, vocab: int = 11, d: int = 4, seq: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(d, 2, 6, 0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(seq * d, 3)

    def forward(self, x):
        e = self.emb(x)
        h = self.enc(e)
        h = h + self.cross(h, e, e, need_weights=False)[0]
        return self.head(h.flatten(1))


def transformer_problem(n=6, seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randint(0, 11, (n, 3), generator=g)
    X[0, 1] = 0
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_transformer_step_is_the_kfac_operators_damped_inverse_of_the_gradient(fisher):
    """Attention projections and the embedding as Kronecker blocks (1-D input factor)."""
    model, loss_fn, X, y = transformer_problem()
    lam = 0.05
    for _ in range(2):
        before = flat(model)
        K = so.KFAC(model, loss_fn, (X, y), fisher=fisher)
        for name in ("emb.weight", "enc.self_attn.in_proj_weight", "cross.in_proj_weight"):
            assert K.structure[name] == "kronecker"
        assert any(b.A.ndim == 1 for b in K.blocks.values())
        expected = before - 0.7 * (K.inverse(lam) @ ref_grad(model, loss_fn, X, y))
        opt = so.KFACOptimizer(model, loss_fn, lr=0.7, damping=lam, fisher=fisher, **PLAIN)
        opt.step(X, y)
        torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


def test_transformer_resume_with_a_diagonal_factor_is_bit_for_bit():
    _, loss_fn, X, y = transformer_problem(n=12)

    def make(m):
        return so.KFACOptimizer(m, loss_fn, momentum=0.9, inverse_every=2, factor_decay=0.9)

    batches = [(X[i : i + 3], y[i : i + 3]) for i in range(0, 12, 3)] * 2
    saved = resumed_equals_uninterrupted(
        make, lambda seed: transformer_problem(n=12, seed=seed)[0], batches, 3
    )
    assert any(b["A"].ndim == 1 for b in saved["kfac"]["blocks"].values())


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (6, 2, 3, 3), (2, 2, 2, 2, 2), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_statistics_equal_var_mean(shape, dtype):
    from secondorder.optim.kfac_state import _batch_statistics

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2 + 0.5
    var, mean = torch.var_mean(x, tuple(d for d in range(x.ndim) if d != 1), correction=0)
    got_mean, got_var = _batch_statistics(x)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got_mean, mean, rtol=tol, atol=tol)
    torch.testing.assert_close(got_var, var, rtol=tol, atol=tol)


def test_resnet_factors_come_from_the_graph_engine(monkeypatch):
    """The ResNet's factor passes run on the per-sample graph engine, not autograd, and each
    step is the damped inverse of the operator built with the batch's statistics frozen."""
    from secondorder.curvature import kfac_autograd

    def refuse(*args, **kwargs):
        raise AssertionError("the autograd engine ran")

    monkeypatch.setattr(kfac_autograd, "autograd_layers", refuse)
    torch.manual_seed(0)
    model = SmallResNet().to(DT).train()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    loss_fn, lam = nn.CrossEntropyLoss(), 0.1
    frozen = copy.deepcopy(model).eval()  # normalising by the batch's statistics
    for name, m in frozen.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            var, mean = torch.var_mean(_input_of(model, name, X), (0, 2, 3), correction=0)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    K = so.KFAC(frozen, loss_fn, (X, y), fisher="exact")
    assert K.engine == "sequential"
    probe = copy.deepcopy(model)
    loss_fn(probe(X), y).backward()
    gvec = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    expected = flat(model) - K.inverse(lam) @ gvec
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **PLAIN)
    opt.step(X, y)
    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


def _input_of(model: nn.Module, name: str, X: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``name`` in a forward pass of a copy of ``model`` (train mode)."""
    twin = copy.deepcopy(model)
    got = []
    handle = twin.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    with torch.no_grad():
        twin(X)
    handle.remove()
    return got[0]


@pytest.mark.parametrize("kind", ["bn", "cnn", "subset", "float32"])
def test_plain_forward_equals_the_functional_call(monkeypatch, kind):
    """The loss pass calls the module itself (FunctionalModel.call_own): the same steps, bit for
    bit, as through functional_call."""
    from secondorder.curvature.model import FunctionalModel

    def run(plain: bool):
        if not plain:
            monkeypatch.setattr(FunctionalModel, "call_own", lambda fm, inp: fm(fm.params, inp))
        model, loss_fn, X, y = problem("cnn" if kind == "cnn" else "bn")
        model.train()
        kw: dict = {}
        if kind == "subset":
            kw["params"] = list(model[-1].parameters())
        if kind == "float32":
            model, X = model.float(), X.float()
        opt = so.KFACOptimizer(model, loss_fn, factor_every=2, damping_every=2, **kw)
        losses = [opt.step(X, y) for _ in range(4)]
        monkeypatch.undo()
        return flat(model), torch.stack(losses)

    got, want = run(True), run(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
