"""step(closure) in the torch.optim form, over every optimizer, and the wrong ways to call step."""

from __future__ import annotations

import copy

import pytest
import torch
from test_contract import IDS, flat_params, make_opt, make_problem
from torch import nn


def twins(name, model_factory=make_problem):
    model, loss_fn, X, y = model_factory()
    twin = copy.deepcopy(model)
    return (model, make_opt(name, model, loss_fn)), (twin, make_opt(name, twin, loss_fn)), X, y


@pytest.mark.parametrize("form", ["loss", "loss_backward", "pair"])
@pytest.mark.parametrize("name", IDS)
def test_closure_step_equals_the_batch_step(name, form):
    (model, opt), (twin, ref), X, y = twins(name)
    loss_fn = opt.loss_fn

    def closure():
        opt.zero_grad()
        out = model(X)
        if form == "pair":
            return out, y
        loss = loss_fn(out, y)
        if form == "loss_backward":
            loss.backward()
        return loss

    for _ in range(2):
        got = opt.step(closure)
        want = ref.step(X, y)
        assert float(got) == float(want)
        assert torch.equal(flat_params(model), flat_params(twin))


def test_closure_step_moves_batchnorm_statistics_once():
    def problem():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        model = model.double()
        X = torch.randn(12, 4, dtype=torch.float64)
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (12,))

    (model, opt), (twin, ref), X, y = twins("gauss_newton_warm", problem)
    opt.step(lambda: opt.loss_fn(model(X), y))
    ref.step(X, y)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["gauss_newton_warm", "hessian_free", "directional"])
def test_wrong_calls_name_both_forms(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    before = flat_params(model)
    forms = r"opt\.step\(inputs, targets\), or opt\.step\(closure\)"
    with pytest.raises(TypeError, match=rf"no arguments.*{forms}|{forms}.*no arguments"):
        loss_fn(model(X), y).backward()
        opt.step()  # the standard loop's call
    with pytest.raises(TypeError, match="no targets"):
        opt.step(X)
    with pytest.raises(TypeError, match="a closure and targets"):
        opt.step(lambda: loss_fn(model(X), y), y)
    with pytest.raises(ValueError, match="called the optimizer's model 2 times"):
        opt.step(lambda: loss_fn(model(X), y) + loss_fn(model(X), y))
    with pytest.raises(ValueError, match="called the optimizer's model 0 times"):
        opt.step(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match="not on the model's output"):
        opt.step(lambda: loss_fn(model(X)[:, :3] * 2, y))
    with pytest.raises(ValueError, match="first element is not the model's output"):
        opt.step(lambda: (model(X) * 2, y))
    with pytest.raises(ValueError, match="returned float"):
        opt.step(lambda: loss_fn(model(X), y).detach().item())
    assert torch.equal(flat_params(model), before)


def test_a_plain_function_loss_needs_the_pair_form():
    model, _, X, y = make_problem()

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t)

    opt = make_opt("gauss_newton_warm", model, loss_fn)
    with pytest.raises(ValueError, match=r"not an nn\.Module.*return \(outputs, targets\)"):
        opt.step(lambda: loss_fn(model(X), y))
    loss = opt.step(lambda: (model(X), y))
    assert opt.diagnostics["accepted"] and torch.isfinite(loss)


def test_keyword_arguments_to_the_model_are_refused():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    _, loss_fn, X, y = make_problem()
    model = Keyword()
    opt = make_opt("gauss_newton_warm", model, loss_fn)
    with pytest.raises(ValueError, match=r"keyword arguments \['scale'\]"):
        opt.step(lambda: loss_fn(model(X, scale=2.0), y))
