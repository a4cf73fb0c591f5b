"""CurvaturePreconditioner: any torch.optim optimizer on damped Newton directions."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_contract import flat_params, make_problem
from torch import nn

import secondorder as so

CURVATURES = {
    "ggn": lambda m, l, **kw: so.GaussNewton(m, l, **kw),
    "hessian": lambda m, l, **kw: so.NewtonCG(m, l, curvature="hessian", **kw),
    "fisher": lambda m, l, **kw: so.NaturalGradient(m, l, fisher="exact", **kw),
    "empirical_fisher": lambda m, l, **kw: so.NaturalGradient(m, l, fisher="empirical", **kw),
}


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "explicit"])
@pytest.mark.parametrize("curvature", sorted(CURVATURES))
def test_sgd_on_preconditioned_gradients_is_the_newton_step(curvature, recorded):
    model, loss_fn, X, y = make_problem()
    twin = copy.deepcopy(model)
    newton = CURVATURES[curvature](twin, loss_fn, lr=1.0, damping=0.5, cg_maxiter=50, cg_rtol=1e-12)
    pre = so.CurvaturePreconditioner(
        model, loss_fn, curvature=curvature, damping=0.5, cg_maxiter=50, cg_rtol=1e-12
    )
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        sgd.zero_grad()
        loss_fn(model(X), y).backward()
        diag = pre.step() if recorded else pre.step(X, y)
        assert diag["accepted"] and diag["cg_iterations"] > 0
        sgd.step()
        newton.step(X, y)
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-9, atol=1e-11)


def test_the_curvature_sees_the_model_without_the_loops_hooks(monkeypatch):
    """The recorder's hooks are off while the curvature is built (a hooked model cannot be
    traced by the graph engine) and back on for the loop's next call."""
    from secondorder.optim import preconditioner_mode

    model, loss_fn, X, y = make_problem()
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=0.5)
    seen = []
    build = preconditioner_mode.build_curvature

    def spy(kind, m, *args, **kw):
        seen.append(len(m._forward_hooks) + len(m._forward_pre_hooks))
        return build(kind, m, *args, **kw)

    monkeypatch.setattr(preconditioner_mode, "build_curvature", spy)
    for _ in range(2):
        model.zero_grad()
        loss_fn(model(X), y).backward()
        assert pre.step()["accepted"]
    assert seen == [0, 0]
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1


def test_evaluation_passes_do_not_replace_the_training_batch():
    model, loss_fn, X, y = make_problem()
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=0.1)
    loss_fn(model(X), y).backward()
    with torch.no_grad():
        loss_fn(model(X[:3] * 5), y[:3])  # an evaluation between backward and step
    grad = [p.grad.clone() for p in model.parameters()]
    pre.step()
    recorded = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grad):
        p.grad.copy_(g)
    pre.step(X, y)
    for p, r in zip(model.parameters(), recorded):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=0)


def test_adamw_and_momentum_train_on_newton_directions():
    torch.manual_seed(0)
    X = torch.randn(64, 3, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    for make in (
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    ):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        loss_fn = nn.MSELoss()
        pre = so.CurvaturePreconditioner(model, loss_fn, damping=1e-1)
        opt = make(model.parameters())
        first = float(loss_fn(model(X), y).detach())
        for _ in range(30):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            pre.step()
            opt.step()
        assert float(loss_fn(model(X), y).detach()) < 0.5 * first


def test_batchnorm_statistics_are_left_to_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    pre = so.CurvaturePreconditioner(model, loss_fn)
    loss_fn(model(X), y).backward()
    stats = [b.clone() for b in model.buffers()]
    pre.step()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))


def test_errors_and_non_finite_gradients():
    model, loss_fn, X, y = make_problem()
    pre = so.CurvaturePreconditioner(model, loss_fn)
    with pytest.raises(ValueError, match=r"no forward pass.*pre\.step\(inputs, targets\)"):
        pre.step()
    model(X)
    with pytest.raises(ValueError, match=r"have no \.grad; call loss\.backward\(\) first"):
        pre.step(X, y)
    with pytest.raises(ValueError, match="loss_fn was not called on the model"):
        pre.step()
    loss_fn(model(X), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = pre.step()
    assert not diag["accepted"] and diag["rejected"] == 1
    assert "gradient is not finite" in diag["rejected_reason"]
    assert any(issubclass(w.category, so.NonFiniteStepWarning) for w in caught)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    with pytest.raises(ValueError, match="Invalid damping value"):
        so.CurvaturePreconditioner(model, loss_fn, damping=0.0)
    pre.remove()
    loss_fn(model(X[:4]), y[:4]).backward()  # no longer recorded
    with pytest.raises(ValueError, match="no forward pass"):
        so.CurvaturePreconditioner(model, loss_fn).step()


def test_plain_function_losses_need_the_explicit_batch():
    model, _, X, y = make_problem()

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t)

    pre = so.CurvaturePreconditioner(model, loss_fn)
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match=r"not an nn\.Module.*pre\.step\(inputs, targets\)"):
        pre.step()
    assert pre.step(X, y)["accepted"]


def test_state_dict_round_trip_with_warm_start():
    model, loss_fn, X, y = make_problem()
    twin = copy.deepcopy(model)
    a = so.CurvaturePreconditioner(model, loss_fn, warm_start=True, cg_maxiter=3)
    loss_fn(model(X), y).backward()
    a.step()
    b = so.CurvaturePreconditioner(twin, loss_fn, warm_start=True, cg_maxiter=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for m in (model, twin):
        m.zero_grad()
        loss_fn(m(X), y).backward()
    a.step()
    b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


class KernelDropout(nn.Module):
    """Dropout whose draw depends on the attention kernel flags, as a fused kernel's does: the
    same number of uniforms as in the loop, in another order under the library's math kernel."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        if torch._C._get_flash_sdp_enabled():
            u = torch.rand(h.shape[::-1], dtype=h.dtype).T
        else:
            u = torch.rand(h.shape, dtype=h.dtype)
        return h * (u >= self.p) / (1 - self.p)


def test_masks_the_library_cannot_replay_are_refused():
    """A loop whose masks the library's passes would not reproduce: refused, not mixed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), KernelDropout(0.3), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    loss_fn = nn.MSELoss()
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=0.5)
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match=r"CurvaturePreconditioner.*does not reproduce"):
        pre.step()
    model[2] = nn.Dropout(0.3)  # a mask the library replays: accepted
    model.zero_grad()
    loss_fn(model(X), y).backward()
    assert pre.step()["accepted"]
