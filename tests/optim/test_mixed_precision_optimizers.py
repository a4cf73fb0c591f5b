r"""Optimizers on bfloat16/float16 models and inside ``torch.autocast``.

With bfloat16 parameters every pass, product and solve of a step runs in float32 at the
parameters' values, and the direction is rounded only when it is applied. So one step of a
bfloat16 model equals, bit for bit, one step of the float32 model holding the same (rounded)
values, rounded to bfloat16 afterwards: both do the same float32 arithmetic. A solve in
bfloat16 would not (its products are off by about :math:`2^{-8}`; see
``tests/curvature/test_mixed_precision.py``).

Inside ``torch.autocast`` a step switches autocast off: it equals the step without autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so

N, T, D = 8, 4, 16
LOSS = nn.CrossEntropyLoss()


class Encoder(nn.Module):
    """One encoder layer (d 16, 2 heads, dropout 0) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x)).mean(1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, 3))


def bn_mlp() -> nn.Module:
    """BatchNorm in training mode (K-FAC takes the batch's statistics as constants)."""
    return nn.Sequential(nn.Linear(D, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))


MODELS = {"transformer": lambda: Encoder().eval(), "mlp": mlp, "bn_mlp": bn_mlp}

OPTIMIZERS = {
    "gauss_newton": lambda m: so.GaussNewton(m, LOSS, lr=1.0, damping=1e-2, cg_maxiter=10),
    "newton_cg": lambda m: so.NewtonCG(m, LOSS, lr=1.0, damping=1.0, cg_maxiter=10),
    "natural_gradient": lambda m: so.NaturalGradient(m, LOSS, lr=1.0, damping=1e-2),
    "hessian_free": lambda m: so.HessianFree(m, LOSS),
    "block_newton": lambda m: so.BlockDiagonalNewtonCG(m, LOSS, lr=1.0, damping=1e-1),
    "directional": lambda m: so.DirectionalDampedNewton(m, LOSS),
    "kfac": lambda m: so.KFACOptimizer(m, LOSS, lr=0.3, damping=1e-2),
}


def problem(name: str, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(N, T, D) if name == "transformer" else torch.randn(N, D)
    y = torch.randint(0, 3, (N,))
    return model, copy.deepcopy(model).to(dtype), x, y


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_is_the_rounded_float32_step(name, opt_name, dtype):
    _, low, x, y = problem(name, dtype)
    image = copy.deepcopy(low).float()  # the same function in float32
    opt, ref = OPTIMIZERS[opt_name](low), OPTIMIZERS[opt_name](image)
    loss = opt.step(x.to(dtype), y)
    loss_ref = ref.step(x.to(dtype).float(), y)
    assert loss.dtype == torch.float32 and float(loss) == float(loss_ref)
    assert opt.diagnostics["accepted"] and ref.diagnostics["accepted"]
    assert 0.0 <= opt.diagnostics["stalled_fraction"] < 1.0
    assert "stalled_fraction" not in ref.diagnostics
    chosen = opt.diagnostics.get("chosen_iterate"), ref.diagnostics.get("chosen_iterate")
    if chosen[0] != chosen[1]:
        # Hessian-free's CG backtracking evaluates the loss at its iterates rounded as the
        # parameters would hold them: losses a rounding apart may pick another iterate. Its
        # loss is then no worse than the float32 step's, up to the rounding of the loss.
        u = torch.finfo(dtype).eps / 2
        bound = float(ref.diagnostics["new_loss"]) + 4 * u * abs(float(loss_ref))
        assert float(opt.diagnostics["new_loss"]) <= bound
        return
    for p, q in zip(low.parameters(), image.parameters()):
        assert p.dtype == dtype
        assert torch.equal(p, q.detach().to(dtype))
        assert p.grad is not None and p.grad.dtype == dtype
        assert torch.equal(p.grad, q.grad.to(dtype))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("form", ["tensors", "closure"])
def test_autocast_step_equals_float32_step(name, opt_name, form):
    model, _, x, y = problem(name)
    twin = copy.deepcopy(model)
    opt, ref = OPTIMIZERS[opt_name](model), OPTIMIZERS[opt_name](twin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if form == "tensors":
            loss = opt.step(x, y)
        else:
            loss = opt.step(lambda: LOSS(model(x), y))
    loss_ref = ref.step(x, y)
    assert loss.dtype == torch.float32 and float(loss) == float(loss_ref)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q)


class DropMLP(nn.Module):
    """An MLP with dropout between its layers (train mode: a new mask on every forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_low_precision_dropout_step_uses_one_mask(opt_name):
    """A bfloat16 step on a dropout model is the float32 step with the same (one) mask per step.

    The float32 image of the model draws one mask per step for every pass (replayed by its
    inputs); the bfloat16 model's passes run on float32 casts of its inputs, which must replay
    the same draw as the inputs themselves.
    """
    torch.manual_seed(0)
    low = DropMLP().bfloat16().train()
    image = copy.deepcopy(low).float()
    x, y = torch.randn(N, D).bfloat16(), torch.randint(0, 3, (N,))
    opt, ref = OPTIMIZERS[opt_name](low), OPTIMIZERS[opt_name](image)
    for step in range(2):
        torch.manual_seed(10 + step)
        loss = opt.step(x, y)
        torch.manual_seed(10 + step)
        loss_ref = ref.step(x.float(), y)
        assert float(loss) == float(loss_ref)
        assert opt.diagnostics["accepted"] == ref.diagnostics["accepted"]
        with torch.no_grad():
            for p, q in zip(low.parameters(), image.parameters()):
                assert torch.equal(p, q.to(torch.bfloat16))
                q.copy_(p)  # the next step starts from the point the bfloat16 model holds


def test_updates_below_bfloat16_resolution_are_reported():
    """lr * d below half a bfloat16 spacing of the parameter rounds away: reported, not hidden."""
    _, low, x, y = problem("mlp")
    opt = so.GaussNewton(low, LOSS, lr=1e-6, damping=1e-2, adapt_damping=False)
    before = params(low)
    opt.step(x.bfloat16(), y)
    assert opt.diagnostics["accepted"]
    assert opt.diagnostics["stalled_fraction"] > 0.99
    stalled = sum(int((p == b).sum()) for p, b in zip(low.parameters(), before))
    assert stalled >= 0.99 * sum(p.numel() for p in before)


def test_bfloat16_transformer_trains():
    """A few Gauss-Newton steps on a bfloat16 transformer lower the loss (it diverged before)."""
    _, low, x, y = problem("transformer")
    opt = so.GaussNewton(low, LOSS, lr=1.0, damping=1e-2, cg_maxiter=20)
    losses = [float(opt.step(x.bfloat16(), y)) for _ in range(6)]
    assert opt.diagnostics["accepted"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_preconditioner_mode(dtype):
    _, low, x, y = problem("transformer", dtype)
    image = copy.deepcopy(low).float()
    pre, pre_ref = (
        so.CurvaturePreconditioner(low, LOSS, damping=1e-2),
        so.CurvaturePreconditioner(image, LOSS, damping=1e-2),
    )
    LOSS(low(x.to(dtype)), y).backward()
    LOSS(image(x.to(dtype).float()), y).backward()
    for p, q in zip(low.parameters(), image.parameters()):  # the loop's gradients differ:
        q.grad.copy_(p.grad)  # give the float32 twin the low-precision one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pre.step(x.to(dtype), y)["accepted"]
    assert pre_ref.step(x.to(dtype).float(), y)["accepted"]
    for p, q in zip(low.parameters(), image.parameters()):
        assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kfac_preconditioner_with_batchnorm(dtype):
    """The batch statistics K-FAC takes as constants come from the float32 evaluation: the
    preconditioned gradient is the float32 twin's, rounded."""
    _, low, x, y = problem("bn_mlp", dtype)
    image = copy.deepcopy(low).float()
    pre = so.KFACPreconditioner(low, LOSS, damping=1e-2)
    pre_ref = so.KFACPreconditioner(image, LOSS, damping=1e-2)
    LOSS(low(x.to(dtype)), y).backward()
    LOSS(image(x.to(dtype).float()), y).backward()
    for p, q in zip(low.parameters(), image.parameters()):  # the loop's gradients differ:
        q.grad.copy_(p.grad)  # give the float32 twin the low-precision one
    assert pre.step(x.to(dtype), y)["accepted"]
    assert pre_ref.step(x.to(dtype).float(), y)["accepted"]
    for p, q in zip(low.parameters(), image.parameters()):
        assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad.to(dtype))
