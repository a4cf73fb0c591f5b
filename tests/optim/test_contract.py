"""The optimizer contract, checked once for every optimizer (STYLE.md habits 10-12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so

DT = torch.float64


def _get(name):
    cls = getattr(so, name, None)
    if cls is None:
        pytest.skip(f"so.{name} not available")
    return cls


# name -> (class name, kwargs); every optimizer with settings that make small steps
OPTIMIZERS = {
    "newton_cg_ggn": ("NewtonCG", dict(lr=0.5, damping=1e-2, curvature="ggn")),
    "newton_cg_hessian": ("NewtonCG", dict(lr=0.5, damping=1.0, curvature="hessian")),
    "gauss_newton_warm": ("GaussNewton", dict(lr=0.5, damping=1e-2, warm_start=True)),
    "natural_gradient_exact": ("NaturalGradient", dict(lr=0.5, damping=1e-2, fisher="exact")),
    "natural_gradient_mc": (
        "NaturalGradient",
        dict(lr=0.5, damping=1e-2, fisher="mc", generator=torch.Generator().manual_seed(1)),
    ),
    "natural_gradient_empirical": (
        "NaturalGradient",
        dict(lr=0.5, damping=1e-2, fisher="empirical"),
    ),
    "hessian_free": ("HessianFree", dict(damping=1.0)),
    "block_newton_ggn": ("BlockDiagonalNewtonCG", dict(lr=0.1, damping=1e-2, curvature="ggn")),
    "block_newton_pch": ("BlockDiagonalNewtonCG", dict(lr=0.1, damping=1e-2, curvature="pch_abs")),
    "directional": ("DirectionalDampedNewton", dict(lr=0.5)),
    "kfac": (
        "KFACOptimizer",
        dict(lr=0.5, damping=1e-2, factor_every=1, inverse_every=2, kl_clip=None),
    ),
}
IDS = list(OPTIMIZERS)


def make_problem(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def make_opt(name, model, loss_fn, **override):
    cls_name, kwargs = OPTIMIZERS[name]
    cls = _get(cls_name)
    kwargs = {
        k: (copy.deepcopy(v) if isinstance(v, torch.Generator) else v) for k, v in kwargs.items()
    }
    if "generator" in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(1)
    kwargs.update(override)
    return cls(model, loss_fn, **kwargs)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", IDS)
def test_step_returns_loss_before_and_diagnostics(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    assert isinstance(opt, torch.optim.Optimizer)
    before = loss_fn(model(X), y).item()
    theta0 = flat_params(model)
    loss = opt.step(X, y)
    assert float(loss) == pytest.approx(before, rel=1e-12)
    diag = opt.diagnostics
    for key in ("loss", "grad_norm", "step_norm", "accepted"):
        assert key in diag, key
    assert diag["accepted"] is True
    assert diag["step_norm"] > 0
    assert diag["step_norm"] == pytest.approx((flat_params(model) - theta0).norm().item(), rel=1e-9)
    if "cg_iterations" in diag:
        assert diag["cg_iterations"] >= 1


@pytest.mark.parametrize("name", IDS)
def test_state_dict_round_trip_is_bit_exact(name):
    model, loss_fn, X, y = make_problem()
    batches = [(X[i::2], y[i::2]) for i in range(2)]
    reference_model = copy.deepcopy(model)
    ref = make_opt(name, reference_model, loss_fn)
    for k in range(4):
        ref.step(*batches[k % 2])
    # stop after two steps, save, rebuild, load, continue
    opt = make_opt(name, model, loss_fn)
    for k in range(2):
        opt.step(*batches[k % 2])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    fresh_model = make_problem()[0]
    fresh_model.load_state_dict(saved_model)
    fresh = make_opt(name, fresh_model, loss_fn)
    fresh.load_state_dict(saved_opt)
    for k in range(2, 4):
        fresh.step(*batches[k % 2])
    assert torch.equal(flat_params(fresh_model), flat_params(reference_model))


@pytest.mark.parametrize("name", IDS)
def test_lr_scheduler_drives_lr(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    opt.step(X, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)
    opt.step(X, y)  # still steps after the scheduler wrapped `step`
    assert opt.diagnostics["accepted"]


@pytest.mark.parametrize("name", IDS)
def test_nan_batch_leaves_parameters_unchanged(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    theta = flat_params(model)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(so.NonFiniteStepWarning, match="rejected"):
        opt.step(bad, y)
    assert torch.equal(flat_params(model), theta)
    assert opt.diagnostics["accepted"] is False
    # (changed: it warned once per run; issue 16 asks for every rejection, with its reason)
    count = opt.global_state["rejections"]
    with pytest.warns(so.NonFiniteStepWarning, match=r"step \d+ rejected: "):
        opt.step(bad, y)
    assert opt.global_state["rejections"] == count + 1
    assert torch.equal(flat_params(model), theta)
    opt.step(X, y)  # recovers on good data
    assert opt.diagnostics["accepted"]


@pytest.mark.parametrize("name", IDS)
def test_overflowing_model_raises_when_asked(name):
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * 1e30  # float32 overflow to inf

    torch.manual_seed(0)
    model = Overflow()
    X = torch.randn(8, 4) * 1e10
    y = torch.randint(0, 3, (8,))
    opt = make_opt(name, model, nn.CrossEntropyLoss(), on_nonfinite="raise")
    theta = flat_params(model)
    with pytest.raises(so.NonFiniteError, match="rejected"):
        opt.step(X, y)
    assert torch.equal(flat_params(model), theta)


@pytest.mark.parametrize("name", IDS)
def test_invalid_lr_is_refused(name):
    model, loss_fn, _, _ = make_problem()
    with pytest.raises(ValueError, match="Invalid lr value: -1"):
        make_opt(name, model, loss_fn, lr=-1.0)


@pytest.mark.parametrize("name", IDS)
def test_float32_parameters(name):
    model, loss_fn, X, y = make_problem()
    model = model.float()
    opt = make_opt(name, model, loss_fn)
    opt.step(X.float(), y)
    assert opt.diagnostics["accepted"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", IDS)
def test_step_hooks_run_once_per_step(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.step(X, y)
    assert calls == ["pre", "post"]


def test_step_wrapper_keeps_torch_semantics():
    # global hooks, argument-replacing pre-hooks, and the profiler range while profiling
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model, loss_fn, X, y = make_problem()
    opt = make_opt(IDS[0], model, loss_fn)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("global post")),
    ]
    with torch.no_grad():
        expected = float(loss_fn(model(X[:3]), y[:3]))  # the loss on the hook's batch
    try:
        opt.register_step_pre_hook(lambda o, args, kwargs: ((o, X[:3], y[:3]), kwargs))
        opt.step(X, y)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "global post"]
    assert opt.diagnostics["loss"] == pytest.approx(expected, rel=1e-6)
    bad = make_opt(IDS[0], model, loss_fn)
    bad.register_step_pre_hook(lambda *a: "not a tuple")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        bad.step(X, y)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(X, y)
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{type(opt).__name__}.step" in names
