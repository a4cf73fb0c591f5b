"""The pieces of a Hessian-free step, each alone, and HessianFree composing replacements."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from secondorder.linalg.cg import CGStatus, cg
from secondorder.linalg.cg_callbacks import CallbackList, IterateGrid, MartensStop
from secondorder.linalg.operator import Dense
from secondorder.linalg.preconditioners import JacobiPreconditioner
from secondorder.optim.damping import levenberg_marquardt
from secondorder.optim.hessian_free import HessianFree
from secondorder.optim.hessian_free_parts import (
    ArmijoLineSearch,
    Candidate,
    LevenbergMarquardt,
    cg_backtracking,
    descent_candidates,
    nan_as_inf,
    predicted_change,
    truncated_cg,
)
from secondorder.optim.linesearch import armijo_backtracking

DT = torch.float64


def _symmetric(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ Q.T


# ------------------------------------------------------------------------------ truncated_cg
@pytest.mark.parametrize("through", ["stop", "continue"])
def test_truncated_cg_is_cg_with_martens_and_the_grid(through):
    A = Dense(_symmetric(list(torch.logspace(-3, 1, 60).tolist()), seed=1))
    b = torch.linspace(-1, 1, 60, dtype=DT)
    x, info, kept = truncated_cg(A, b, rtol=0.0, maxiter=200, negative_curvature=through)
    grid = IterateGrid(1.3, keep_before_negative=through == "continue")
    y, ref = cg(A, b, rtol=0.0, maxiter=200, callback=CallbackList([grid, MartensStop(5e-4)]))
    assert info.status == ref.status == CGStatus.CALLBACK and info.iterations == ref.iterations
    assert torch.equal(x, y)
    expected = grid.snapshots(y, ref)
    assert [k for k, _, _ in kept] == [k for k, _, _ in expected]
    assert all(torch.equal(a, c) and p == q for (_, a, p), (_, c, q) in zip(kept, expected))


def test_truncated_cg_switches():
    A = Dense(_symmetric(list(torch.logspace(-3, 1, 60).tolist()), seed=1))
    b = torch.linspace(-1, 1, 60, dtype=DT)
    _, info, kept = truncated_cg(A, b, rtol=0.0, maxiter=40, martens_eps=None)
    assert info.status == CGStatus.MAXITER and info.iterations == 40 and len(kept) > 10
    _, info, kept = truncated_cg(A, b, rtol=0.0, maxiter=200, backtracking_gamma=None)
    assert kept == [] and info.status == CGStatus.CALLBACK and info.iterations < 200


def test_truncated_cg_keeps_the_iterate_before_negative_curvature():
    A = Dense(_symmetric([-0.2, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0, 11.0, 14.0], seed=2))
    b = torch.ones(10, dtype=DT)
    y, ref = cg(A, b, rtol=1e-12, maxiter=50)
    assert ref.status == CGStatus.NEGATIVE_CURVATURE and ref.iterations == 6
    _, _, kept = truncated_cg(A, b, rtol=1e-12, maxiter=50, negative_curvature="continue")
    assert torch.equal(dict((k, v) for k, v, _ in kept)[6], y)  # off the grid, kept anyway
    _, _, stop = truncated_cg(A, b, rtol=1e-12, maxiter=50, negative_curvature="stop")
    assert [k for k, _, _ in stop] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------- candidates and backtracking
def test_descent_candidates_filter_and_fallback():
    A = _symmetric([1.0, 2.0, 3.0], seed=3)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    kept = [(1, -g, -1.0), (2, g, 2.0), (4, -2 * g, -3.0)]  # the second one ascends
    cands, fallback = descent_candidates(kept, g, lambda v: A @ v, 0.5)
    assert not fallback and [c.iteration for c in cands] == [1, 4]
    assert cands[1].slope == pytest.approx(-2 * float(g @ g)) and cands[1].phi == -3.0
    # nothing descends: the damped gradient step -g / lambda with its exact model value
    cands, fallback = descent_candidates([(3, g, 1.0)], g, lambda v: A @ v, 0.5)
    (only,) = cands
    delta = -g / 0.5
    assert fallback and only.iteration == 0 and torch.equal(only.step, delta)
    assert only.phi == pytest.approx(float(0.5 * delta @ A @ delta + g @ delta), rel=1e-14)
    assert only.slope == pytest.approx(float(g @ delta), rel=1e-14)


@pytest.mark.parametrize(
    ("losses", "chosen", "evaluated"),
    [
        ([5.0, 4.0, 3.0, 2.0], 3, [3, 2]),  # the last is best: one look back, then stop
        ([5.0, 1.0, 3.0, 2.0], 3, [3, 2]),  # the one before the last is worse: stop
        ([5.0, 4.0, 1.5, 2.0], 2, [3, 2, 1]),  # better once, then worse
        ([0.5, 1.0, 1.5, 2.0], 0, [3, 2, 1, 0]),  # better all the way back
        ([1.0, 1.0, 1.0, 1.0], 3, [3, 2]),  # ties are not improvements
        ([math.inf, math.inf, math.inf, math.inf], 3, [3, 2]),
    ],
)
def test_cg_backtracking_order_and_choice(losses, chosen, evaluated):
    cands = [Candidate(k, torch.tensor([float(k)]), -1.0, -1.0) for k in range(4)]
    seen = []

    def loss(step):
        seen.append(int(step))
        return losses[int(step)]

    best, value = cg_backtracking(cands, loss)
    assert best.iteration == chosen and value == losses[chosen] and seen == evaluated
    with pytest.raises(ValueError, match="at least one candidate"):
        cg_backtracking([], loss)


def test_predicted_change_is_the_model_along_the_scaled_step():
    A = _symmetric([1.0, 2.0, 5.0], seed=4)
    g = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    d = torch.tensor([-0.5, 0.2, -0.1], dtype=DT)
    phi, slope = float(0.5 * d @ A @ d + g @ d), float(g @ d)
    for lr in (1.0, 0.3, 2.0):
        s = lr * d
        assert predicted_change(phi, slope, lr) == pytest.approx(
            float(0.5 * s @ A @ s + g @ s), rel=1e-13
        )
    assert nan_as_inf(math.nan) == math.inf and nan_as_inf(2.0) == 2.0


# ------------------------------------------------------------ damping rule and line search
@pytest.mark.parametrize("rho", [math.nan, -1.0, 0.1, 0.5, 0.9, 2.0])
def test_levenberg_marquardt_rule_equals_the_function(rho):
    rule = LevenbergMarquardt(min_damping=1e-3, max_damping=10.0)
    for lam in (1e-3, 0.5, 10.0):
        assert rule(lam, rho) == levenberg_marquardt(lam, rho, min_damping=1e-3, max_damping=10.0)
    assert "min_damping=0.001" in repr(rule)
    with pytest.raises(ValueError, match="increase must be >= 1"):
        LevenbergMarquardt(increase=0.5)


def test_armijo_line_search_equals_the_function():
    def f(a):
        return (a - 0.3) ** 2

    search = ArmijoLineSearch(c=0.1, shrink=0.5, max_steps=10)
    alpha, value, info = search(f, f(0.0), -0.6)
    ref = armijo_backtracking(f, f(0.0), -0.6, c=0.1, shrink=0.5, max_steps=10)
    assert (alpha, value) == ref[:2] and info.alphas == ref[2].alphas and alpha == 0.5
    assert "ArmijoLineSearch(c=0.1" in repr(search)


# ------------------------------------------------------------------ composed replacements
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(steps=3, **kw):
    model = _mlp()
    opt = HessianFree(model, nn.MSELoss(), **kw)
    diags = []
    for _ in range(steps):
        opt.step(*_data())
        diags.append(dict(opt.diagnostics))
    return _flat(model), diags


def test_the_default_pieces_passed_explicitly_change_nothing():
    default, d0 = _run()
    explicit, d1 = _run(
        damping_rule=LevenbergMarquardt(min_damping=1e-8, max_damping=1e8),
        linesearch=ArmijoLineSearch(1e-2, 0.8, 30),
    )
    assert torch.equal(default, explicit)
    assert [d["next_damping"] for d in d0] == [d["next_damping"] for d in d1]


def test_a_damping_rule_is_used():
    calls = []

    def halve(damping, rho):
        calls.append((damping, rho))
        return damping / 2

    _, diags = _run(damping_rule=halve, damping=1.0)
    assert [d["next_damping"] for d in diags] == [0.5, 0.25, 0.125]
    assert [c[0] for c in calls] == [1.0, 0.5, 0.25]
    assert all(c[1] == d["rho"] for c, d in zip(calls, diags))


def test_a_line_search_is_used():
    seen = []

    def half_step(f, f0, slope):
        seen.append((f0, slope))
        value = f(0.5)

        class Info:
            message = "half"

        return 0.5, value, Info

    _, diags = _run(linesearch=half_step, steps=2)
    assert [d["alpha"] for d in diags] == [0.5, 0.5] and diags[0]["linesearch"] == "half"
    assert len(seen) == 2 and all(slope < 0 for _, slope in seen)


def test_a_preconditioner_builder_is_used():
    opt = HessianFree(_mlp(), nn.MSELoss())
    x, y = _data()
    d, _ = opt._preconditioner_diagonal([opt._batch(x, y)])
    built = []

    def jacobi(batches, damping):  # the default preconditioner, built by hand
        built.append(damping)
        return JacobiPreconditioner(d.clone(), damping=damping, exponent=0.75)

    theta_default, _ = _run(steps=1)
    theta_custom, _ = _run(steps=1, preconditioner=jacobi)
    assert built == [1.0] and torch.equal(theta_default, theta_custom)
    # a builder returning None runs plain CG, as preconditioner=None
    theta_none, _ = _run(steps=1, preconditioner=None)
    theta_builder_none, _ = _run(steps=1, preconditioner=lambda batches, damping: None)
    assert torch.equal(theta_none, theta_builder_none)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(damping_rule=2.0), "damping_rule must be None or callable"),
        (dict(linesearch="armijo"), "linesearch must be None or callable"),
        (dict(preconditioner=3), "preconditioner must be one of"),
    ],
)
def test_invalid_pieces(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianFree(_mlp(), nn.MSELoss(), **copy.deepcopy(kwargs))
