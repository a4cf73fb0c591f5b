"""Dense curvature matrices built independently with torch.func on the full batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def _trainable(model: nn.Module):
    names, values = [], []
    for name, p in model.named_parameters():  # tied parameters once
        if p.requires_grad:
            names.append(name)
            values.append(p.detach())
    return names, values


def _flat_fn(model, inputs):
    names, values = _trainable(model)
    shapes = [v.shape for v in values]
    sizes = [v.numel() for v in values]
    theta = torch.cat([v.reshape(-1) for v in values])

    def f(th):
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), inputs)

    return f, theta


def dense_hessian(model, loss_fn, inputs, y):
    f, theta = _flat_fn(model, inputs)
    return hessian(lambda th: loss_fn(f(th), y))(theta)


def dense_ggn(model, loss_fn, inputs, y):
    f, theta = _flat_fn(model, inputs)
    z = f(theta)
    J = jacrev(f)(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: loss_fn(zz.view(z.shape), y))(z.reshape(-1))
    return J.T @ Hz @ J


def dense_empirical_fisher(model, loss_fn, inputs, y):
    """s * sum_n grad l_n grad l_n^T with l_n the unreduced loss of sample n."""
    f, theta = _flat_fn(model, inputs)
    unreduced = type(loss_fn)(reduction="none")
    n = y.shape[0]

    def per_sample(th):
        return unreduced(f(th), y).reshape(n, -1).sum(1)

    G = jacrev(per_sample)(theta)  # (N, P)
    z = f(theta)
    if loss_fn.reduction == "sum":
        s = 1.0
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        s = 1.0 / n
    else:
        s = 1.0 / z.numel()
    return s * G.T @ G
