"""
The preconditioner mode with AdamW
==================================

:class:`~secondorder.CurvaturePreconditioner` sits between ``backward()`` and a first-order
optimizer's ``step()``: it replaces ``.grad`` by :math:`(G + \\lambda I)^{-1}` ``.grad``, solved
by CG on the batch that the loop just used. The loop is otherwise unchanged.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so

torch.manual_seed(0)
X = torch.randn(512, 8)
w = torch.randn(8, 1)
y = torch.tanh(X @ w) + 0.05 * torch.randn(512, 1)
loss_fn = nn.MSELoss()
batches = [(X[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]


def train(precondition):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    pre = so.CurvaturePreconditioner(model, loss_fn, damping=1e-1) if precondition else None
    losses = []
    for _ in range(8):
        for xb, yb in batches:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if pre is not None:
                pre.step()  # .grad <- (G + damping I)^-1 .grad, the batch read from the loop
            opt.step()
            losses.append(loss.item())
    return losses


plain, preconditioned = train(False), train(True)
print("AdamW final batch loss:", plain[-1], " preconditioned:", preconditioned[-1])
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(plain, label="AdamW")
ax.semilogy(preconditioned, label="AdamW + CurvaturePreconditioner")
ax.set_xlabel("step")
ax.set_ylabel("batch loss")
ax.legend()
fig.tight_layout()
