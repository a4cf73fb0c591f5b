"""Registry of small models, losses and data for the curvature tests (float64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DT = torch.float64
C = 3  # output dimension of every model


class TiedAutoencoder(nn.Module):
    """Encoder weight reused (transposed) by the decoder: one shared parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.bias_out = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        r = torch.tanh(h @ self.enc.weight + self.bias_out)
        return self.head(r)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, C)

    def forward(self, x1, x2):
        return self.out(torch.sigmoid(self.a(x1) * self.b(x2)))


class BNNet(nn.Module):
    """A non-Sequential module with BatchNorm (eval mode) and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, C)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.fc(x)) + self.frozen))


def _bn_eval(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module.eval()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, C))


def cnn() -> nn.Module:
    # seed 001's sigmoid CNN, shrunk to a 12x12 input
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(2, 3, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.Sigmoid(),
        nn.Linear(4, C),
    )


def bn_sequential() -> nn.Module:
    return _bn_eval(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)))


def tied_sequential() -> nn.Module:
    first, last = nn.Linear(4, 4), nn.Linear(4, 4)
    last.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), last, nn.Tanh(), nn.Linear(4, C))


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]  # n -> inputs tuple

    def make(self, n: int = 6, seed: int = 0):
        torch.manual_seed(seed)
        model = self.build().to(DT)
        inputs = tuple(x.to(DT) for x in self.inputs(n))
        return model, inputs


CASES = [
    Case("mlp", mlp, lambda n: (torch.randn(n, 4),)),
    Case("cnn", cnn, lambda n: (torch.randn(n, 1, 12, 12),)),
    Case("bn_sequential", bn_sequential, lambda n: (torch.randn(n, 4),)),
    Case("bn_module", lambda: _bn_eval(BNNet()), lambda n: (torch.randn(n, 4),)),
    Case("tied_sequential", tied_sequential, lambda n: (torch.randn(n, 4),)),
    Case("tied_module", TiedAutoencoder, lambda n: (torch.randn(n, 4),)),
    Case("two_inputs", TwoInputs, lambda n: (torch.randn(n, 3), torch.randn(n, 2))),
]
CASE_IDS = [c.name for c in CASES]

LOSSES = {
    "ce": lambda red: nn.CrossEntropyLoss(reduction=red),
    "mse": lambda red: nn.MSELoss(reduction=red),
    "bce": lambda red: nn.BCEWithLogitsLoss(reduction=red),
}


def targets(loss_name: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss_name == "ce":
        return torch.randint(0, C, (n,), generator=g)
    if loss_name == "mse":
        return torch.randn(n, C, generator=g, dtype=DT)
    return torch.randint(0, 2, (n, C), generator=g).to(DT)
