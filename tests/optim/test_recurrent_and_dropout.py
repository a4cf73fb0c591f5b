r"""Optimizers on recurrent nets (GRU, LSTM) and on dropout models in training mode.

**Dropout**: one step sees ONE mask per batch for its loss, its gradient, every curvature
product and every trial loss. The reference is the same optimizer on the network whose dropout
layers are replaced by the masks the model's forward draws from the step's starting generator
state (``DropNet(masks)``): losses, ``.grad`` and the parameters after the step must agree.

**GRU/LSTM** (2 layers, bidirectional, batch-first), through the graph engine's autograd nodes:
every optimizer takes finite steps, and Newton-CG with a converged CG equals the dense float64
solve :math:`-(C + \lambda I)^{-1} g` (GGN, Hessian, Fisher).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from test_contract import IDS, make_opt
from torch import Tensor, nn

import secondorder as so

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "curvature"))
from test_dropout_products import SEED, DropNet, masks_from

from conformance import reference as ref

DT = torch.float64


def _dropout_pair(n: int = 12):
    torch.manual_seed(0)
    model = DropNet().to(DT).train()
    fixed = DropNet(masks_from(SEED, n)).to(DT)
    fixed.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, fixed, X, y


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", IDS)
def test_one_step_is_the_step_of_the_fixed_mask_network(name):
    model, fixed, X, y = _dropout_pair()
    loss_fn = nn.CrossEntropyLoss()
    opt, ref_opt = make_opt(name, model, loss_fn), make_opt(name, fixed, loss_fn)
    g = ref.gradient(fixed, loss_fn, (X,), y)  # the gradient of the masked network, by autograd
    torch.manual_seed(SEED)
    loss = opt.step(X, y)
    after = torch.get_rng_state()
    want = ref_opt.step(X, y)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grads(model), _grads(fixed), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(_grads(model), g, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(_flat(model), _flat(fixed), rtol=1e-9, atol=1e-12)
    assert opt.diagnostics["accepted"] == ref_opt.diagnostics["accepted"]
    # the generators moved on as after one forward pass: the next step draws new masks
    torch.manual_seed(SEED)
    model(X)
    assert torch.equal(after, torch.get_rng_state())


def test_closure_step_uses_the_closures_masks():
    model, fixed, X, y = _dropout_pair()
    loss_fn = nn.CrossEntropyLoss()
    opt = so.GaussNewton(model, loss_fn, lr=0.5, damping=1e-2)
    ref_opt = so.GaussNewton(fixed, loss_fn, lr=0.5, damping=1e-2)
    torch.manual_seed(SEED)
    seen = {}

    def closure():
        loss = loss_fn(model(X), y)
        seen["loss"] = loss.detach()
        return loss

    loss = opt.step(closure)
    ref_opt.step(X, y)
    torch.testing.assert_close(seen["loss"], loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat(model), _flat(fixed), rtol=1e-9, atol=1e-12)


def test_preconditioner_uses_the_loops_masks():
    model, fixed, X, y = _dropout_pair()
    loss_fn = nn.CrossEntropyLoss()
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=1e-2, cg_maxiter=200, cg_rtol=1e-12)
    torch.manual_seed(SEED)
    loss_fn(model(X), y).backward()
    pre.step()
    pre.remove()
    G = ref.dense_ggn(fixed, loss_fn, (X,), y)
    g = ref.gradient(fixed, loss_fn, (X,), y)
    want = torch.linalg.solve(G + 1e-2 * torch.eye(G.shape[0], dtype=DT), g)
    torch.testing.assert_close(_grads(model), want, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------------ recurrent nets
class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 3, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _recurrent(cell: type[nn.Module], n: int = 6):
    torch.manual_seed(0)
    model = Recurrent(cell).to(DT)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 4, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
@pytest.mark.parametrize("name", IDS)
def test_every_optimizer_steps_a_recurrent_net(cell, name):
    model, loss_fn, X, y = _recurrent(cell)
    # K-FAC with its default KL clipping (the contract settings switch it off to reach the
    # overflow guard): the recurrent weights get only diagonal blocks
    extra = {"kl_clip": 1e-2} if name == "kfac" else {}
    opt = make_opt(name, model, loss_fn, **extra)
    first = opt.step(X, y)
    for _ in range(2):
        opt.step(X, y)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert float(ref.loss_value(model, loss_fn, (X,), y)) < float(first)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher", "empirical_fisher"])
def test_newton_cg_on_a_recurrent_net_is_the_dense_solve(cell, curvature):
    model, loss_fn, X, y = _recurrent(cell)
    start = copy.deepcopy(model)
    damping = 1.0 if curvature == "hessian" else 1e-2
    opt = so.NewtonCG(
        model,
        loss_fn,
        lr=1.0,
        damping=damping,
        curvature=curvature,
        cg_maxiter=500,
        cg_rtol=1e-13,
        adapt_damping=False,
    )
    opt.step(X, y)
    if curvature == "hessian":
        C = ref.double_backward_hessian(start, loss_fn, (X,), y)
    elif curvature == "empirical_fisher":
        C = ref.dense_empirical_fisher(start, loss_fn, (X,), y)
    else:
        C = ref.dense_ggn(start, loss_fn, (X,), y)
    g = ref.gradient(start, loss_fn, (X,), y)
    d = torch.linalg.solve(C + damping * torch.eye(C.shape[0], dtype=DT), -g)
    torch.testing.assert_close(_flat(model) - _flat(start), d, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def test_preconditioner_on_a_recurrent_net(cell):
    model, loss_fn, X, y = _recurrent(cell)
    start = copy.deepcopy(model)
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=1e-2, cg_maxiter=500, cg_rtol=1e-13)
    loss_fn(model(X), y).backward()
    pre.step()
    pre.remove()
    G = ref.dense_ggn(start, loss_fn, (X,), y)
    g = ref.gradient(start, loss_fn, (X,), y)
    want = torch.linalg.solve(G + 1e-2 * torch.eye(G.shape[0], dtype=DT), g)
    torch.testing.assert_close(_grads(model), want, rtol=1e-7, atol=1e-10)
