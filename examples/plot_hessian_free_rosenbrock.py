"""
Hessian-free on the Rosenbrock function
=======================================

Martens' Hessian-free method (:class:`~secondorder.HessianFree`) on
:math:`f(x) = (1 - x_0)^2 + 100 (x_1 - x_0^2)^2`, written as a least-squares problem: the
"model" returns the residuals :math:`r(x) = (1 - x_0, 10 (x_1 - x_0^2))` and the loss is
``MSELoss(reduction="sum")`` against zero, so the Gauss-Newton matrix :math:`2 J^\\top J` is the
curvature. The input is ignored.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so


class RosenbrockResiduals(nn.Module):
    def __init__(self, start):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, _):
        x0, x1 = self.x
        return torch.stack([1 - x0, 10 * (x1 - x0**2)]).unsqueeze(0)


model = RosenbrockResiduals([-1.0, 3.0])
loss_fn = nn.MSELoss(reduction="sum")
dummy, zero = torch.zeros(1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
opt = so.HessianFree(model, loss_fn, damping=1e-3, preconditioner=None)

path, values = [model.x.detach().clone()], []
for _ in range(40):
    values.append(float(opt.step(dummy, zero)))
    path.append(model.x.detach().clone())
    if values[-1] < 1e-12:
        break
print(f"{len(values)} steps, f = {values[-1]:.3g}, x = {path[-1].tolist()}")

path = torch.stack(path)
a, b = torch.meshgrid(torch.linspace(-2.0, 1.6, 200), torch.linspace(-0.8, 3.3, 200), indexing="xy")
f = (1 - a) ** 2 + 100 * (b - a**2) ** 2
fig, ax = plt.subplots(figsize=(5, 4))
ax.contour(a, b, torch.log10(f + 1e-3), levels=25, cmap="viridis")
ax.plot(path[:, 0], path[:, 1], "o-", color="C3", ms=3, label="Hessian-free iterates")
ax.plot([1], [1], "k*", ms=12, label="minimum")
ax.set_xlabel("$x_0$")
ax.set_ylabel("$x_1$")
ax.legend()
fig.tight_layout()
