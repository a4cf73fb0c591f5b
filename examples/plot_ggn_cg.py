"""
GGN products and conjugate gradient
===================================

The generalized Gauss-Newton matrix :math:`G = J^\\top H_z J` of a small MLP as a matrix-free
operator: products ``G @ v``, the gradient from the same forward pass, and a damped Newton
direction :math:`(G + \\lambda I)^{-1} g` by CG, checked against a dense solve.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
loss_fn = nn.CrossEntropyLoss()
X, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))

G = so.GGN(model, loss_fn, (X, y))
n = G.shape[0]
print("parameters:", n)

# %%
# Products take a vector ``(n,)`` or a block of columns ``(n, k)``.
v = torch.randn(n, dtype=torch.float64)
V = torch.randn(n, 3, dtype=torch.float64)
print("G @ v:", tuple((G @ v).shape), " G @ V:", tuple((G @ V).shape))

# %%
# A damped Newton direction by CG. ``info`` says how the solve stopped.
damping = 1e-3
g = G.gradient()
A = G + damping * so.Identity(n, dtype=torch.float64)
x, info = so.cg(A, g, rtol=1e-8, maxiter=200)
print("CG:", info.iterations, "iterations,", info.status.name)

# %%
# The dense matrix (``G @ I``, fine at this size) gives the reference.
dense = G @ torch.eye(n, dtype=torch.float64)
x_ref = torch.linalg.solve(dense + damping * torch.eye(n, dtype=torch.float64), g)
print("relative error vs dense solve:", float((x - x_ref).norm() / x_ref.norm()))

fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(torch.tensor(info.residual_norms).numpy())
ax.set_xlabel("CG iteration")
ax.set_ylabel(r"$\|r_k\|$")
ax.set_title("CG on the damped GGN")
fig.tight_layout()
