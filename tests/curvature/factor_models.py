"""Custom modules for the per-sample layer fast paths (diagonals, low-rank GGN) in the tests."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.relu(self.mid(h)) * 0.5
        return self.out(torch.cat([h, 2 * h], 1))


class ResidualConv(nn.Module):  # convolutions, a residual addition, a flatten, a frozen layer
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = self.pool(h + torch.sigmoid(self.c2(h)))
        return self.frozen(self.fc(torch.flatten(h, 1)))


class SequenceInside(nn.Module):  # a Linear on (N, T, d): per-sample sums over T
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.view(x.shape[0], 2, 4))).flatten(1))


class MixesSamples(nn.Module):  # a step mixes the samples: the fast path must decline
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))
