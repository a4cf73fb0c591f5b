"""The habits of torch.optim, over every optimizer: ``.grad``, weight decay, gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from test_contract import IDS, OPTIMIZERS, flat_params, make_opt, make_problem

# directions that are linear in the gradient (CG from zero, a fixed curvature): clipping the
# gradient by s scales the step by s
LINEAR_IN_GRADIENT = [
    n
    for n in IDS
    if OPTIMIZERS[n][0] in ("NewtonCG", "GaussNewton", "NaturalGradient")
    and not OPTIMIZERS[n][1].get("warm_start")
]


def autograd_grad(model, loss_fn, X, y):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(X), y)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("name", IDS)
def test_grad_holds_the_batch_gradient_after_a_step(name):
    model, loss_fn, X, y = make_problem()
    expected = autograd_grad(model, loss_fn, X, y)
    opt = make_opt(name, model, loss_fn)
    assert all(p.grad is None for p in model.parameters())
    opt.step(X, y)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    # the next step overwrites (does not accumulate) into the same buffers
    buffers = [p.grad for p in model.parameters()]
    expected = autograd_grad(model, loss_fn, X, y)
    opt.step(X, y)
    for p, b, g in zip(model.parameters(), buffers, expected):
        assert p.grad is b
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_weight_decay_is_decoupled(name):
    model, loss_fn, X, y = make_problem()
    twin = copy.deepcopy(model)
    plain = make_opt(name, twin, loss_fn)
    decayed = make_opt(name, model, loss_fn, weight_decay=0.1)
    lr = decayed.param_groups[0]["lr"]
    theta0 = flat_params(model)
    plain.step(X, y)
    decayed.step(X, y)
    step = flat_params(twin) - theta0
    expected = theta0 * (1 - lr * 0.1) + step
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in IDS if OPTIMIZERS[n][0] != "HessianFree"])
def test_weight_decay_per_param_group(name):
    model, loss_fn, X, y = make_problem()
    twin = copy.deepcopy(model)
    lr = OPTIMIZERS[name][1]["lr"]  # every optimizer with several groups sets it here

    def groups(m, wd):
        return [
            {"params": list(m[0].parameters()), "weight_decay": wd},
            {"params": list(m[2].parameters())},
        ]

    plain = make_opt(name, twin, loss_fn, params=groups(twin, 0.0))
    decayed = make_opt(name, model, loss_fn, params=groups(model, 0.2))
    before = [p.detach().clone() for p in model.parameters()]
    plain.step(X, y)
    decayed.step(X, y)
    for k, (p, q, p0) in enumerate(zip(model.parameters(), twin.parameters(), before)):
        rate = lr * 0.2 if k < 2 else 0.0
        torch.testing.assert_close(p, p0 * (1 - rate) + (q - p0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_max_grad_norm_clips_the_gradient_the_step_uses(name):
    model, loss_fn, X, y = make_problem()
    g = torch.cat([t.flatten() for t in autograd_grad(model, loss_fn, X, y)])
    limit = 0.25 * float(g.norm())
    twin = copy.deepcopy(model)
    plain = make_opt(name, twin, loss_fn)
    clipped = make_opt(name, model, loss_fn, max_grad_norm=limit)
    theta0 = flat_params(model)
    plain.step(X, y)
    clipped.step(X, y)
    assert clipped.diagnostics["grad_clip"] == pytest.approx(0.25, rel=1e-10)
    assert plain.diagnostics["grad_clip"] == 1.0
    # .grad keeps the unclipped batch gradient
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), g)
    if name in LINEAR_IN_GRADIENT:
        torch.testing.assert_close(
            flat_params(model) - theta0, 0.25 * (flat_params(twin) - theta0), rtol=1e-6, atol=1e-12
        )
    # a limit above the norm changes nothing
    model2, *_ = make_problem()
    loose = make_opt(name, model2, loss_fn, max_grad_norm=10 * float(g.norm()))
    loose.step(X, y)
    assert loose.diagnostics["grad_clip"] == 1.0
    torch.testing.assert_close(flat_params(model2), flat_params(twin), rtol=0, atol=0)


@pytest.mark.parametrize("name", IDS)
def test_a_state_saved_without_the_new_hyperparameters_loads_with_their_defaults(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn, weight_decay=0.0)
    opt.step(X, y)
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        del group["weight_decay"], group["max_grad_norm"]
    fresh = make_opt(name, make_problem()[0], loss_fn, weight_decay=0.3, max_grad_norm=2.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["weight_decay"] == 0.3
    assert fresh.param_groups[0]["max_grad_norm"] == 2.0


@pytest.mark.parametrize("bad", [{"weight_decay": -1.0}, {"max_grad_norm": -2.0}])
@pytest.mark.parametrize("name", IDS)
def test_invalid_values_are_refused_at_construction(name, bad):
    model, loss_fn, *_ = make_problem()
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"Invalid {key} value"):
        make_opt(name, model, loss_fn, **bad)


@pytest.mark.parametrize("name", IDS)
def test_casting_the_model_after_construction_is_followed(name):
    model, loss_fn, X, y = make_problem()  # float64
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    model.float()
    opt.step(X.float(), y)
    assert opt.diagnostics["accepted"], opt.diagnostics.get("rejected_reason")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for value in opt.global_state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype == torch.float32
    # and the step is the one a fresh optimizer with the same state would take
    twin = copy.deepcopy(model)
    fresh = make_opt(name, twin, loss_fn)
    fresh.load_state_dict(opt.state_dict())
    opt.step(X.float(), y)
    fresh.step(X.float(), y)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=0, atol=0)


@pytest.mark.parametrize("name", IDS)
def test_momentum_is_heavy_ball_on_the_step(name):
    model, loss_fn, X, y = make_problem()
    twin = copy.deepcopy(model)
    plain = make_opt(name, twin, loss_fn)
    heavy = make_opt(name, model, loss_fn, momentum=0.5)
    theta0 = flat_params(model)
    plain.step(X, y)
    heavy.step(X, y)
    theta1 = flat_params(model)
    torch.testing.assert_close(theta1, flat_params(twin), rtol=0, atol=0)  # no buffer yet
    plain.step(X, y)
    heavy.step(X, y)
    # v2 = d2 + 0.5 v1 with lr v1 = theta1 - theta0
    expected = flat_params(twin) + 0.5 * (theta1 - theta0)
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-12)
    assert "momentum_buffer" in heavy.global_state
    assert "momentum_buffer" not in plain.global_state


@pytest.mark.parametrize("name", IDS)
def test_one_cycle_lr_works_unchanged(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
    seen = set()
    for _ in range(5):
        opt.step(X, y)
        scheduler.step()
        seen.add((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        assert opt.diagnostics["accepted"], opt.diagnostics.get("rejected_reason")
    assert len(seen) == 5  # both are driven by the scheduler
