"""Tiny float64 models that need the autograd paths, and dense references built independently.

Models: a TransformerEncoderLayer (train and eval mode, dropout 0), a bare MultiheadAttention,
scaled_dot_product_attention with ``is_causal`` and with an ``attn_mask``, a GroupNorm CNN, GRU,
LSTM, a train-mode BatchNorm MLP and a train-mode Dropout MLP. References differentiate a flat
parameter vector with ``jacrev(grad(f))`` (Hessian) or one ``vjp`` (Jacobian), never
``torch.func.hessian``, under the math attention kernel with the fused fast path off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64
N, S, D, C = 3, 4, 4, 3  # samples, sequence length, model width, classes


class Pooled(nn.Module):
    """A sequence encoder followed by mean pooling and a linear head."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(D, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class SelfAttention(nn.Module):
    """A bare nn.MultiheadAttention (need_weights=False: the SDPA kernel) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.mha(x, x, x, need_weights=False)
        return self.head(a.mean(1))


class SDPA(nn.Module):
    """Two heads of F.scaled_dot_product_attention, causal or with a boolean mask."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, C)
        self.causal = causal
        mask = torch.ones(S, S, dtype=torch.bool)
        mask[0, 2:] = False
        mask[3, 1] = False
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.causal:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.head(o.transpose(1, 2).flatten(2).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(D, 2, dim_feedforward=6, dropout=0.0, batch_first=True)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], Tensor]
    random: bool = False  # the forward draws random numbers (Dropout)
    path: str = "vmap"  # the path the per-sample diagonals take
    #: whether the GGN operator's products go through the autograd linearisation
    seq: bool = False


def _seq_input() -> Tensor:
    return torch.randn(N, S, D, dtype=DT)


def _rnn_input() -> Tensor:
    return torch.randn(N, 5, 3, dtype=DT)


CASES = [
    Case("tel_train", lambda: Pooled(_encoder_layer()).double().train(), _seq_input),
    Case("tel_eval", lambda: Pooled(_encoder_layer()).double().eval(), _seq_input),
    Case("mha_eval", lambda: SelfAttention().double().eval(), _seq_input),
    Case("mha_train", lambda: SelfAttention().double().train(), _seq_input),
    Case("sdpa_causal", lambda: SDPA(True).double(), _seq_input),
    Case("sdpa_mask", lambda: SDPA(False).double(), _seq_input),
    Case(
        "groupnorm",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, C)
        ).double(),
        lambda: torch.randn(N, 1, 5, 5, dtype=DT),
        path="kronecker",  # the layers' per-sample rules (GroupNorm has one)
    ),
    Case("gru", lambda: Recurrent(nn.GRU).double(), _rnn_input, path="batch"),
    Case("lstm", lambda: Recurrent(nn.LSTM).double(), _rnn_input, path="batch"),
    Case(
        "bn_train",
        lambda: nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, C)
        ).double(),
        lambda: torch.randn(N, 3, dtype=DT),
        path="batch",
    ),
    Case(
        "dropout",
        lambda: (
            nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.4), nn.Tanh(), nn.Linear(5, C))
            .double()
            .train()
        ),
        lambda: torch.randn(N, 3, dtype=DT),
        random=True,
        path="batch",
    ),
]
CASE_IDS = [c.name for c in CASES]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """The reference's own switch to the math kernel, fast path off (independent of the library)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_fn(
    model: nn.Module, params: Sequence[Tensor], inputs: tuple
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``f(theta)`` with ``theta`` the flat ``params`` in the given order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    target = _without_running_updates(model)

    def f(th: Tensor) -> Tensor:
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(target, dict(zip(names, parts)), inputs)

    return f, theta


def _without_running_updates(model: nn.Module) -> nn.Module:
    """A copy whose train-mode BatchNorm layers keep no running statistics (same outputs).

    torch.func refuses the in-place update of running statistics inside a transform; in
    training mode the output uses the batch statistics only, so dropping them changes nothing.
    """
    if not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    ):
        return model
    copy = deepcopy(model)
    for m in copy.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return copy


def ref_hessian(model, loss_fn, inputs, y, params=None) -> Tensor:
    params = trainable(model) if params is None else params
    with math_attention():
        f, theta = flat_fn(model, params, inputs)
        return jacrev(grad(lambda th: loss_fn(f(th), y)))(theta)


def ref_jacobian(model, params, inputs) -> tuple[Tensor, Tensor]:
    """Outputs ``z`` and ``J`` of shape ``(z.numel(), P)`` from one forward pass."""
    with math_attention():
        f, theta = flat_fn(model, params, inputs)
        z, pull = vjp(f, theta)
        eye = torch.eye(z.numel(), dtype=z.dtype).view(-1, *z.shape)
        (J,) = vmap(pull)(eye)
    return z.detach(), J


def ref_gradient(model, loss_fn, inputs, y, params=None) -> Tensor:
    params = trainable(model) if params is None else params
    with math_attention():
        f, theta = flat_fn(model, params, inputs)
        return grad(lambda th: loss_fn(f(th), y))(theta)


def ref_ggn(model, loss_fn, inputs, y, params=None) -> Tensor:
    params = trainable(model) if params is None else params
    z, J = ref_jacobian(model, params, inputs)
    Hz = jacrev(grad(lambda zz: loss_fn(zz.view(z.shape), y)))(z.reshape(-1))
    return J.T @ Hz @ J


def ref_empirical_fisher_ce(model, inputs, y, params=None) -> Tensor:
    """(1/N) sum_n g_n g_n^T, g_n the gradient of sample n's cross-entropy in the batch."""
    params = trainable(model) if params is None else params
    z, J = ref_jacobian(model, params, inputs)
    gz = jacrev(lambda zz: F.cross_entropy(zz, y, reduction="none"))(z)  # (N, N, C)
    rows = gz.reshape(z.shape[0], -1) @ J
    return rows.T @ rows / z.shape[0]
