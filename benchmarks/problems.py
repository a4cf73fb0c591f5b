"""The three benchmark problems, float32, with fixed seeds.

A: the MLP 2-200-200-5 with SiLU of seed 000 on its 5-arm spiral (500 points).
B: the sigmoid CNN with max-pooling of seed 001 on 64 random 28×28 images.
C: an MLP 784-512-512-10 with ReLU on 256 random inputs.
T: a transformer classifier: a Linear embedding of 32 random 16-dimensional tokens plus a learned
   position embedding, 2 ``nn.TransformerEncoderLayer`` (d 64, 4 heads, feed-forward 256, ReLU,
   dropout 0, training mode, default attention kernel), mean over the sequence, a Linear head to
   10 classes; N = 32.

All use ``nn.CrossEntropyLoss()`` (mean reduction). Each problem is built from its own
seed inside ``torch.random.fork_rng``, so building one leaves the global RNG untouched
and the same name always gives the same parameters and data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PROBLEMS", "Problem", "make_problem", "spiral_data"]


@dataclass
class Problem:
    """A model, a loss and one batch ``(X, y)``."""

    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        return sum(p.numel() for p in self.params)

    @property
    def batch_size(self) -> int:
        """Number of data points in the batch."""
        return int(self.X.shape[0])


def spiral_data(
    n_points: int = 100, n_arms: int = 5, noise: float = 0.02, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Seed 000's spiral: ``n_arms`` arms of ``n_points`` points, float32 inputs.

    Arm ``i`` has ``theta = linspace(i δ, (i+1) δ)`` with ``δ = 4π / n_arms``,
    ``r = linspace(0, 1)``, ``t = theta + noise · randn`` and ``x = (r sin t, r cos t)``.
    """
    gen = torch.Generator().manual_seed(seed)
    delta = 4 * math.pi / n_arms
    r = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
    xs, ys = [], []
    for i in range(n_arms):
        theta = torch.linspace(i * delta, (i + 1) * delta, n_points, dtype=torch.float64)
        t = theta + noise * torch.randn(n_points, generator=gen, dtype=torch.float64)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], dim=1))
        ys.append(torch.full((n_points,), i, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)


def _problem_a(seed: int = 0) -> Problem:
    X, y = spiral_data(100, 5, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(2, 200), nn.SiLU(), nn.Linear(200, 200), nn.SiLU(), nn.Linear(200, 5)
        )
    return Problem("A", "MLP 2-200-200-5 SiLU, spiral N=500", model, nn.CrossEntropyLoss(), X, y)


def _problem_b(seed: int = 1) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 10, 5, 1),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(10, 20, 5, 1),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 20, 50),
            nn.Sigmoid(),
            nn.Linear(50, 10),
        )
        X = torch.rand(64, 1, 28, 28)
        y = torch.randint(0, 10, (64,))
    return Problem("B", "sigmoid CNN + max-pool, N=64", model, nn.CrossEntropyLoss(), X, y)


def _problem_c(seed: int = 2) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        X = torch.randn(256, 784)
        y = torch.randint(0, 10, (256,))
    return Problem("C", "MLP 784-512-512-10 ReLU, N=256", model, nn.CrossEntropyLoss(), X, y)


class _TransformerClassifier(nn.Module):
    """Problem T's model (module docstring)."""

    def __init__(self, d_in: int = 16, d: int = 64, heads: int = 4, ff: int = 256) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.pos = nn.Parameter(0.02 * torch.randn(32, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(1))


def _problem_t(seed: int = 3) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _TransformerClassifier()
        X = torch.randn(32, 32, 16)
        y = torch.randint(0, 10, (32,))
    return Problem(
        "T",
        "transformer 2x(d 64, 4 heads, ff 256), T=32, N=32",
        model,
        nn.CrossEntropyLoss(),
        X,
        y,
    )


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "A": _problem_a,
    "B": _problem_b,
    "C": _problem_c,
    "T": _problem_t,
}


def make_problem(name: str) -> Problem:
    """Build problem ``"A"``, ``"B"``, ``"C"`` or ``"T"``."""
    try:
        return PROBLEMS[name]()
    except KeyError:
        raise ValueError(f"Unknown problem {name!r}; expected one of {sorted(PROBLEMS)}") from None


if __name__ == "__main__":
    for key in PROBLEMS:
        p = make_problem(key)
        print(f"{p.name}: {p.description}: {p.num_params:,} parameters, X {tuple(p.X.shape)}")
