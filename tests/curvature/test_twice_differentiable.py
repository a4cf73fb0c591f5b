"""Stand-ins for functions without a second derivative in torch (Hardsigmoid)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import secondorder as so
from secondorder.curvature.twice_differentiable import (
    TwiceDifferentiable,
    needs_twice_differentiable,
)

DT = torch.float64


class _Custom(nn.Module):
    """A custom module: Hardsigmoid as a submodule and called functionally in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        h = self.a(x)
        h = h + F.hardsigmoid(h.clone(), inplace=True)
        return self.b(self.act(h))


def _exact(x):
    return torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, x / 6 + 0.5))


def _reference_hessian(model, X, y):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(theta):
        parts = [t.view(s) for t, s in zip(theta.split(sizes), shapes)]
        w = dict(zip(names, parts))
        h = F.linear(X, w["a.weight"], w["a.bias"])
        h = h + _exact(h)
        return F.cross_entropy(F.linear(_exact(h), w["b.weight"], w["b.bias"]), y)

    theta = torch.cat([p.reshape(-1) for p in params])
    return torch.func.jacrev(torch.func.grad(loss))(theta)


def test_stand_in_equals_torch_hardsigmoid():
    x = torch.linspace(-5, 5, 101, dtype=DT)
    with TwiceDifferentiable():
        got = F.hardsigmoid(x)
    assert torch.allclose(got, F.hardsigmoid(x), rtol=0, atol=4e-16)  # rounding of 1/6


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_hessian_and_ggn_through_hardsigmoid(engine):
    torch.manual_seed(0)
    model = _Custom().to(DT)
    assert needs_twice_differentiable(model)
    X, y = torch.randn(7, 3, dtype=DT) * 3, torch.randint(0, 2, (7,))
    H = so.Hessian(model, nn.CrossEntropyLoss(), (X, y), engine=engine).to_dense()
    assert torch.allclose(H, _reference_hessian(model, X, y), rtol=1e-10, atol=1e-12)
    G = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine=engine)
    v = torch.randn(G.shape[0], dtype=DT)
    assert torch.isfinite(G @ v).all()


def test_models_without_hardsigmoid_run_without_the_mode():
    assert not needs_twice_differentiable(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
