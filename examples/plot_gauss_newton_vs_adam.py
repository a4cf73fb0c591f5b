"""
Gauss-Newton vs Adam on a tiny regression
=========================================

Full-batch regression of :math:`\\sin(3x)` with a small tanh MLP. On a full batch a small
damping floor suits Gauss-Newton (the damping adapts upward from it, see
:doc:`/guide/damping`).
"""

import warnings

import matplotlib.pyplot as plt
import torch
from torch import nn

import secondorder as so

torch.manual_seed(0)
X = torch.linspace(-2, 2, 128).unsqueeze(1)
y = torch.sin(3 * X) + 0.05 * torch.randn_like(X)
loss_fn = nn.MSELoss()


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(1, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 1)
    )


# %%
# Gauss-Newton: each step solves :math:`(G + \kappa\lambda I) s = g` by CG. A trial step that
# does not lower the loss is rejected and solved again with more damping; each rejection warns
# (:class:`~secondorder.RejectedStepWarning`) and is counted in ``opt.diagnostics``. Here the
# warnings are collected instead of printed.
gn_model = make_model()
opt = so.GaussNewton(gn_model, loss_fn, damping=1e-3, cg_maxiter=50)
gn_losses, rejections = [], 0
with warnings.catch_warnings():
    warnings.simplefilter("ignore", so.RejectedStepWarning)
    for _ in range(30):
        gn_losses.append(float(opt.step(X, y)))
        rejections += opt.diagnostics.get("rejections", 0)
print(f"Gauss-Newton: final loss {gn_losses[-1]:.4g}, {rejections} rejected trials")
print("last step: CG iterations", opt.diagnostics["cg_iterations"])

# %%
# Adam with the usual loop, ten times as many steps.
adam_model = make_model()
adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
adam_losses = []
for _ in range(300):
    adam.zero_grad()
    loss = loss_fn(adam_model(X), y)
    loss.backward()
    adam.step()
    adam_losses.append(loss.item())
print(f"Adam: final loss {adam_losses[-1]:.4g}")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.2))
ax0.semilogy(gn_losses, label="Gauss-Newton")
ax0.semilogy(adam_losses, label="Adam (lr 1e-2)")
ax0.set_xlabel("step")
ax0.set_ylabel("training loss")
ax0.legend()
with torch.no_grad():
    ax1.plot(X, y, ".", ms=3, color="0.6", label="data")
    ax1.plot(X, gn_model(X), label="Gauss-Newton")
    ax1.plot(X, adam_model(X), label="Adam")
ax1.legend()
fig.tight_layout()
