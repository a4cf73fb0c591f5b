r"""Dense float64 references for every curvature quantity, built independently of the library.

Everything here goes through :func:`torch.func.functional_call` on the model's trainable
parameters (tied parameters once, frozen ones held fixed, buffers as the model holds them) and
differentiates with :func:`torch.func.jacrev` / :func:`torch.func.grad` on the *concatenated*
data (all batches in one), under the MATH attention kernel (the only CPU kernel with double
derivatives). With :math:`\theta \in \mathbb{R}^P`, outputs :math:`z = f(\theta) \in
\mathbb{R}^M` (flattened) and the loss :math:`L(z)`:

- Hessian :math:`\nabla^2_\theta L` = ``jacrev(grad(L o f))``: not ``torch.func.hessian``
  (forward over reverse) nor ``jacrev(jacrev(.))``, both wrong through LayerNorm in torch 2.13;
- GGN :math:`J^\top H_z J`, :math:`J` = ``jacrev(f)`` (M, P), :math:`H_z` = ``jacrev(grad(L))``
  (M, M); the exact Fisher equals it for the likelihood losses;
- empirical Fisher :math:`s \sum_r g_r g_r^\top`, one row :math:`r` per *position* of a
  sample (cross-entropy on (N, C, *d): every index but the class dimension; MSE/BCE: every
  index but the last), :math:`g_r = \nabla_\theta \ell_r` of the unreduced row loss and
  :math:`s = L / \sum_r \ell_r` the loss's normalisation;
- PCH blocks of an ``nn.Sequential`` by dense Hessian backpropagation
  (:func:`pch_blocks`), the definition of ``secondorder.curvature.pch``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "ELEMENTWISE",
    "block_diagonal",
    "concatenate",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "double_backward_hessian",
    "finite_difference_hessian",
    "flat_function",
    "gradient",
    "loss_value",
    "pch_blocks",
    "reference_mode",
    "row_losses",
]

# elementwise activations: their second-order residual is diagonal and modified by the PCH
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.Softplus,
    nn.Mish,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
)


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Attention through the MATH kernel (double derivatives exist) and no running statistics."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


class _ExactHardsigmoid(nn.Module):
    """Hardsigmoid by its definition: torch's backward kernel rounds 1/6 to float32."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, x / 6 + 0.5))


def _reference_copy(model: nn.Module) -> nn.Module:
    """A copy that computes the same function without side effects.

    Train-mode BatchNorm normalises by batch statistics without updating any; in-place
    activations compute out of place; Hardsigmoid is written by its definition, whose
    derivatives are exact in float64 (torch's first derivative is not, and it has no second).
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False  # same forward, no in-place buffer update
        if getattr(m, "inplace", False) is True:
            m.inplace = False  # the reference is the out-of-place function
        for name, child in m.named_children():
            if type(child) is nn.Hardsigmoid:
                setattr(m, name, _ExactHardsigmoid())
    return model


def concatenate(batches: Sequence[tuple[Any, Any]]) -> tuple[tuple[Tensor, ...], Any]:
    """Concatenate batches ``(inputs, targets)`` along the sample dimension.

    Args:
        batches: Batches whose inputs are a tensor or a tuple of tensors.

    Returns:
        ``(inputs, targets)`` with ``inputs`` a tuple of tensors.
    """
    inputs = [b[0] if isinstance(b[0], (tuple, list)) else (b[0],) for b in batches]
    cat_inputs = tuple(torch.cat(parts) for parts in zip(*inputs))
    return cat_inputs, torch.cat([b[1] for b in batches])


def flat_function(
    model: nn.Module, inputs: tuple[Any, ...]
) -> tuple[Callable[[Tensor], Any], Tensor, list[int]]:
    """The model's outputs as a function of its flat trainable parameters.

    Args:
        model: Any module; parameters without ``requires_grad`` stay fixed.
        inputs: Positional inputs.

    Returns:
        ``(f, theta, sizes)``: ``f(theta)`` calls the model, ``theta`` (P,) the current values
        in ``named_parameters`` order (tied parameters once), ``sizes`` the tensor sizes.
    """
    model = _reference_copy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(th: Tensor) -> Any:
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), inputs)

    return f, theta, sizes


def loss_value(model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any) -> Tensor:
    """The loss on the data."""
    f, theta, _ = flat_function(model, inputs)
    with reference_mode(), torch.no_grad():
        return loss_fn(f(theta), targets)


def gradient(model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any) -> Tensor:
    """The flat gradient (P,) by ``torch.func.grad``."""
    f, theta, _ = flat_function(model, inputs)
    with reference_mode():
        return grad(lambda th: loss_fn(f(th), targets))(theta)


def dense_hessian(model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any) -> Tensor:
    """The Hessian (P, P) by ``jacrev(grad(.))`` (reverse over reverse)."""
    f, theta, _ = flat_function(model, inputs)
    with reference_mode():
        return jacrev(grad(lambda th: loss_fn(f(th), targets)))(theta)


def double_backward_hessian(
    model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any
) -> Tensor:
    """The Hessian (P, P) by double backward with ``torch.autograd``, one column per pass."""
    f, theta, _ = flat_function(model, inputs)
    theta = theta.clone().requires_grad_(True)
    with reference_mode():
        (g,) = torch.autograd.grad(loss_fn(f(theta), targets), theta, create_graph=True)
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        cols = [torch.autograd.grad(g, theta, e, retain_graph=True)[0] for e in eye]
    return torch.stack(cols, 1)


def finite_difference_hessian(
    model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any, eps: float = 1e-5
) -> Tensor:
    """The Hessian (P, P) by central differences of the autograd gradient."""
    f, theta, _ = flat_function(model, inputs)

    def g(th: Tensor) -> Tensor:
        th = th.clone().requires_grad_(True)
        with reference_mode():
            return torch.autograd.grad(loss_fn(f(th), targets), th)[0]

    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    return torch.stack([(g(theta + eps * e) - g(theta - eps * e)) / (2 * eps) for e in eye], 1)


def dense_ggn(model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Any) -> Tensor:
    r"""The GGN :math:`J^\top H_z J` (P, P) with both factors dense."""
    f, theta, _ = flat_function(model, inputs)
    with reference_mode():
        z = f(theta).detach()
        J = jacrev(f)(theta).reshape(z.numel(), -1)
        Hz = jacrev(grad(lambda zz: loss_fn(zz.view(z.shape), targets)))(z.reshape(-1))
    return J.T @ Hz @ J


def row_losses(loss_fn: Any, z: Tensor, targets: Tensor) -> Tensor:
    """Unreduced row losses of a likelihood loss: one entry per position (see module docstring).

    Args:
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        z: Outputs.
        targets: Targets.

    Returns:
        A flat tensor of row losses.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if type(loss_fn).__name__ == "SequenceCrossEntropyLoss":  # classes last -> dim 1
            targets = targets.movedim(-1, 1) if targets.shape == z.shape else targets
            z = z.movedim(-1, 1)
        rows = F.cross_entropy(
            z,
            targets,
            weight=loss_fn.weight,
            ignore_index=loss_fn.ignore_index,
            label_smoothing=loss_fn.label_smoothing,
            reduction="none",
        )
        return rows.reshape(-1)
    if isinstance(loss_fn, nn.MSELoss):
        return (z - targets).square().sum(-1).reshape(-1)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        per = F.binary_cross_entropy_with_logits(
            z, targets, weight=loss_fn.weight, pos_weight=loss_fn.pos_weight, reduction="none"
        )
        return per.sum(-1).reshape(-1)
    raise TypeError(f"no row decomposition for {type(loss_fn).__name__}")


def dense_empirical_fisher(
    model: nn.Module, loss_fn: Any, inputs: tuple[Any, ...], targets: Tensor
) -> Tensor:
    r"""The empirical Fisher :math:`s \sum_r g_r g_r^\top` (P, P) over positions.

    :math:`s = L / \sum_r \ell_r` is 1 for ``reduction="sum"`` and the loss's mean
    normalisation otherwise (non-ignored targets, target weights, output entries).
    """
    f, theta, _ = flat_function(model, inputs)
    with reference_mode():
        z = f(theta).detach()
        rows = row_losses(loss_fn, z, targets)
        s = loss_fn(z, targets) / rows.sum()
        G = jacrev(lambda th: row_losses(loss_fn, f(th), targets))(theta)  # (R, P)
    return s * G.T @ G


def block_diagonal(M: Tensor, sizes: Sequence[int]) -> Tensor:
    """``M`` with every entry outside the diagonal blocks of ``sizes`` set to zero."""
    out = torch.zeros_like(M)
    start = 0
    for n in sizes:
        out[start : start + n, start : start + n] = M[start : start + n, start : start + n]
        start += n
    return out


def _leaves(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _leaves(child)]
    return [model]


def _rho(r: Tensor, curvature: str) -> Tensor:
    if curvature == "hessian":
        return r
    if curvature == "ggn":
        return torch.zeros_like(r)
    return r.clamp_min(0) if curvature == "pch_clip" else r.abs()


def _parameter_blocks(
    layer: nn.Module, a: Tensor, delta: Tensor, H: Tensor, curvature: str
) -> dict[int, Tensor]:
    """The blocks of ``layer``'s trainable parameters, keyed by ``id(parameter)``."""
    blocks = {}
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            continue

        def fp(q: Tensor, name: str = name) -> Tensor:
            return functional_call(layer, {name: q}, (a,))

        Jp = jacrev(fp)(p.detach()).reshape(delta.numel(), -1)
        block = Jp.T @ H @ Jp
        if curvature != "ggn":
            second = jacrev(grad(lambda q: (delta * fp(q)).sum()))(p.detach())
            block = block + second.reshape(block.shape)
        blocks[id(p)] = block
    return blocks


def _backpropagate(
    layer: nn.Module, a: Tensor, delta: Tensor, H: Tensor, curvature: str
) -> tuple[Tensor, Tensor]:
    """``(H_{j-1}, delta_{j-1})`` from ``(H_j, delta_j)`` through ``layer`` at its input ``a``."""
    n = a.numel()
    Ja = jacrev(layer)(a).reshape(delta.numel(), n)
    R = jacrev(grad(lambda t: (delta * layer(t)).sum()))(a).reshape(n, n)
    if isinstance(layer, ELEMENTWISE):
        diag = R.diagonal()
        assert torch.equal(R, torch.diag(diag)), "elementwise residual not diagonal"
        R = torch.diag(_rho(diag, curvature))
    elif curvature == "ggn":
        R = torch.zeros_like(R)
    return Ja.T @ H @ Ja + R, (Ja.T @ delta.reshape(-1)).view(a.shape)


def pch_blocks(
    model: nn.Sequential,
    loss_fn: Any,
    inputs: tuple[Tensor, ...],
    targets: Any,
    curvature: str = "pch_clip",
) -> Tensor:
    r"""Block-diagonal GGN/Hessian/PCH (P, P) of an ``nn.Sequential`` by dense Hessian backprop.

    With layer inputs :math:`a_{j-1}`, outputs :math:`a_j = f_j(a_{j-1}; \theta_j)`,
    :math:`\delta_j = \nabla_{a_j} L` and :math:`H_m = \nabla^2_{a_m} L`:

    .. math::
        H_{j-1} = J_j^\top H_j J_j + \rho(R_j), \quad
        R_j = \nabla^2_{a}\, (\delta_j \cdot f_j(a; \theta_j)), \quad
        C_{\theta_j} = J_{\theta_j}^\top H_j J_{\theta_j}
            + \nabla^2_{\theta_j} (\delta_j \cdot f_j),

    all dense over the whole batch. :math:`\rho` acts on elementwise activations only
    (:data:`ELEMENTWISE`, whose :math:`R_j` is diagonal): identity (``"hessian"``), zero
    (``"ggn"``; every other layer's :math:`R_j` is dropped too), :math:`\max(\cdot, 0)`
    (``"pch_clip"``) or :math:`|\cdot|` (``"pch_abs"``) on the diagonal.

    Returns:
        The blocks on the diagonal, in the model's trainable-parameter order.
    """
    model_copy = _reference_copy(model)
    layers = _leaves(model_copy)
    (x,) = inputs
    with reference_mode():
        acts = [x]
        with torch.no_grad():
            for layer in layers:
                acts.append(layer(acts[-1]))
        z = acts[-1]
        H = jacrev(grad(lambda zz: loss_fn(zz.view(z.shape), targets)))(z.reshape(-1))
        delta = grad(lambda zz: loss_fn(zz, targets))(z).detach()
        blocks: dict[int, Tensor] = {}
        for j in range(len(layers), 0, -1):
            layer, a = layers[j - 1], acts[j - 1]
            blocks.update(_parameter_blocks(layer, a, delta, H, curvature))
            if j > 1:
                H, delta = _backpropagate(layer, a, delta, H, curvature)
    params = [p for p in model_copy.parameters() if p.requires_grad]
    return torch.block_diag(*[blocks[id(p)] for p in params])
