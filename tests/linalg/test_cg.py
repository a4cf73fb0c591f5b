"""Tests for secondorder.linalg.cg: scipy equivalence, stopping rules, breakdowns, contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from secondorder.linalg.cg import CGInfo, CGStatus, cg
from secondorder.linalg.cg_callbacks import CallbackList, CGState, IterateGrid, MartensStop
from secondorder.linalg.operator import Dense, Diagonal, Identity

F64 = torch.float64


# ------------------------------------------------------------------ problems
def _spd(eigenvalues: Tensor, seed: int) -> Tensor:
    """Random orthogonal Q, A = Q diag(eigenvalues) Q^T (float64, symmetrised)."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def _poisson2d(k: int) -> sp.csr_matrix:
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(k, k), dtype=np.float64)
    eye = sp.eye(k, dtype=np.float64)
    return sp.csr_matrix(sp.kron(eye, t) + sp.kron(t, eye))


def _problem(name: str) -> tuple[Tensor, object, Tensor]:
    """Return (dense torch matrix, the matrix handed to scipy, b)."""
    g = torch.Generator().manual_seed(11)
    if name == "clustered":
        n = 120
        eig = torch.cat(
            [
                1 + 0.01 * torch.rand(40, generator=g, dtype=F64),
                10 + 0.1 * torch.rand(40, generator=g, dtype=F64),
                100 + torch.rand(40, generator=g, dtype=F64),
            ]
        )
        a = _spd(eig, seed=1)
        a_sp: object = a.numpy()
    elif name == "geometric":
        n = 120
        a = _spd(torch.logspace(0.0, 1.2, n, dtype=F64), seed=2)
        a_sp = a.numpy()
    elif name == "poisson":
        p = _poisson2d(10)
        n = p.shape[0]
        a = torch.from_numpy(p.toarray())
        a_sp = p
    elif name == "badly_scaled":
        n = 100
        c = _spd(torch.linspace(1.0, 3.0, n, dtype=F64), seed=3)
        s = torch.logspace(-0.5, 0.5, n, dtype=F64).sqrt()
        a = s[:, None] * c * s[None, :]
        a = 0.5 * (a + a.T)
        a_sp = a.numpy()
    else:  # pragma: no cover
        raise KeyError(name)
    b = torch.randn(n, generator=g, dtype=F64)
    return a, a_sp, b


PROBLEMS = ["clustered", "geometric", "poisson", "badly_scaled"]


def _record() -> tuple[list[Tensor], object]:
    xs: list[Tensor] = []
    return xs, lambda x: xs.append(x.clone())


# ------------------------------------------------------- scipy equivalence
@pytest.mark.parametrize("use_x0", [False, True], ids=["x0=None", "x0"])
@pytest.mark.parametrize("precond", [None, "jacobi"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_iterates_match_scipy(problem: str, precond: str | None, use_x0: bool) -> None:
    a, a_sp, b = _problem(problem)
    n = b.numel()
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=F64) if use_x0 else None
    if precond is None:
        m_ours, m_sp = None, None
    else:
        dinv = 1.0 / a.diagonal()
        m_ours, m_sp = Diagonal(dinv), sp.diags(dinv.numpy())

    ours, cb = _record()
    x, info = cg(Dense(a, psd=True), b, x0, rtol=1e-8, M=m_ours, callback=cb)
    ref: list[np.ndarray] = []
    x_sp, info_sp = spla.cg(
        a_sp,
        b.numpy(),
        None if x0 is None else x0.numpy(),
        rtol=1e-8,
        M=m_sp,
        callback=lambda xk: ref.append(np.array(xk, copy=True)),
    )

    assert info_sp == 0
    assert info.status == CGStatus.CONVERGED and info.converged
    assert info.iterations == len(ours) == len(ref)
    assert 3 <= len(ref) < n  # a real multi-step solve, before finite-precision chaos
    for k, (xk, rk) in enumerate(zip(ours, ref)):
        err = np.linalg.norm(xk.numpy() - rk) / np.linalg.norm(rk)
        assert err <= 1e-10, f"iterate {k + 1}: relative difference {err:.2e}"
    np.testing.assert_allclose(x.numpy(), x_sp, rtol=1e-10, atol=1e-12)
    # the recorded residual norms are those of the iterates
    assert len(info.residual_norms) == info.iterations + 1
    assert info.residual_norms[-1] <= info.tol == pytest.approx(1e-8 * float(b.norm()))
    true_res = float((b - a @ x).norm())
    assert true_res == pytest.approx(info.residual_norms[-1], rel=1e-3, abs=1e-12)


@pytest.mark.parametrize("form", ["tensor", "operator", "callable"])
def test_operator_forms_agree(form: str) -> None:
    a, _, b = _problem("geometric")
    reference, _ = cg(Dense(a), b, rtol=1e-10)
    op = {"tensor": a, "operator": Dense(a), "callable": lambda v: a @ v}[form]
    x, info = cg(op, b, rtol=1e-10)
    assert info.converged
    torch.testing.assert_close(x, reference, rtol=0, atol=0)


def test_damped_operator_algebra() -> None:
    a, _, b = _problem("clustered")
    n = b.numel()
    x, info = cg(Dense(a) + 0.5 * Identity(n, dtype=F64), b, rtol=1e-12)
    expected = torch.linalg.solve(a + 0.5 * torch.eye(n, dtype=F64), b)
    assert info.converged
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ maxiter
def test_maxiter_one_runs_exactly_one_iteration() -> None:
    a, _, b = _problem("poisson")
    calls, cb = _record()
    x, info = cg(a, b, maxiter=1, callback=cb)
    assert len(calls) == 1
    assert info.iterations == 1
    assert info.status == CGStatus.MAXITER and int(info.status) == 1
    assert not info.converged
    assert "maxiter" in info.message
    assert len(info.residual_norms) == 2 and len(info.quadratic_values) == 2
    # one exact CG step from 0 is the steepest-descent step with exact line search
    alpha = float(b @ b) / float(b @ a @ b)
    torch.testing.assert_close(x, alpha * b)
    torch.testing.assert_close(calls[0], x)


def test_maxiter_zero_returns_initial_guess() -> None:
    a, _, b = _problem("poisson")
    x0 = torch.ones_like(b)
    calls, cb = _record()
    x, info = cg(a, b, x0, maxiter=0, callback=cb)
    assert calls == [] and info.iterations == 0 and info.status == CGStatus.MAXITER
    assert info.num_matvecs == 1
    torch.testing.assert_close(x, x0)
    assert x.data_ptr() != x0.data_ptr()


def test_default_maxiter_is_ten_n() -> None:
    # atol far below rounding is never met, so the default cap of 10 * n iterations applies
    n = 3
    a = _spd(torch.tensor([1.0, 2.0, 5.0], dtype=F64), seed=0)
    _, info = cg(a, torch.ones(n, dtype=F64), rtol=0.0, atol=1e-300)
    assert info.status == CGStatus.MAXITER
    assert info.iterations == info.num_matvecs == 10 * n


def test_initial_guess_that_solves_stops_at_zero_iterations() -> None:
    a, _, b = _problem("clustered")
    x_star = torch.linalg.solve(a, b)
    x, info = cg(a, b, x_star, rtol=1e-6)
    assert info.iterations == 0 and info.status == CGStatus.CONVERGED
    torch.testing.assert_close(x, x_star)


def test_zero_rhs_returns_zero() -> None:
    a, _, b = _problem("poisson")
    x, info = cg(a, torch.zeros_like(b))
    assert info.status == CGStatus.CONVERGED and info.iterations == 0
    assert torch.count_nonzero(x) == 0


# ------------------------------------------------------- quadratic model
def test_quadratic_values_are_phi_of_iterates() -> None:
    a, _, b = _problem("geometric")
    x0 = 0.1 * torch.ones_like(b)
    xs, cb = _record()
    _, info = cg(a, b, x0, rtol=1e-8, callback=cb)
    for xk, phi in zip([x0, *xs], info.quadratic_values, strict=True):
        expected = float(0.5 * xk @ a @ xk - b @ xk)
        assert phi == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # CG decreases the quadratic model monotonically
    assert all(p1 <= p0 + 1e-12 for p0, p1 in zip(info.quadratic_values, info.quadratic_values[1:]))


def _martens_expected_stop(phis: list[float], eps: float) -> int | None:
    """Independent evaluation of Martens' rule on a recorded phi sequence."""
    for i in range(1, len(phis)):
        k = max(10, math.ceil(i / 10))
        if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps:
            return i
    return None


@pytest.mark.parametrize("eps", [5e-4, 1e-5])
def test_martens_rule_stops_where_the_formula_says(eps: float) -> None:
    # slowly converging problem: a wide spectrum, n large enough for > 10 iterations
    n = 400
    a = _spd(torch.logspace(-3.0, 1.0, n, dtype=F64), seed=7)
    b = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    xs, cb = _record()
    _, full = cg(a, b, rtol=0.0, atol=0.0, maxiter=300, callback=cb)
    assert full.status == CGStatus.MAXITER
    expected = _martens_expected_stop(full.quadratic_values, eps)
    assert expected is not None and 11 <= expected < 300

    rule = MartensStop(eps)
    x, info = cg(a, b, rtol=0.0, atol=0.0, maxiter=300, callback=rule)
    assert info.status == CGStatus.CALLBACK and info.converged and rule.stopped_at == expected
    assert info.iterations == expected
    assert info.quadratic_values == full.quadratic_values[: expected + 1]
    torch.testing.assert_close(x, xs[expected - 1], rtol=0, atol=0)
    assert "callback" in info.message


def test_martens_rule_alone_on_a_phi_sequence() -> None:
    # the rule as a pure function of the recorded phi values (no solve)
    phis = [0.0] + [-1.0 + 0.5**i for i in range(1, 40)]
    rule = MartensStop(1e-3)
    stops = [
        i
        for i in range(1, len(phis))
        if rule(CGState(i, torch.zeros(1), [1.0] * (i + 1), phis[: i + 1], 1.0, 1.0))
    ]
    assert stops and stops[0] == _martens_expected_stop(phis, 1e-3) and stops[0] > 10
    assert rule.stopped_at == stops[-1]
    assert MartensStop.window(9) == 10 and MartensStop.window(101) == 11
    with pytest.raises(ValueError, match=r"eps must be a float > 0 \(inf allowed\), got 0\.0"):
        MartensStop(0.0)


def test_martens_rule_defers_to_residual_tolerance() -> None:
    a, _, b = _problem("clustered")
    _, info = cg(a, b, rtol=1e-6, callback=MartensStop())
    assert info.status == CGStatus.CONVERGED  # converges in fewer than 11 iterations


def test_martens_rule_alone_is_a_stopping_criterion() -> None:
    a, _, b = _problem("poisson")
    _, info = cg(a, b, rtol=0.0, atol=0.0, callback=MartensStop())
    assert info.status in (CGStatus.CALLBACK, CGStatus.CONVERGED)


@pytest.mark.parametrize("how", ["return", "raise"])
def test_callback_stops_the_solve(how: str) -> None:
    a, _, b = _problem("poisson")
    xs, record = _record()

    def stop_at_3(intermediate_result: CGState) -> bool:
        record(intermediate_result.x)
        if intermediate_result.iteration == 3:
            if how == "raise":
                raise StopIteration
            return True
        return False

    x, info = cg(a, b, rtol=1e-12, callback=stop_at_3)
    assert info.status == CGStatus.CALLBACK and info.iterations == 3 and len(xs) == 3
    torch.testing.assert_close(x, xs[-1], rtol=0, atol=0)
    # a scipy-style callback that returns True stops too; one returning other values does not
    _, info = cg(a, b, rtol=1e-12, callback=lambda xk: True)
    assert info.status == CGStatus.CALLBACK and info.iterations == 1
    _, info = cg(a, b, rtol=1e-8, callback=lambda xk: 1)
    assert info.status == CGStatus.CONVERGED


def test_callback_state_matches_the_solve() -> None:
    a, _, b = _problem("geometric")
    x0 = torch.randn_like(b)
    states: list[tuple[int, Tensor, float, float, float, float]] = []

    def cb(intermediate_result: CGState) -> None:
        s = intermediate_result
        values = (s.residual_norm, s.quadratic_value, s.step_length, s.curvature)
        states.append((s.iteration, s.x.clone(), *values))

    xs, record = _record()
    x, info = cg(a, b, x0, rtol=1e-8, maxiter=50, callback=cb)
    y, ref = cg(a, b, x0, rtol=1e-8, maxiter=50, callback=record)
    assert torch.equal(x, y) and info.iterations == ref.iterations == len(states)
    for (k, xk, res, phi, alpha, curv), xr in zip(states, xs):
        torch.testing.assert_close(xk, xr, rtol=0, atol=0)
        assert res == info.residual_norms[k] and phi == info.quadratic_values[k]
        assert phi == pytest.approx(float(0.5 * xk @ a @ xk - b @ xk), rel=1e-8, abs=1e-10)
        assert alpha > 0 and curv > 0


@pytest.mark.parametrize("gamma", [1.3, 2.0])
def test_iterate_grid_keeps_the_backtracking_grid(gamma: float) -> None:
    n = 200
    a = _spd(torch.logspace(-2.0, 1.0, n, dtype=F64), seed=4)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    xs, cb = _record()
    grid = IterateGrid(gamma)

    def record(intermediate_result: CGState) -> None:
        cb(intermediate_result.x)

    x, info = cg(a, b, rtol=0.0, maxiter=30, callback=CallbackList([record, grid]))
    assert info.iterations == 30
    expected = sorted({math.ceil(gamma**j) for j in range(40) if math.ceil(gamma**j) <= 30} | {30})
    iterates = grid.snapshots(x, info)
    assert [it for it, _, _ in iterates] == expected
    assert grid.grid(30) + ([] if grid.grid(30)[-1] == 30 else [30]) == expected
    for it, xk, phi in iterates:
        torch.testing.assert_close(xk, xs[it - 1], rtol=0, atol=0)
        assert phi == info.quadratic_values[it]
    assert iterates[-1][1].data_ptr() != x.data_ptr()  # snapshots are copies
    if gamma == 1.3:
        assert expected[:10] == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18]


def test_iterate_grid_alone() -> None:
    # fed by hand: keeps copies at 1, 2, 4, 8 (gamma = 2), the final iterate added at the end
    grid = IterateGrid(2.0)
    x = torch.zeros(3, dtype=F64)
    phis = [0.0]
    for i in range(1, 11):
        x += 1.0
        phis.append(-float(i))
        assert grid(CGState(i, x, [1.0] * (i + 1), phis, 1.0, 1.0)) is False
    assert [k for k, _, _ in grid.kept] == [1, 2, 4, 8]
    assert [float(v[0]) for _, v, _ in grid.kept] == [1.0, 2.0, 4.0, 8.0]

    class Info:
        iterations = 10
        quadratic_values = phis

    snaps = grid.snapshots(x, Info)
    assert [k for k, _, _ in snaps] == [1, 2, 4, 8, 10] and snaps[-1][2] == -10.0
    Info.iterations = 0  # an overflow reset x to x0: every later snapshot is dropped
    assert [k for k, _, _ in grid.snapshots(x, Info)] == [0]
    with pytest.raises(ValueError, match=r"gamma must be a float > 1, finite, got 1\.0"):
        IterateGrid(1.0)


def test_callback_list_runs_every_callback() -> None:
    calls: list[str] = []

    def first(intermediate_result: CGState) -> bool:
        calls.append("first")
        return True

    def second(intermediate_result: CGState) -> None:
        calls.append("second")

    state = CGState(1, torch.zeros(1), [1.0, 1.0], [0.0, -1.0], 1.0, 1.0)
    assert CallbackList([first, None, second])(state) is True and calls == ["first", "second"]
    assert CallbackList([second])(state) is False


# --------------------------------------------------------------- breakdowns
def test_negative_curvature_in_first_direction() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, -10.0], dtype=F64))
    x, info = cg(a, torch.ones(3, dtype=F64))
    assert info.status == CGStatus.NEGATIVE_CURVATURE and not info.converged
    assert info.iterations == 0
    assert torch.count_nonzero(x) == 0
    assert "curvature" in info.message


def test_negative_curvature_after_a_step() -> None:
    # A = diag(1, -1), b = (1, 1/2): p0^T A p0 = 3/4 > 0, then p1 = (10/9, 20/9) has
    # p1^T A p1 = -300/81 < 0.  The first iterate is x1 = (5/3) b.
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    b = torch.tensor([1.0, 0.5], dtype=F64)
    xs, cb = _record()
    x, info = cg(a, b, callback=cb)
    assert info.status == CGStatus.NEGATIVE_CURVATURE
    assert info.iterations == 1 and len(xs) == 1
    torch.testing.assert_close(x, 5.0 / 3.0 * b)
    assert torch.isfinite(x).all()


def test_zero_curvature_is_caught_without_division_by_zero() -> None:
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    x, info = cg(a, torch.ones(2, dtype=F64))  # p^T A p = 0 exactly
    assert info.status == CGStatus.NEGATIVE_CURVATURE
    assert torch.isfinite(x).all() and torch.count_nonzero(x) == 0


def test_indefinite_random_matrix_never_returns_nan() -> None:
    eig = torch.cat(
        [torch.linspace(-5.0, -1.0, 10, dtype=F64), torch.logspace(0, 2, 40, dtype=F64)]
    )
    a = _spd(eig, seed=8)
    b = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=F64)
    x, info = cg(a, b, rtol=1e-10)
    assert torch.isfinite(x).all()
    assert info.status in (CGStatus.NEGATIVE_CURVATURE, CGStatus.CONVERGED)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_operator_output_is_reported(bad: float) -> None:
    a, _, b = _problem("poisson")
    calls = {"n": 0}

    def op(v: Tensor) -> Tensor:
        calls["n"] += 1
        out = a @ v
        if calls["n"] == 3:
            out[7] = bad
        return out

    xs, cb = _record()
    x, info = cg(op, b, rtol=1e-10, callback=cb)
    assert info.status == CGStatus.NONFINITE and not info.converged
    assert info.iterations == 2 and len(xs) == 2
    assert torch.isfinite(x).all()
    clean, _ = cg(a, b, maxiter=2)
    torch.testing.assert_close(x, clean, rtol=0, atol=0)
    assert "NaN/Inf" in info.message
    assert all(math.isfinite(v) for v in info.residual_norms + info.quadratic_values)


def test_nonfinite_preconditioner_output_is_reported() -> None:
    a, _, b = _problem("poisson")
    calls = {"n": 0}

    def m(v: Tensor) -> Tensor:
        calls["n"] += 1
        return torch.full_like(v, math.nan) if calls["n"] == 4 else v.clone()

    x, info = cg(a, b, M=m, rtol=1e-10)
    assert info.status == CGStatus.NONFINITE
    assert info.iterations == 3  # x_3 itself is fine: only M^{-1} r_3 was NaN
    assert torch.isfinite(x).all()
    clean, _ = cg(a, b, maxiter=3)
    torch.testing.assert_close(x, clean, rtol=0, atol=0)


def test_overflowing_step_never_returns_inf() -> None:
    # float32: p^T A p = 2e-19 > 0 but alpha = 1e35 makes x overflow to Inf
    a = 1e-35 * torch.eye(2)
    x, info = cg(a, torch.full((2,), 1e8))
    assert info.status == CGStatus.NONFINITE and info.iterations == 0
    assert torch.isfinite(x).all() and "overflow" in info.message


def test_nonfinite_rhs_is_reported() -> None:
    a, _, b = _problem("poisson")
    b = b.clone()
    b[0] = math.nan
    x, info = cg(a, b)
    assert info.status == CGStatus.NONFINITE and info.iterations == 0
    assert torch.count_nonzero(x) == 0


def test_indefinite_preconditioner_is_reported() -> None:
    a, _, b = _problem("poisson")
    x, info = cg(a, b, M=lambda v: -v)
    assert info.status == CGStatus.INDEFINITE_PRECONDITIONER
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------- contracts
def test_inputs_are_not_modified() -> None:
    a, _, b = _problem("geometric")
    x0 = torch.randn_like(b)
    b_copy, x0_copy = b.clone(), x0.clone()
    x, info = cg(a, b, x0, rtol=1e-8, maxiter=50, callback=IterateGrid())
    assert torch.equal(b, b_copy) and torch.equal(x0, x0_copy)
    assert x.data_ptr() not in (b.data_ptr(), x0.data_ptr())
    assert info.iterations > 1


def test_callback_gets_copies() -> None:
    a, _, b = _problem("poisson")
    seen: list[Tensor] = []
    x, _ = cg(a, b, callback=seen.append)
    assert len({t.data_ptr() for t in seen}) == len(seen)
    torch.testing.assert_close(seen[-1], x, rtol=0, atol=0)
    assert not torch.equal(seen[0], seen[-1])


def test_result_does_not_require_grad() -> None:
    a, _, b = _problem("poisson")
    b = b.clone().requires_grad_(True)
    x, info = cg(a, b)
    assert info.converged and not x.requires_grad


def test_float32() -> None:
    a, _, b = _problem("clustered")
    a32, b32 = a.float(), b.float()
    x, info = cg(a32, b32, rtol=1e-5)
    assert x.dtype == torch.float32 and info.converged
    assert float((b32 - a32 @ x).norm()) <= 2e-5 * float(b32.norm())


def test_info_type() -> None:
    a, _, b = _problem("poisson")
    _, info = cg(a, b)
    assert isinstance(info, CGInfo) and isinstance(info.status, CGStatus)
    assert info.status == 0
    assert info.residual_norm == info.residual_norms[-1]
    assert info.num_matvecs == info.iterations


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": -1e-3}, r"rtol must be a non-negative float \(inf allowed\), got -0\.001"),
        ({"atol": -1.0}, r"atol must be a non-negative float \(inf allowed\), got -1\.0"),
        ({"rtol": math.nan}, r"rtol must be .*got nan"),
        ({"maxiter": -1}, r"maxiter must be None or an int >= 0, got -1"),
        ({"maxiter": 2.5}, r"maxiter must be None or an int >= 0, got 2\.5"),
        ({"rtol": 0.0, "atol": 0.0}, r"no stopping criterion"),
        ({"callback": 3}, r"callback must be None or callable, got int"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    a, _, b = _problem("poisson")
    with pytest.raises(ValueError, match=match):
        cg(a, b, **kwargs)


def test_bad_shapes_dtypes_devices_raise() -> None:
    a, _, b = _problem("poisson")
    n = b.numel()
    with pytest.raises(ValueError, match=r"b: expected a 1-D tensor of shape \(n,\), got shape"):
        cg(a, b.unsqueeze(1))
    with pytest.raises(ValueError, match=r"b: expected a real floating dtype, got torch.int64"):
        cg(a, torch.ones(n, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"b: expected a 1-D torch.Tensor, got list"):
        cg(a, [1.0] * n)
    with pytest.raises(
        ValueError, match=rf"A: expected shape \({n}, {n}\).*got shape \({n - 1}, {n - 1}\)"
    ):
        cg(a[1:, 1:], b)
    with pytest.raises(
        ValueError, match=r"A: expected dtype torch.float64 .*got dtype torch.float32"
    ):
        cg(a.float(), b)
    with pytest.raises(
        ValueError, match=r"x0: expected shape .*\(those of b\), got tensor of shape"
    ):
        cg(a, b, torch.zeros(n + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"x0: expected .*dtype torch.float64.*got .*float32"):
        cg(a, b, torch.zeros(n, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"expected dtype torch.float64 and device meta"):
        cg(a, torch.zeros(n, dtype=F64, device="meta"))
    with pytest.raises(ValueError, match=r"M: expected shape"):
        cg(a, b, M=Identity(n + 1, dtype=F64))
    with pytest.raises(
        ValueError, match=r"A: expected a LinearOperator, a 2-D tensor or a callable"
    ):
        cg("A", b)
    with pytest.raises(ValueError, match=r"A: the callable must map .*got tensor of shape \(3,\)"):
        cg(lambda v: v[:3], b)
