"""HessianFree: acceptance (seed MLP, Rosenbrock), each switch, acc_step, state, rejections."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

from secondorder.experiments.models import Rosenbrock, RosenbrockResiduals, value_loss
from secondorder.optim.base import NonFiniteError, NonFiniteStepWarning
from secondorder.optim.hessian_free import HessianFree

DT = torch.float64


def seed_mlp(dtype=torch.float32, seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 10, bias=False), nn.ReLU(), nn.Linear(10, 10)).to(dtype)


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def batch(n=16, seed=1, d_in=4, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


EXACT = dict(  # every heuristic off and CG run to convergence: one damped Newton step
    adapt_damping=False,
    martens_stop=False,
    cg_rtol=1e-13,
    cg_maxiter=500,
    cg_decay_x0=0.0,
    preconditioner=None,
    use_cg_backtracking=False,
    use_linesearch=False,
)


# ------------------------------------------------------------------------------ acceptance
def test_seed_mlp_loss_falls_every_step():
    model = seed_mlp()
    loss_fn = nn.MSELoss()
    opt = HessianFree(model, loss_fn)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.rand(16, 10, generator=gen), torch.rand(16, 10, generator=gen)
        before = opt.step(x, y)
        with torch.no_grad():
            after = loss_fn(model(x), y)
        assert after < before
        d = opt.diagnostics
        assert d["accepted"] and d["new_loss"] == pytest.approx(float(after), rel=1e-5)
        assert d["cg_iterations"] >= 1 and d["step_norm"] > 0


def rosenbrock_run(model, loss_fn, target, steps, **kw):
    opt = HessianFree(model, loss_fn, **kw)
    x = torch.zeros(1, dtype=DT)
    values = []
    for _ in range(steps):
        opt.step(x, target)
        with torch.no_grad():
            values.append(float(loss_fn(model(x), target)))
    return values, opt


def test_rosenbrock_hessian_reaches_1e_6_within_20_steps():
    # Martens' (2010) HF takes the step without a line search; the monotone Armijo search
    # slows the walk along the curved valley (see the next test).
    values, _ = rosenbrock_run(
        Rosenbrock(dtype=DT), value_loss, None, 20, curvature="hessian", use_linesearch=False
    )
    assert min(values) < 1e-6
    assert values[-1] < 1e-6


def test_rosenbrock_hessian_with_line_search_is_monotone_and_converges():
    model = Rosenbrock(dtype=DT)
    values, _ = rosenbrock_run(model, value_loss, None, 25, curvature="hessian")
    start = 404.0
    assert all(b < a for a, b in zip([start, *values[:-1]], values))
    assert values[-1] < 1e-6
    assert torch.allclose(model.x.detach(), torch.ones(2, dtype=DT), atol=1e-3)


def test_rosenbrock_residuals_ggn_reaches_1e_6_within_20_steps():
    model = RosenbrockResiduals(dtype=DT)
    values, _ = rosenbrock_run(model, nn.MSELoss(reduction="sum"), torch.zeros(1, 2, dtype=DT), 20)
    assert values[-1] < 1e-6
    assert all(b < a for a, b in zip([404.0, *values[:-1]], values))


# The settings of the reference implementation's Rosenbrock example (PyTorchHessianFree,
# examples/run_rosenbrock.py): the Hessian, damping 1 adapted, CG backtracking, line search, no
# preconditioner, and its CG, which continues through negative curvature. It reaches 3.9e-8
# (float32) / 5.1e-7 (float64) after 20 steps.
REFERENCE_EXAMPLE = dict(curvature="hessian", negative_curvature="continue", preconditioner=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "settings",
    [REFERENCE_EXAMPLE, {**REFERENCE_EXAMPLE, "preconditioner": "empirical_fisher"}],
    ids=["reference_example", "with_preconditioner"],
)
def test_rosenbrock_hessian_reaches_1e_6_within_20_steps_like_the_reference(dtype, settings):
    values, _ = rosenbrock_run(Rosenbrock(dtype=dtype), value_loss, None, 20, **settings)
    assert values[-1] < 1e-6
    assert all(b < a for a, b in zip([404.0, *values[:-1]], values))  # Armijo: monotone


def test_continue_takes_the_damped_newton_step_through_negative_curvature():
    # At (-1, 3) the Hessian [[2, 400], [400, 200]] is indefinite; with lambda = 1 the damped
    # model has a saddle at -(H + I)^-1 g = (-2.5e-5, -1.99), in the valley: f = 4.01.
    model = Rosenbrock(dtype=DT)
    opt = HessianFree(model, value_loss, **REFERENCE_EXAMPLE)
    opt.step(torch.zeros(1, dtype=DT), None)
    H = torch.tensor([[2.0, 400.0], [400.0, 200.0]], dtype=DT)
    g = torch.tensor([796.0, 400.0], dtype=DT)
    newton = torch.tensor([-1.0, 3.0], dtype=DT) - torch.linalg.solve(H + torch.eye(2, dtype=DT), g)
    assert torch.allclose(model.x.detach(), newton, rtol=0, atol=1e-12)
    d = opt.diagnostics
    assert d["negative_curvature"] and d["cg_negative_directions"] == 1
    assert d["cg_status"] == "converged" and d["alpha"] == 1.0 and d["chosen_iterate"] == 2
    assert d["new_loss"] == pytest.approx(4.01, rel=1e-3)
    assert d["next_damping"] == pytest.approx(2 / 3)  # rho ~ 1: no bump in "continue" mode
    # "stop" (the default) ends CG before that direction: a short step, more damping
    stop = HessianFree(Rosenbrock(dtype=DT), value_loss, curvature="hessian", preconditioner=None)
    stop.step(torch.zeros(1, dtype=DT), None)
    assert stop.diagnostics["cg_status"] == "negative_curvature"
    assert stop.diagnostics["new_loss"] > 100 and stop.diagnostics["next_damping"] == 1.5


def test_continue_never_takes_an_ascent_step():
    # -|x|^2/2 + x_0 with lambda = 0.5: C + lambda I = -I/2, whose "Newton step" 2 g points
    # uphill; it is no candidate, and the damped gradient step is taken instead.
    model = Concave()
    opt = HessianFree(
        model,
        value_loss,
        damping=0.5,
        curvature="hessian",
        negative_curvature="continue",
        preconditioner=None,
    )
    before = opt.step(torch.zeros(1, dtype=DT), None)
    d = opt.diagnostics
    assert d["cg_negative_directions"] == 1 and d["fallback"] == "gradient"
    assert float(model().detach()) < float(before)


def test_negative_curvature_is_reported_and_raises_the_damping():
    opt = HessianFree(Rosenbrock(dtype=DT), value_loss, curvature="hessian")
    opt.step(torch.zeros(1, dtype=DT), None)
    d = opt.diagnostics
    assert d["negative_curvature"] and d["cg_status"] == "negative_curvature"
    assert d["next_damping"] == pytest.approx(1.5 * d["damping"])
    assert d["accepted"] and d["new_loss"] < 404.0


class Concave(nn.Module):
    """f(x) = -|x|^2 / 2 + x_0: negative curvature everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([0.5, -0.25], dtype=DT))

    def forward(self, inputs=None):
        return -0.5 * (self.x * self.x).sum() + self.x[0]


def test_gradient_fallback_without_a_descent_iterate():
    model = Concave()
    opt = HessianFree(model, value_loss, damping=0.5, curvature="hessian", preconditioner=None)
    x0 = model.x.detach().clone()
    before = opt.step(torch.zeros(1, dtype=DT), None)
    d = opt.diagnostics
    assert d["cg_iterations"] == 0 and d["negative_curvature"]
    assert d["fallback"] == "gradient" and d["chosen_iterate"] is None
    g = -x0 + torch.tensor([1.0, 0.0], dtype=DT)
    expected = x0 - d["alpha"] * g / 0.5  # delta = -g / lambda, scaled by the line search
    assert torch.allclose(model.x.detach(), expected, rtol=0, atol=1e-14)
    assert float(model().detach()) < float(before)


def test_quadratic_is_solved_in_one_step_and_rho_is_one():
    # linear least squares: GGN = Hessian, the quadratic model is exact
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DT)
    x, y = batch(20, d_in=5, d_out=2)
    loss_fn = nn.MSELoss(reduction="sum")
    opt = HessianFree(model, loss_fn, **{**EXACT, "damping": 1e-12, "min_damping": 1e-12})
    opt.step(x, y)
    X1 = torch.cat([x, torch.ones(20, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(X1, y).solution.T
    got = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)
    assert torch.allclose(got, sol, atol=1e-9)
    assert opt.diagnostics["rho"] == pytest.approx(1.0, abs=1e-8)


# ------------------------------------------------------------------------------ switches
def run_steps(model, n_steps=3, **kw):
    opt = HessianFree(model, nn.MSELoss(), **kw)
    diags = []
    for i in range(n_steps):
        x, y = batch(seed=10 + i)
        opt.step(x, y)
        diags.append(dict(opt.diagnostics))
    return opt, diags


@pytest.mark.parametrize(
    "switch",
    [
        dict(adapt_damping=False),
        dict(martens_stop=False),
        dict(cg_decay_x0=0.0),
        dict(preconditioner=None),
        dict(use_cg_backtracking=False),
        dict(use_linesearch=False),
        dict(curvature="hessian"),
        dict(curvature="hessian", negative_curvature="continue", damping=1e-2),
        dict(lr=0.5),
        dict(engine="autograd"),
        {**EXACT, "damping": 0.1},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())[:40],
)
def test_each_switch_runs(switch):
    _, diags = run_steps(tanh_mlp(), **switch)
    for d in diags:
        assert math.isfinite(d["loss"]) and d["cg_iterations"] >= 1
        for key in ("grad_norm", "cg_residual", "cg_status", "damping", "rho", "step_norm"):
            assert key in d
        assert {"accepted", "chosen_iterate", "alpha", "time_cg", "time_curvature"} <= set(d)


def test_switch_adapt_damping():
    _, on = run_steps(tanh_mlp(), damping=0.3)
    _, off = run_steps(tanh_mlp(), damping=0.3, adapt_damping=False)
    assert [d["damping"] for d in off] == [0.3] * 3
    assert len({d["damping"] for d in on}) > 1


def test_switch_martens_stop():
    kw = dict(damping=1e-3, cg_rtol=1e-14, cg_maxiter=200, preconditioner=None)
    _, on = run_steps(tanh_mlp(), n_steps=1, **kw)
    _, off = run_steps(tanh_mlp(), n_steps=1, martens_stop=False, **kw)
    assert on[0]["cg_status"] == "martens"
    assert off[0]["cg_status"] != "martens"
    assert off[0]["cg_iterations"] > on[0]["cg_iterations"]


def test_switch_warm_start():
    _, on = run_steps(tanh_mlp())
    _, off = run_steps(tanh_mlp(), cg_decay_x0=0.0)
    assert [d["warm_start"] for d in on] == [False, True, True]
    assert [d["warm_start"] for d in off] == [False, False, False]


def test_switch_preconditioner_solves_the_same_system():
    # converged PCG and CG give the same damped Newton step, in different iteration counts
    kw = {**EXACT, "damping": 0.05}
    m1, m2 = tanh_mlp(), tanh_mlp()
    opt1 = HessianFree(m1, nn.MSELoss(), **kw)
    opt2 = HessianFree(m2, nn.MSELoss(), **{**kw, "preconditioner": "empirical_fisher"})
    x, y = batch()
    opt1.step(x, y)
    opt2.step(x, y)
    assert torch.allclose(flat(m1), flat(m2), rtol=0, atol=1e-9)
    assert opt1.diagnostics["cg_iterations"] != opt2.diagnostics["cg_iterations"]


def test_switch_backtracking_and_linesearch():
    _, off = run_steps(tanh_mlp(), use_cg_backtracking=False, use_linesearch=False)
    for d in off:
        assert d["chosen_iterate"] == d["cg_iterations"] and d["alpha"] == 1.0
        assert d["loss_evaluations"] == 1
    _, on = run_steps(tanh_mlp(), n_steps=4, damping=1e-3)
    assert all(d["chosen_iterate"] <= d["cg_iterations"] for d in on)
    assert all(d["new_loss"] < d["loss"] for d in on)  # Armijo: a decrease on the batch


def test_lr_scales_the_exact_step():
    x, y = batch()
    m1, m2, m0 = tanh_mlp(), tanh_mlp(), tanh_mlp()
    HessianFree(m1, nn.MSELoss(), **{**EXACT, "damping": 0.1}).step(x, y)
    HessianFree(m2, nn.MSELoss(), lr=0.25, **{**EXACT, "damping": 0.1}).step(x, y)
    assert torch.allclose(flat(m2) - flat(m0), 0.25 * (flat(m1) - flat(m0)), atol=1e-12)


# ------------------------------------------------------------------------------ acc_step
def _halves_vs_whole(n_steps, **kw):
    m1, m2 = tanh_mlp(), tanh_mlp()
    opt1 = HessianFree(m1, nn.MSELoss(), damping=0.1, **kw)
    opt2 = HessianFree(m2, nn.MSELoss(), damping=0.1, **kw)
    errors = []
    for i in range(n_steps):
        x, y = batch(seed=20 + i)
        halves = [(x[:7], y[:7]), (x[7:], y[7:])]
        loss1 = opt1.step(x, y)
        loss2 = opt2.acc_step(halves, halves, halves)
        assert float(loss1) == pytest.approx(float(loss2), rel=1e-12)
        d1, d2 = opt1.diagnostics, opt2.diagnostics
        assert d1["cg_iterations"] == d2["cg_iterations"]
        assert d1["chosen_iterate"] == d2["chosen_iterate"] and d1["alpha"] == d2["alpha"]
        assert d1["damping"] == d2["damping"]
        errors.append(float((flat(m1) - flat(m2)).abs().max()))
    return errors


def test_acc_step_on_halves_equals_step_on_the_whole_batch():
    # every heuristic on except the warm start: three steps agree to rounding
    errors = _halves_vs_whole(3, cg_decay_x0=0.0)
    assert max(errors) <= 1e-10


def test_acc_step_on_halves_with_warm_start():
    # The first step (no warm start yet) agrees to rounding. Later steps start CG from
    # 0.95 * the previous solution, where r0 = b - A x0 is small and carries the rounding of
    # b and A x0 (different on halves and on the whole batch) with a large relative error;
    # truncated CG then follows slightly different paths (measured: ~1e-12, then ~1e-9).
    errors = _halves_vs_whole(3)
    assert errors[0] <= 1e-10
    assert max(errors) <= 1e-6


def _dense_problem(model, batches):
    """Loss, gradient and GGN (MSE mean, several batches) by torch.func on the concatenation."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def out(theta):
        parts = [t.view(s) for t, s in zip(theta.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), (x,))

    def loss(theta):
        return ((out(theta) - y) ** 2).mean()

    theta = flat(model)
    J = jacrev(out)(theta).reshape(y.numel(), -1)
    G = 2.0 / y.numel() * J.T @ J
    return loss, grad(loss)(theta), G


def test_acc_step_with_different_loss_gradient_and_curvature_data():
    model = tanh_mlp()
    lam = 0.2
    loss_data = [batch(5, seed=31), batch(3, seed=32)]
    grad_data = [batch(6, seed=33), batch(2, seed=34)]
    curv_data = [batch(4, seed=35)]
    theta0 = flat(model)
    loss_l, _, _ = _dense_problem(model, loss_data)
    _, g, _ = _dense_problem(model, grad_data)
    _, _, G = _dense_problem(model, curv_data)
    A = G + lam * torch.eye(G.shape[0], dtype=DT)
    delta = torch.linalg.solve(A, -g)

    opt = HessianFree(model, nn.MSELoss(), **{**EXACT, "damping": lam, "adapt_damping": True})
    returned = opt.acc_step(loss_data, grad_data, curv_data)
    assert float(returned) == pytest.approx(float(loss_l(theta0)), rel=1e-12)
    assert torch.allclose(flat(model), theta0 + delta, rtol=0, atol=1e-10)
    d = opt.diagnostics
    assert d["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    predicted = 0.5 * delta @ A @ delta + g @ delta
    rho = (loss_l(theta0 + delta) - loss_l(theta0)) / predicted
    assert d["rho"] == pytest.approx(float(rho), rel=1e-8)
    assert d["predicted_change"] == pytest.approx(float(predicted), rel=1e-8)


def test_acc_step_with_shared_gradient_and_curvature_data():
    model = tanh_mlp()
    lam = 0.3
    loss_data, data = batch(9, seed=41), [batch(4, seed=42), batch(4, seed=43)]
    theta0 = flat(model)
    loss_l, _, _ = _dense_problem(model, [loss_data])
    _, g, G = _dense_problem(model, data)
    delta = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=DT), -g)
    opt = HessianFree(model, nn.MSELoss(), **{**EXACT, "damping": lam})
    returned = opt.acc_step(loss_data, data, data)
    assert float(returned) == pytest.approx(float(loss_l(theta0)), rel=1e-12)
    assert torch.allclose(flat(model), theta0 + delta, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ errors
def test_param_groups_may_differ_only_in_decay_and_clipping():
    # (changed: several groups used to be refused outright; issue 16 asks for them)
    model = tanh_mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}]
    with pytest.raises(ValueError, match=r"param group 1: lr=0\.5 differs from the first"):
        HessianFree(model, nn.MSELoss(), params=groups)
    opt = HessianFree(model, nn.MSELoss(), params=[{"params": model[0].parameters()}])
    with pytest.raises(ValueError, match=r"damping=0\.5 differs"):
        opt.add_param_group({"params": model[2].parameters(), "damping": 0.5})
    assert len(opt.param_groups) == 1


def test_param_groups_with_their_own_weight_decay_step_like_one_group():
    torch.manual_seed(0)
    model = tanh_mlp()
    twin = copy.deepcopy(model)
    X, Y = batch(20)
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[2].bias]},
    ]
    opt = HessianFree(model, nn.MSELoss(), params=groups)
    ref = HessianFree(twin, nn.MSELoss())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(X, Y)
    ref.step(X, Y)
    lr = opt.param_groups[0]["lr"]
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        rate = lr * 0.1 if n.endswith("weight") else 0.0
        expected = before[n] * (1 - rate) + (q.detach() - before[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=0.0), "Invalid lr value: 0.0"),
        (dict(lr=-1.0), "Invalid lr value: -1.0"),
        (dict(damping=0.0), "Invalid damping value: 0.0"),
        (dict(damping=math.nan), "Invalid damping value: nan"),
        (dict(damping=1e-9), "Invalid damping value: 1e-09"),
        (dict(damping=1e9), "Invalid damping value: 1000000000.0"),
        (dict(cg_maxiter=0), "Invalid cg_maxiter value: 0"),
        (dict(cg_maxiter=2.5), "Invalid cg_maxiter value: 2.5"),
        (dict(cg_rtol=-1e-3), "Invalid cg_rtol value: -0.001"),
        (dict(martens_eps=0.0), "Invalid martens_eps value: 0.0"),
        (dict(cg_decay_x0=-0.5), "Invalid cg_decay_x0 value: -0.5"),
        (dict(cg_decay_x0=1.5), "Invalid cg_decay_x0 value: 1.5"),
        (dict(ls_c=1.0), "Invalid ls_c value: 1.0"),
        (dict(ls_shrink=0.0), "Invalid ls_shrink value: 0.0"),
        (dict(ls_shrink=1.2), "Invalid ls_shrink value: 1.2"),
        (dict(ls_max_steps=0), "Invalid ls_max_steps value: 0"),
        (dict(min_damping=0.0), "Invalid min_damping value: 0.0"),
        (dict(max_damping=math.inf), "Invalid max_damping value: inf"),
        (dict(curvature="fisher"), "curvature must be one of"),
        (dict(negative_curvature="ignore"), "negative_curvature must be one of"),
        (dict(preconditioner="jacobi"), "preconditioner must be one of"),
        (dict(use_linesearch=1), "use_linesearch must be a bool"),
        (dict(engine="fast"), "engine must be"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianFree(tanh_mlp(), nn.MSELoss(), **kwargs)


def test_invalid_data():
    opt = HessianFree(tanh_mlp(), nn.MSELoss())
    with pytest.raises(ValueError, match="loss_data"):
        opt.acc_step([], batch(), batch())


# ------------------------------------------------------------------------------ state, NaN
def test_state_dict_round_trip_continues_bit_for_bit():
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss())
    for i in range(2):
        opt.step(*batch(seed=50 + i))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert set(opt.global_state) >= {"step", "damping", "x0"}

    clone = tanh_mlp(seed=7)
    clone.load_state_dict(saved_model)
    opt2 = HessianFree(clone, nn.MSELoss())
    opt2.load_state_dict(saved_opt)
    for i in range(2, 4):
        x, y = batch(seed=50 + i)
        assert torch.equal(opt.step(x, y), opt2.step(x, y))
        assert torch.equal(flat(model), flat(clone))
        assert opt.diagnostics["damping"] == opt2.diagnostics["damping"]
    assert opt2.global_state["step"] == 4


def test_nan_batch_leaves_parameters_unchanged_and_raises_damping():
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss())
    opt.step(*batch(seed=60))
    lam = opt.global_state["damping"]
    before = flat(model)
    x, y = batch(seed=61)
    x[3, 1] = math.nan
    with pytest.warns(NonFiniteStepWarning, match="not finite"):
        opt.step(x, y)
    assert torch.equal(flat(model), before)
    d = opt.diagnostics
    assert not d["accepted"] and d["step_norm"] == 0.0
    assert opt.global_state["damping"] == pytest.approx(1.5 * lam)
    # the optimizer goes on normally afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(*batch(seed=62))
    assert opt.diagnostics["accepted"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_preconditioner_diagonal_rejects_the_step(bad, monkeypatch):
    # finite loss and gradient, but the empirical Fisher's diagonal overflowed
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss())
    real = opt._preconditioner_diagonal

    def broken(batches):
        d, path = real(batches)
        d[2] = bad
        return d, path

    monkeypatch.setattr(opt, "_preconditioner_diagonal", broken)
    before = flat(model)
    lam = opt._current_damping()
    with pytest.warns(NonFiniteStepWarning, match="preconditioner's diagonal is not usable"):
        opt.step(*batch(seed=63))
    assert torch.equal(flat(model), before)
    assert not opt.diagnostics["accepted"] and "NaN or Inf" in opt.diagnostics["rejected_reason"]
    assert opt.global_state["damping"] == pytest.approx(1.5 * lam)


def test_nan_with_on_nonfinite_raise():
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss(), on_nonfinite="raise")
    before = flat(model)
    x, y = batch()
    y[0, 0] = math.inf
    with pytest.raises(NonFiniteError):
        opt.step(x, y)
    assert torch.equal(flat(model), before)


def test_loss_along_equals_loss_at_the_trial_point():
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss())
    x, y = batch()
    batches = [opt._batch(x, y), opt._batch(x[:3], y[:3])]
    theta = flat(model)
    d = torch.randn(theta.shape, dtype=theta.dtype, generator=torch.Generator().manual_seed(1))
    for scale in (0.0, 0.3, -2.0):
        expected = opt.loss_at(theta + scale * d, batches)
        torch.testing.assert_close(opt.loss_along(d, scale, batches), expected)
    assert torch.equal(flat(model), theta)  # the parameters are not touched


def test_failed_line_search_rejects_the_step():
    model = tanh_mlp()
    opt = HessianFree(model, nn.MSELoss(), ls_max_steps=1, use_cg_backtracking=False)
    x, y = batch()
    original = opt.loss_along

    def worse(direction, scale, batches):  # every trial point looks worse than the start
        return original(direction, scale, batches) + 1.0

    opt.loss_along = worse  # type: ignore[method-assign]
    before = flat(model)
    opt.step(x, y)
    d = opt.diagnostics
    assert not d["accepted"] and d["alpha"] == 0.0 and "line search" in d["rejected_reason"]
    assert torch.equal(flat(model), before)
    assert d["next_damping"] == pytest.approx(1.5 * d["damping"])


def test_zero_gradient_is_a_no_op():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(DT)
    x = torch.randn(8, 3, dtype=DT)
    y = model(x).detach()  # the model fits exactly: zero loss and gradient
    opt = HessianFree(model, nn.MSELoss())
    before = flat(model)
    opt.step(x, y)
    assert torch.equal(flat(model), before)
    assert opt.diagnostics["cg_status"] == "zero_gradient"
