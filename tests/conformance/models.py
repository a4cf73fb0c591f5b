"""Registry of tiny float64 models for the conformance matrix: one entry per layer or situation.

Every model maps a batch of ``N`` samples to outputs of one kind (``ModelSpec.out``):
``"vec"`` logits ``(N, 3)``, ``"seq"`` logits ``(N, 3, L)``, ``"seq_last"`` class-last logits
``(N, L, 3)`` (a language model's, for ``SequenceCrossEntropyLoss``) and ``"logprob"``
log-probabilities ``(N, 3)``. The flags say which engines the model is meant for; the
operators' ``applies`` predicates read them. Adding an entry adds its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

DT = torch.float64
C = 3  # number of classes / output features
L = 4  # length of "seq" outputs


@dataclass(frozen=True)
class ModelSpec:
    """A model factory and what it supports.

    Attributes:
        build: Returns the model (float64, deterministic given the seed set before).
        inputs: ``inputs(n, generator)`` returns the inputs of ``n`` samples.
        out: ``"vec"``, ``"seq"`` or ``"logprob"`` (see the module docstring).
        chain: An ``nn.Sequential`` of plain layers (the dense PCH reference applies).
        seq: Layers the former hand-written Sequential engine served; ``engine="sequential"``
            (now an alias of the graph engine) is tested on them.
        block: Supported by the module-wise block-diagonal engine.
        mlp: Linear layers and elementwise activations only (Jacobian factors, MLP Hessian).
        second_order: Torch can differentiate the model's backward again: the Hessian
            references exist (``tests/reference.py`` writes Hardsigmoid by its definition).
        per_sample: The outputs of a sample do not depend on the other samples in the batch
            (false for train-mode BatchNorm: only one batch is meaningful).
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], object]
    out: str = "vec"
    chain: bool = False
    seq: bool = False
    block: bool = False
    mlp: bool = False
    second_order: bool = True
    per_sample: bool = True


def _randn(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda n, g: 1.5 * torch.randn(n, *shape, generator=g, dtype=DT)


def _bn_stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


# ------------------------------------------------------------------------- activations
# (name, factory, in-place variant factory or None); non-default arguments where there are any
ACTIVATIONS: list[tuple[str, Callable[[], nn.Module], Callable[[], nn.Module] | None]] = [
    ("sigmoid", nn.Sigmoid, None),
    ("tanh", nn.Tanh, None),
    ("relu", nn.ReLU, lambda: nn.ReLU(inplace=True)),
    ("relu6", nn.ReLU6, lambda: nn.ReLU6(inplace=True)),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2), lambda: nn.LeakyReLU(0.2, inplace=True)),
    ("silu", nn.SiLU, lambda: nn.SiLU(inplace=True)),
    ("elu", lambda: nn.ELU(alpha=0.7), lambda: nn.ELU(alpha=0.7, inplace=True)),
    ("celu", lambda: nn.CELU(alpha=1.3), lambda: nn.CELU(alpha=1.3, inplace=True)),
    ("selu", nn.SELU, lambda: nn.SELU(inplace=True)),
    ("gelu_tanh", lambda: nn.GELU(approximate="tanh"), None),
    ("gelu", nn.GELU, None),
    ("softplus", lambda: nn.Softplus(beta=2.0, threshold=0.5), None),
    ("mish", nn.Mish, lambda: nn.Mish(inplace=True)),
    ("softsign", nn.Softsign, None),
    ("hardtanh", lambda: nn.Hardtanh(-0.5, 0.7), lambda: nn.Hardtanh(-0.5, 0.7, inplace=True)),
    ("hardsigmoid", nn.Hardsigmoid, lambda: nn.Hardsigmoid(inplace=True)),
    ("hardswish", nn.Hardswish, lambda: nn.Hardswish(inplace=True)),
    ("logsigmoid", nn.LogSigmoid, None),
]
# activations the hand-written Sequential engine has a rule for (others: engine="sequential"
# refuses the model, which is not a silent error and so not a case of the matrix)
SEQ_ACTIVATIONS = {"sigmoid", "tanh", "relu", "leaky_relu", "silu", "elu", "gelu", "gelu_tanh",
                   "softplus"}  # fmt: skip


def _act_mlp(act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, C)).to(DT)


# ---------------------------------------------------------------------- custom modules
class Residual(nn.Module):
    """x + tanh(Linear(x)) between two Linear layers, with a buffer and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.hidden = nn.Linear(5, 5)
        self.out = nn.Linear(5, C)
        self.register_buffer("shift", torch.linspace(-0.3, 0.3, 5))
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + torch.tanh(self.hidden(h) + self.shift) * self.frozen
        return self.out(torch.sigmoid(h))


class FunctionalResNet(nn.Module):
    """Conv, eval-mode BatchNorm, a residual sum and the functional pools of a ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)
        h = torch.tanh(h + self.bn1(self.conv(h)))
        h = F.avg_pool2d(h, 2, stride=1) + 0.5 * F.adaptive_avg_pool2d(h, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, (2, 1)), 1))


class Tied(nn.Module):
    """The encoder's weight reused, transposed, by the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.bias_out = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x))
        return self.head(torch.tanh(h @ self.enc.weight + self.bias_out))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x).mean(1))


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, C)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)).mean(1))


class DictInput(nn.Module):
    """Takes a dict of tensors (Hugging-Face style)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, C)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.b(torch.tanh(self.a(batch["x"]) * batch["scale"]))


class TinyLM(nn.Module):
    """Tokens ``(N, L)`` in ``[0, C)`` -> class-last logits ``(N, L, C)``; head tied to the input
    embedding (``tied=True``) or its own ``nn.Linear``; a residual block and a LayerNorm."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(C, 4)
        self.mix = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, C, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        h = h + torch.tanh(self.mix(h))
        return self.head(self.norm(h))


class Transposed(nn.Module):
    """Linear layers on ``(N, L, 4)`` whose logits are transposed to ``(N, C, L)`` for
    ``nn.CrossEntropyLoss`` (the way to use torch's loss on a language model's logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).transpose(1, 2)


def _lm_tokens(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, C, (n, L), generator=g)


def _frozen_first(seq: nn.Module) -> nn.Module:
    assert isinstance(seq, nn.Sequential)
    for p in seq[0].parameters():
        p.requires_grad_(False)
    return seq


def _tokens(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 7, (n, 3), generator=g)


def _dict_inputs(n: int, g: torch.Generator) -> dict[str, Tensor]:
    return {
        "x": torch.randn(n, 4, generator=g, dtype=DT),
        "scale": torch.rand(n, 1, generator=g, dtype=DT) + 0.5,
    }


MODELS: dict[str, ModelSpec] = {}
for _name, _act, _inplace in ACTIVATIONS:
    _seq, _second = _name in SEQ_ACTIVATIONS, True
    for _suffix, _factory in (("", _act), ("_inplace", _inplace)):
        if _factory is not None:
            MODELS[f"act_{_name}{_suffix}"] = ModelSpec(
                _act_mlp(_factory),
                _randn(4),
                chain=True,
                seq=_seq,
                block=True,
                mlp=True,
                second_order=_second,
            )

MODELS.update(
    {
        "conv1d": ModelSpec(
            lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, C, 1)).to(
                DT
            ),
            _randn(2, L),
            out="seq",
            chain=True,
            seq=True,
            block=True,
        ),
        "conv1d_strided": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                nn.Sigmoid(),
                nn.Flatten(),
                nn.Linear(12, C),
            ).to(DT),
            _randn(2, 6),
            chain=True,
            seq=True,
            block=True,
        ),
        "conv2d_maxpool": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1),
                nn.Sigmoid(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(8, C),
            ).to(DT),
            _randn(1, 4, 4),
            chain=True,
            seq=True,
            block=True,
        ),
        "conv2d_avgpool": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=(1, 0), bias=False),
                nn.Tanh(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(4, C),
            ).to(DT),
            _randn(2, 4, 5),
            chain=True,
            seq=True,
            block=True,
        ),
        "conv2d_adaptive": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2, C),
            ).to(DT),
            _randn(1, 5, 5),
            chain=True,
            seq=False,
            block=True,
        ),
        "maxpool1d": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv1d(1, 2, 2), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4, C)
            ).to(DT),
            _randn(1, 5),
            chain=True,
            seq=True,
            block=True,
        ),
        "conv3d_maxpool": ModelSpec(
            lambda: nn.Sequential(
                nn.Conv3d(1, 2, 2),
                nn.ReLU(),
                nn.MaxPool3d(2),
                nn.Flatten(),
                nn.Linear(2, C),
            ).to(DT),
            _randn(1, 3, 3, 3),
            chain=True,
            seq=True,
            block=True,
        ),
        "reshapes_avgpool1d": ModelSpec(
            lambda: nn.Sequential(
                nn.Linear(4, 6),
                nn.Unflatten(1, (2, 3)),
                nn.AvgPool1d(2, stride=1),
                nn.Identity(),
                nn.Flatten(),
                nn.Tanh(),
                nn.Linear(4, C),
            ).to(DT),
            _randn(4),
            chain=True,
            seq=True,
            block=True,
        ),
        "bn_first": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
            ).eval(),
            _randn(4),
            chain=True,
            seq=True,
        ),
        "bn_above_frozen": ModelSpec(
            lambda: _frozen_first(
                _bn_stats(
                    nn.Sequential(
                        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)
                    ).to(DT)
                ).eval()
            ),
            _randn(4),
            chain=True,
            seq=True,
        ),
        "bn_middle": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT)
            ).eval(),
            _randn(4),
            chain=True,
            seq=True,
        ),
        "bn_train": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT)
            ).train(),
            _randn(4),
            chain=True,
            per_sample=False,
        ),
        "bn2d": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(
                    nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, C)
                ).to(DT)
            ).eval(),
            _randn(1, 3, 3),
            chain=True,
            seq=True,
        ),
        "groupnorm": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(
                    nn.Conv1d(2, 4, 2),
                    nn.GroupNorm(2, 4),
                    nn.Tanh(),
                    nn.Flatten(),
                    nn.Linear(12, C),
                ).to(DT)
            ),
            _randn(2, 4),
            chain=True,
        ),
        "layernorm": ModelSpec(
            lambda: _bn_stats(
                nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, C)).to(DT)
            ),
            _randn(4),
            chain=True,
        ),
        "dropout_eval": ModelSpec(
            lambda: (
                nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, C))
                .to(DT)
                .eval()
            ),
            _randn(4),
            chain=True,
            seq=True,
            block=True,
        ),
        "frozen_middle": ModelSpec(
            lambda: _freeze_middle(
                nn.Sequential(
                    nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, C)
                ).to(DT)
            ),
            _randn(4),
            chain=True,
            seq=True,
            block=True,
            mlp=True,
        ),
        "nested_sequential": ModelSpec(
            lambda: nn.Sequential(
                nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, C))
            ).to(DT),
            _randn(4),
            chain=True,
            seq=True,
            block=True,
            mlp=True,
        ),
        "mlp_logsoftmax": ModelSpec(
            lambda: nn.Sequential(
                nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C), nn.LogSoftmax(dim=1)
            ).to(DT),
            _randn(4),
            out="logprob",
            chain=True,
        ),
        "residual": ModelSpec(lambda: Residual().to(DT), _randn(4)),
        "resnet_functional": ModelSpec(
            lambda: _bn_stats(FunctionalResNet().to(DT)).eval(), _randn(1, 6, 6)
        ),
        "tied": ModelSpec(lambda: Tied().to(DT), _randn(4)),
        "gru": ModelSpec(lambda: Recurrent(nn.GRU).to(DT), _randn(3, 3)),
        "lstm": ModelSpec(lambda: Recurrent(nn.LSTM).to(DT), _randn(3, 3)),
        "attention": ModelSpec(lambda: Attention().to(DT).eval(), _randn(3, 4)),
        "transformer": ModelSpec(lambda: Encoder().to(DT).eval(), _randn(3, 4)),
        "embedding": ModelSpec(lambda: EmbeddingBag().to(DT), _tokens),
        "dict_input": ModelSpec(lambda: DictInput().to(DT), _dict_inputs),
        # token-level cross-entropy (issue 15): class-last logits, and torch's transposed ones
        "seq_last_mlp": ModelSpec(
            lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT),
            _randn(L, 4),
            out="seq_last",
            chain=True,
            seq=True,
        ),
        "lm_tied": ModelSpec(lambda: TinyLM(tied=True).to(DT), _lm_tokens, out="seq_last"),
        "lm_untied": ModelSpec(lambda: TinyLM(tied=False).to(DT), _lm_tokens, out="seq_last"),
        "seq_transposed": ModelSpec(lambda: Transposed().to(DT), _randn(L, 4), out="seq"),
    }
)


def _freeze_middle(seq: nn.Sequential) -> nn.Sequential:
    for p in seq[2].parameters():
        p.requires_grad_(False)
    return seq


# ------------------------------------------------------- attention on the graph engine's fast path
class _Attn(nn.Module):
    """``nn.MultiheadAttention`` between two Linear layers, with the options of ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        cross = kind in ("cross", "cross_kdim")
        kdim = 3 if kind == "cross_kdim" else None
        self.inp = nn.Linear(4, 4)
        self.mem = nn.Linear(4, kdim or 4) if cross else None
        self.att = nn.MultiheadAttention(
            4, 2, batch_first=kind != "float_mask", kdim=kdim, vdim=kdim, bias=kind != "cross"
        )
        self.out = nn.Linear(4, C)
        if kind == "float_mask":
            self.register_buffer("mask", torch.randn(3, 3))
        if kind == "causal":
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(3) != 0)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if self.kind == "causal":
            a = self.att(h, h, h, attn_mask=self.mask, is_causal=True, need_weights=False)[0]
        elif self.kind == "float_mask":  # sequence first
            ht = h.transpose(0, 1)
            a = self.att(ht, ht, ht, attn_mask=self.mask, need_weights=False)[0].transpose(0, 1)
        elif self.kind == "padding":
            pad = x[:, :, 0] > x[:, :1, 0]  # the first key is never padded
            a = self.att(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        elif self.kind == "weights":
            a, w = self.att(h, h, h, average_attn_weights=False)
            a = a + w.sum(1) @ h
        else:  # cross-attention: keys and values from another projection of the input
            m = torch.sigmoid(self.mem(x.flip(1)))
            a = self.att(h, m, m, need_weights=False)[0]
        return self.out(a.mean(1))


class _EncoderLayer(nn.Module):
    def __init__(self, norm_first: bool, activation: object) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            4,
            2,
            6,
            0.0,
            activation,
            batch_first=True,
            norm_first=norm_first,  # type: ignore[arg-type]
        )
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x).mean(1))


class _EncoderStack(nn.Module):
    """Two encoder layers with a final norm, a causal mask and ``is_causal=True``."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, 0.0, "gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, nn.LayerNorm(4), enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(3))
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x, mask=self.mask, is_causal=True)[:, -1])


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mem = nn.Linear(4, 4)
        self.dec = nn.TransformerDecoderLayer(4, 2, 6, 0.0, batch_first=True, norm_first=True)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(3))
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        mem = torch.tanh(self.mem(x))
        return self.out(self.dec(x, mem, tgt_mask=self.mask, tgt_is_causal=True).mean(1))


class _SDPA(nn.Module):
    """``F.scaled_dot_product_attention`` called directly: heads by view/transpose, causal,
    a float bias that depends on a parameter, and an output head tied to the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.qkv = nn.Linear(4, 12)
        self.bias = nn.Parameter(0.3 * torch.randn(3, 3))
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        q, k, v = self.qkv(h).view(x.shape[0], 3, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        a = sdpa(q, k, v, is_causal=True)
        b = sdpa(q, k, v, attn_mask=torch.tanh(self.bias))
        o = (a + b).transpose(1, 2).reshape(x.shape[0], 3, 4)
        return self.out(torch.tanh(o @ self.emb.weight).mean(1))


MODELS.update(
    {
        "attn_causal": ModelSpec(lambda: _Attn("causal").to(DT), _randn(3, 4)),
        "attn_float_mask": ModelSpec(lambda: _Attn("float_mask").to(DT), _randn(3, 4)),
        "attn_key_padding": ModelSpec(lambda: _Attn("padding").to(DT).eval(), _randn(3, 4)),
        "attn_weights": ModelSpec(lambda: _Attn("weights").to(DT), _randn(3, 4)),
        "attn_cross": ModelSpec(lambda: _Attn("cross").to(DT), _randn(3, 4)),
        "attn_cross_kdim": ModelSpec(lambda: _Attn("cross_kdim").to(DT), _randn(3, 4)),
        "encoder_train": ModelSpec(
            lambda: _EncoderLayer(False, "gelu").to(DT).train(), _randn(3, 4)
        ),
        "encoder_eval": ModelSpec(lambda: _EncoderLayer(False, "relu").to(DT).eval(), _randn(3, 4)),
        "encoder_norm_first": ModelSpec(
            lambda: _EncoderLayer(True, nn.SiLU()).to(DT).train(), _randn(3, 4)
        ),
        "encoder_stack_causal": ModelSpec(lambda: _EncoderStack().to(DT), _randn(3, 4)),
        "decoder_layer": ModelSpec(lambda: _Decoder().to(DT), _randn(3, 4)),
        "sdpa_custom": ModelSpec(lambda: _SDPA().to(DT), _randn(3, 4)),
    }
)


# ------------------------------------------------------- sequence layers (issue 15)
class SeqLinear(nn.Module):
    """Linear layers on (N, L, d) inputs, a sequence output (N, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))).transpose(1, 2)


class EmbeddingSeq(nn.Module):
    """Embedding of tokens (N, L), Linear on (N, L, d), a sequence output (N, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, C)

    def forward(self, idx: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(self.emb(idx)))).transpose(1, 2)


class TiedLM(nn.Module):
    """A language-model head tied to the input embedding (vocabulary C): logits h E^T."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(C, 4)
        self.mix = nn.Linear(4, 4)
        self.norm = nn.RMSNorm(4)
        self.bias = nn.Parameter(0.1 * torch.randn(C))
        self.head = head

    def forward(self, idx: Tensor) -> Tensor:
        e = self.emb(idx)
        h = self.norm(e + torch.tanh(self.mix(e)))
        if self.head == "matmul":
            logits = h @ self.emb.weight.T
        elif self.head == "linear":
            logits = nn.functional.linear(h, self.emb.weight, self.bias)
        else:  # F.embedding on the shared weight as well
            logits = torch.tanh(nn.functional.embedding(idx, self.emb.weight)) @ self.emb.weight.T
            logits = logits + h @ self.emb.weight.T
        return logits.transpose(1, 2)


class RMSNormNet(nn.Module):
    """RMSNorm over one or two trailing dimensions, with and without a weight."""

    def __init__(self, shape: tuple[int, ...], affine: bool, eps: float | None) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.norm = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
        self.out = nn.Linear(6, C)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)  # (N, 2, 3)
        return self.out(torch.tanh(self.norm(h)).flatten(1))


class EmbeddingPadding(nn.Module):
    """padding_idx on the module and in F.embedding: those rows get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.other = nn.Parameter(torch.randn(7, 4))
        self.out = nn.Linear(4, C)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx) + nn.functional.embedding(idx, self.other, padding_idx=1)
        return self.out(torch.tanh(h)).transpose(1, 2)


class DeepRecurrent(nn.Module):
    """Two bidirectional batch-first layers; every step's output to the head."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 2, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0]).transpose(1, 2)


def _tokens_seq(vocab: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda n, g: torch.randint(0, vocab, (n, L), generator=g)


MODELS.update(
    {
        "linear_seq": ModelSpec(lambda: SeqLinear().to(DT), _randn(L, 4), out="seq"),
        "embedding_seq": ModelSpec(lambda: EmbeddingSeq().to(DT), _tokens_seq(7), out="seq"),
        "tied_lm_matmul": ModelSpec(lambda: TiedLM("matmul").to(DT), _tokens_seq(C), out="seq"),
        "tied_lm_linear": ModelSpec(lambda: TiedLM("linear").to(DT), _tokens_seq(C), out="seq"),
        "tied_lm_function": ModelSpec(lambda: TiedLM("function").to(DT), _tokens_seq(C), out="seq"),
        "embedding_padding": ModelSpec(
            lambda: EmbeddingPadding().to(DT), _tokens_seq(7), out="seq"
        ),
        "gru_deep": ModelSpec(lambda: DeepRecurrent(nn.GRU).to(DT), _randn(L, 3), out="seq"),
        "lstm_deep": ModelSpec(lambda: DeepRecurrent(nn.LSTM).to(DT), _randn(L, 3), out="seq"),
        "rmsnorm": ModelSpec(lambda: RMSNormNet((3,), True, None).to(DT), _randn(2, 4)),
        "rmsnorm_2d": ModelSpec(lambda: RMSNormNet((2, 3), True, 1e-3).to(DT), _randn(2, 4)),
        "rmsnorm_plain": ModelSpec(lambda: RMSNormNet((2, 3), False, None).to(DT), _randn(2, 4)),
    }
)


# the small model each output kind uses in the loss x split block
SMALL_MODEL = {
    "vec": "act_tanh",
    "seq": "conv1d",
    "seq_last": "seq_last_mlp",
    "logprob": "mlp_logsoftmax",
}
