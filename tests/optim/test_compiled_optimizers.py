"""Optimizers on a model compiled by ``torch.compile``: the same steps as on the plain model.

Curvature products and the optimizers' own passes run through the module underneath the
compiled wrapper (the same Parameter objects); the user's forward passes (a closure, the
training loop of the preconditioner mode) run compiled, and the batch is recorded by hooks on
the module the user calls. ``backend="aot_eager"`` (no double backward, as the default backend)
keeps the compile time to seconds on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_contract import IDS, flat_params, make_opt, make_problem
from torch import nn

import secondorder as so

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def compiled_twin(model):
    """A copy of ``model`` (same values, its own parameters) and its compiled wrapper."""
    twin = copy.deepcopy(model)
    return twin, torch.compile(twin, backend="aot_eager")


@pytest.mark.parametrize("name", IDS)
def test_step_on_compiled_model_equals_plain(name):
    model, loss_fn, X, y = make_problem()
    twin, compiled = compiled_twin(model)
    plain_opt, compiled_opt = make_opt(name, model, loss_fn), make_opt(name, compiled, loss_fn)
    for _ in range(2):
        loss = plain_opt.step(X, y)
        torch.testing.assert_close(compiled_opt.step(X, y), loss, **TOL)
        torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)
    assert compiled_opt.diagnostics["accepted"] == plain_opt.diagnostics["accepted"]


@pytest.mark.parametrize("name", ["newton_cg_ggn", "hessian_free", "block_newton_ggn"])
def test_closure_calling_the_compiled_model(name):
    """step(closure) records the batch of the compiled wrapper's call (hooks on the wrapper)."""
    model, loss_fn, X, y = make_problem()
    twin, compiled = compiled_twin(model)
    plain_opt, compiled_opt = make_opt(name, model, loss_fn), make_opt(name, compiled, loss_fn)

    def closure():
        compiled_opt.zero_grad()
        loss = loss_fn(compiled(X), y)
        loss.backward()
        return loss

    for _ in range(2):
        loss = plain_opt.step(X, y)
        torch.testing.assert_close(compiled_opt.step(closure), loss, **TOL)
        torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)
    # the pair form too
    loss = plain_opt.step(X, y)
    torch.testing.assert_close(compiled_opt.step(lambda: (compiled(X), y)), loss, **TOL)
    torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)


def test_closure_calling_the_other_module_is_refused():
    """The optimizer holds the wrapper, the closure calls the module underneath: an error."""
    model, loss_fn, X, y = make_problem()
    compiled = torch.compile(model, backend="aot_eager")
    opt = so.GaussNewton(compiled, loss_fn, lr=0.5, damping=1e-2)
    before = flat_params(model)
    with pytest.raises(ValueError, match=r"torch\.compile"):
        opt.step(lambda: (model(X), y))
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("name", ["gauss_newton_warm", "natural_gradient_mc", "directional"])
def test_state_dict_round_trip_between_compiled_and_plain(name):
    model, loss_fn, X, y = make_problem()
    twin, compiled = compiled_twin(model)
    compiled_opt = make_opt(name, compiled, loss_fn)
    compiled_opt.step(X, y)
    # the model's state: torch prefixes the wrapper's keys with "_orig_mod."
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    model.load_state_dict(compiled._orig_mod.state_dict())
    plain_opt = make_opt(name, model, loss_fn)
    plain_opt.load_state_dict(compiled_opt.state_dict())  # parameter order, not names
    for _ in range(2):
        torch.testing.assert_close(compiled_opt.step(X, y), plain_opt.step(X, y), **TOL)
        torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)
    back = make_opt(name, compiled, loss_fn)
    back.load_state_dict(plain_opt.state_dict())
    torch.testing.assert_close(back.step(X, y), plain_opt.step(X, y), **TOL)


def test_block_newton_names_blocks_without_the_wrapper_prefix():
    model, loss_fn, X, y = make_problem()
    twin, compiled = compiled_twin(model)
    opt = make_opt("block_newton_ggn", compiled, loss_fn, engine="sequential")
    assert opt.fmodel.names == [n for n, _ in model.named_parameters()]
    ref = make_opt("block_newton_ggn", model, loss_fn, engine="sequential")
    torch.testing.assert_close(opt.step(X, y), ref.step(X, y), **TOL)
    torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)


def test_preconditioner_mode_with_a_compiled_model():
    """The loop calls the compiled model; the recorded batch gives the plain model's step."""
    model, loss_fn, X, y = make_problem()
    twin, compiled = compiled_twin(model)
    runs = []
    for module, called in ((model, model), (twin, compiled)):
        pre = so.CurvaturePreconditioner(called, loss_fn, damping=0.5, cg_maxiter=50)
        sgd = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(2):
            sgd.zero_grad()
            loss_fn(called(X), y).backward()
            assert pre.step()["accepted"]
            sgd.step()
        pre.remove()
        runs.append(flat_params(module))
    torch.testing.assert_close(runs[1], runs[0], **TOL)


def test_batchnorm_running_statistics_with_a_compiled_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    twin, compiled = compiled_twin(model)
    plain_opt = so.GaussNewton(model, loss_fn, lr=0.5, damping=1e-2)
    compiled_opt = so.GaussNewton(compiled, loss_fn, lr=0.5, damping=1e-2)
    for _ in range(2):
        torch.testing.assert_close(compiled_opt.step(X, y), plain_opt.step(X, y), **TOL)
    torch.testing.assert_close(flat_params(twin), flat_params(model), **TOL)
    for a, b in zip(twin.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    so.update_bn([(X[:8], None), (X[8:], None)], compiled)
    so.update_bn([(X[:8], None), (X[8:], None)], model)
    for a, b in zip(twin.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, **TOL)
