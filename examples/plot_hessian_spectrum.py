"""
Hessian eigenvalues and spectral density
========================================

The Hessian of a small classifier's loss as an operator: its largest eigenvalue
(:func:`~secondorder.eigmax`), the top eigenpairs by Lanczos (:func:`~secondorder.lanczos`),
its trace (Hutchinson) and a smoothed spectral density by stochastic Lanczos quadrature
(:func:`~secondorder.spectral_density`), each checked against the dense Hessian.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3)).double()
loss_fn = nn.CrossEntropyLoss()
X, y = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 3, (200,))
H = so.Hessian(model, loss_fn, (X, y))
n = H.shape[0]
gen = torch.Generator().manual_seed(0)

evals, evecs = so.lanczos(H, 5, generator=gen)  # ascending
dense = torch.linalg.eigvalsh(H @ torch.eye(n, dtype=torch.float64))
print("top-5 by Lanczos:", evals.flip(0).tolist())
print("top-5 dense:     ", dense.flip(0)[:5].tolist())
print("eigmax:", so.eigmax(H, generator=gen))
print("trace: Hutchinson", so.hutchinson_trace(H, 200, generator=gen), "exact", float(dense.sum()))

# %%
# The density: a Gaussian-smoothed histogram of the eigenvalues, from a few probes.
grid, density = so.spectral_density(H, num_probes=8, num_steps=40, generator=gen)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(grid, density, label="stochastic Lanczos quadrature")
ax.hist(dense.numpy(), bins=60, density=True, alpha=0.4, label="dense eigenvalues")
ax.set_yscale("log")
ax.set_ylim(1e-3, 1e3)  # the mass near 0 peaks far above
ax.set_xlabel("eigenvalue")
ax.legend()
fig.tight_layout()
