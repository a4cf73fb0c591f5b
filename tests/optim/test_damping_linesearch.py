"""The Levenberg-Marquardt rule, the reduction ratio and the Armijo line search, alone."""

from __future__ import annotations

import math

import pytest
import torch

from secondorder.optim.damping import levenberg_marquardt, reduction_ratio
from secondorder.optim.linesearch import armijo_backtracking

# --------------------------------------------------------------------- Levenberg-Marquardt


@pytest.mark.parametrize(
    ("rho", "factor"),
    [
        (-5.0, 1.5),
        (0.0, 1.5),
        (0.2499, 1.5),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (0.7501, 2 / 3),
        (1.0, 2 / 3),
        (40.0, 2 / 3),
        (math.nan, 1.5),
        (-math.inf, 1.5),
        (math.inf, 2 / 3),
    ],
)
def test_lm_rule(rho, factor):
    assert levenberg_marquardt(2.0, rho) == pytest.approx(2.0 * factor, rel=1e-15)


def test_lm_custom_factors_and_thresholds():
    kw = dict(decrease=0.5, increase=4.0, low=0.1, high=0.9)
    assert levenberg_marquardt(1.0, 0.05, **kw) == 4.0
    assert levenberg_marquardt(1.0, 0.5, **kw) == 1.0
    assert levenberg_marquardt(1.0, 0.95, **kw) == 0.5


def test_lm_bounds():
    assert levenberg_marquardt(1e-8, 1.0, min_damping=1e-8) == 1e-8
    assert levenberg_marquardt(100.0, -1.0, max_damping=120.0) == 120.0
    assert levenberg_marquardt(0.0, -1.0, min_damping=1e-6) == 1e-6  # zero damping recovers


def test_lm_repeated_success_and_failure_are_geometric():
    lam = 1.0
    for _ in range(3):
        lam = levenberg_marquardt(lam, 1.0)
    assert lam == pytest.approx((2 / 3) ** 3)
    for _ in range(3):
        lam = levenberg_marquardt(lam, -1.0)
    assert lam == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(damping=-1.0), "damping must be >= 0"),
        (dict(damping=math.inf), "damping must be a finite"),
        (dict(damping="a"), "damping must be a real number"),
        (dict(decrease=1.5), "decrease must be in"),
        (dict(decrease=0.0), "decrease must be in"),
        (dict(increase=0.5), "increase must be >= 1"),
        (dict(low=0.8, high=0.2), "low must be <= high"),
        (dict(min_damping=2.0, max_damping=1.0), "min_damping <= max_damping"),
        (dict(min_damping=-1.0), "min_damping <= max_damping"),
    ],
)
def test_lm_invalid_arguments(kwargs, match):
    args = dict(damping=1.0, rho=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        levenberg_marquardt(args.pop("damping"), args.pop("rho"), **args)


# --------------------------------------------------------------------- reduction ratio


def test_reduction_ratio_values_and_signs():
    assert reduction_ratio(10.0, 9.0, -2.0) == 0.5  # decrease as predicted by half
    assert reduction_ratio(10.0, 8.0, -2.0) == 1.0  # exactly as predicted
    assert reduction_ratio(10.0, 11.0, -2.0) == -0.5  # the loss rose
    assert reduction_ratio(torch.tensor(3.0), torch.tensor(2.0), torch.tensor(-4.0)) == 0.25


def test_reduction_ratio_guards():
    assert math.isnan(reduction_ratio(1.0, 0.5, 0.0))  # no division by zero
    assert math.isnan(reduction_ratio(1.0, 0.5, 1e-3))  # the model predicts an increase
    assert math.isnan(reduction_ratio(math.nan, 0.5, -1.0))
    assert math.isnan(reduction_ratio(1.0, math.nan, -1.0))
    assert math.isnan(reduction_ratio(1.0, 0.5, -math.inf))
    assert reduction_ratio(1.0, math.inf, -1.0) == -math.inf
    # a nan ratio makes the LM rule increase the damping
    assert levenberg_marquardt(1.0, reduction_ratio(1.0, 0.5, 0.0)) == 1.5


# --------------------------------------------------------------------- Armijo line search


def test_armijo_accepts_the_first_step_when_it_suffices():
    def f(a):  # f(0) = 1, f'(0) = -2, minimum at 1
        return (a - 1.0) ** 2

    alpha, value, info = armijo_backtracking(f, 1.0, -2.0)
    assert (alpha, value, info.success, info.evaluations) == (1.0, 0.0, True, 1)


def test_armijo_backtracks_to_the_first_admissible_step():
    # f(a) = (a - 0.3)^2: f(0) = 0.09, f'(0) = -0.6; Armijo holds for a <= 0.594
    calls = []

    def f(a):
        calls.append(a)
        return (a - 0.3) ** 2

    alpha, value, info = armijo_backtracking(f, 0.09, -0.6, c=1e-2, shrink=0.8)
    assert calls == pytest.approx([1.0, 0.8, 0.64, 0.512])
    assert alpha == pytest.approx(0.512) and value == pytest.approx((0.512 - 0.3) ** 2)
    assert info.success and info.evaluations == 4 and info.alphas == pytest.approx(calls)
    assert value <= 0.09 + 1e-2 * alpha * -0.6


def test_armijo_constant_and_start_matter():
    def f(a):
        return (a - 0.3) ** 2

    # with c close to 1 only steps near 0 satisfy f(a) <= f0 + c a f'(0) - none in 3 tries
    alpha, value, info = armijo_backtracking(f, 0.09, -0.6, c=0.99, max_steps=3)
    assert (alpha, value, info.success, info.evaluations) == (0.0, 0.09, False, 3)
    assert "alpha=0" in info.message
    alpha, _, info = armijo_backtracking(f, 0.09, -0.6, alpha0=0.5, shrink=0.5)
    assert alpha == 0.5 and info.evaluations == 1


def test_armijo_rejects_when_nothing_decreases():
    alpha, value, info = armijo_backtracking(lambda a: 1.0 + a, 1.0, -1.0, max_steps=5)
    assert alpha == 0.0 and value == 1.0 and not info.success and info.evaluations == 5


def test_armijo_treats_nan_as_failure_and_accepts_tensors():
    def f(a):
        return torch.tensor(math.nan) if a > 0.7 else torch.tensor((a - 0.3) ** 2)

    alpha, value, info = armijo_backtracking(f, 0.09, -0.6)
    assert alpha == pytest.approx(0.512) and isinstance(value, float)
    assert math.isnan(info.values[0]) and math.isnan(info.values[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(slope=0.0), "descent direction"),
        (dict(slope=1.0), "descent direction"),
        (dict(slope=math.nan), "descent direction"),
        (dict(f0=math.inf), "f0 must be finite"),
        (dict(alpha0=0.0), "alpha0"),
        (dict(c=1.0), "c must be"),
        (dict(c=0.0), "c must be"),
        (dict(shrink=1.0), "shrink must be"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=2.0), "max_steps"),
    ],
)
def test_armijo_invalid_arguments(kwargs, match):
    args = dict(f0=1.0, slope=-1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        armijo_backtracking(lambda a: 0.0, args.pop("f0"), args.pop("slope"), **args)
