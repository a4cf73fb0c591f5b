"""
Natural gradient: exact vs empirical Fisher
===========================================

:class:`~secondorder.NaturalGradient` with the exact Fisher (equal to the GGN for
cross-entropy) and with the empirical Fisher (the outer products of per-sample gradients),
on a small classification problem.
"""

import warnings

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so

torch.manual_seed(0)
N = 300
t = torch.rand(N) * 3
labels = torch.randint(0, 3, (N,))
angle = t + labels * 2.1
X = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], 1) + 0.1 * torch.randn(N, 2)
loss_fn = nn.CrossEntropyLoss()

curves = {}
for fisher in ["exact", "empirical"]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = so.NaturalGradient(model, loss_fn, damping=1e-3, fisher=fisher, cg_maxiter=30)
    with warnings.catch_warnings():  # rejected trials are counted in opt.diagnostics
        warnings.simplefilter("ignore", so.RejectedStepWarning)
        curves[fisher] = [float(opt.step(X, labels)) for _ in range(25)]
    print(f"{fisher:9s} Fisher: final loss {curves[fisher][-1]:.4f}")

fig, ax = plt.subplots(figsize=(5, 3))
for fisher, losses in curves.items():
    ax.semilogy(losses, label=f"{fisher} Fisher")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
fig.tight_layout()
