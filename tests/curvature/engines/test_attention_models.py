"""Attention and transformers on the graph engine's fast path (no per-node autograd).

The conformance matrix (``tests/conformance/models.py``: ``attn_*``, ``encoder_*``,
``decoder_layer``, ``sdpa_custom``, ``attention``, ``transformer``, ``tied``) checks every
operator on these models against dense float64 references; here: that they run on the graph path
with no node differentiated by autograd (so the fast path cannot silently regress), that the
traced decompositions reproduce torch's fused evaluation path, and that random attention
(dropout) and options the decompositions do not reproduce go to autograd and stay exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the conformance package

import secondorder as so
from conformance.models import MODELS
from secondorder.curvature.engines.graph import graph_linearization
from secondorder.curvature.model import FunctionalModel

DT = torch.float64
CE = nn.CrossEntropyLoss()
FAST = [
    n
    for n in MODELS
    if n.startswith(("attn_", "encoder_", "decoder_", "sdpa_"))
    or n in ("attention", "transformer", "tied")
]


def _batch(name: str, n: int = 5) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MODELS[name].build()
    return model, (MODELS[name].inputs(n, g), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("name", FAST)
def test_attention_models_take_the_graph_path_without_autograd_nodes(name: str) -> None:
    model, data = _batch(name)
    for op in (so.GGN(model, CE, data), so.Hessian(model, CE, data, engine="graph")):
        op @ torch.ones(op.shape[0], dtype=DT)
        info = op.engine_info[0]
        assert info.path == "graph", info
        assert info.autograd_nodes == (), info


class _Encoder(nn.Module):
    def __init__(self, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            8, 2, 16, 0.1, activation, batch_first=True, norm_first=norm_first
        )
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("activation", "norm_first"), [("relu", False), ("gelu", True)])
def test_decomposition_agrees_with_the_fused_eval_path(
    dtype: torch.dtype, activation: str, norm_first: bool
) -> None:
    """The graph's output equals torch's fused ``_transformer_encoder_layer_fwd`` in eval."""
    torch.manual_seed(0)
    model = _Encoder(activation, norm_first).to(dtype).eval()
    x = torch.randn(4, 5, 8, dtype=dtype)
    with torch.no_grad():  # no gradients: torch takes its fused path
        fused = model(x)
    assert torch.backends.mha.get_fastpath_enabled()
    fmodel = FunctionalModel(model)
    lin = graph_linearization(fmodel, (x,), [p.detach() for p in fmodel.params])
    assert lin.path == "graph" and not lin.autograd_nodes
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = float(fused.abs().max())
    assert float((lin.z - fused).abs().max()) <= tol * scale


class _DropoutSDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=0.3).mean(1))


class _DropoutMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("cls", [_DropoutSDPA, _DropoutMHA])
def test_attention_dropout_is_one_mask_per_linearisation(cls: type[nn.Module]) -> None:
    """Random attention goes to autograd: one mask per build, the same for every product."""
    torch.manual_seed(0)
    model = cls().to(DT).train()
    x, y = torch.randn(6, 3, 4, dtype=DT), torch.randint(0, 3, (6,))
    torch.manual_seed(1)
    G = so.GGN(model, CE, (x, y))
    v = torch.randn(G.shape[0], dtype=DT)
    first = G @ v
    info = G.engine_info[0]
    assert info.path == "autograd" or len(info.autograd_nodes) == 1, info
    torch.testing.assert_close(G @ v, first, rtol=0, atol=0)
    dense = G.to_dense()
    torch.testing.assert_close(dense @ v, first, rtol=1e-12, atol=1e-12)
    # the same mask (same random state) through whole-model autograd gives the same matrix
    torch.manual_seed(1)
    Ga = so.GGN(model, CE, (x, y), engine="autograd")
    torch.testing.assert_close(Ga.to_dense(), dense, rtol=1e-10, atol=1e-12)
    torch.manual_seed(1)
    H = so.Hessian(model, CE, (x, y), engine="graph")
    torch.manual_seed(1)
    Ha = so.Hessian(model, CE, (x, y), engine="autograd")
    torch.testing.assert_close(H.to_dense(), Ha.to_dense(), rtol=1e-10, atol=1e-12)


class _BiasKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


def test_options_without_decomposition_go_to_autograd() -> None:
    """``add_bias_kv``: the attention module is one autograd node, and exact."""
    torch.manual_seed(0)
    model = _BiasKV().to(DT)
    data = (torch.randn(5, 3, 4, dtype=DT), torch.randint(0, 3, (5,)))
    G = so.GGN(model, CE, data)
    dense = G.to_dense()
    assert G.engine_info[0].autograd_nodes == ("att",)
    ref = so.GGN(model, CE, data, engine="autograd").to_dense()
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)


def _roots() -> list[tuple[str, nn.Module, tuple[Tensor, ...]]]:
    torch.manual_seed(0)
    x, mem = torch.randn(3, 4, 8, dtype=DT), torch.randn(3, 5, 8, dtype=DT)
    enc = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True)
    stack = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, 0.0, "gelu", norm_first=True),
        2,
        enable_nested_tensor=False,
    )
    dec = nn.TransformerDecoderLayer(8, 2, 16, 0.0, batch_first=True)
    dec_stack = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(8, 2, 16, 0.0, "gelu", batch_first=True), 2, nn.LayerNorm(8)
    )
    causal = nn.Transformer.generate_square_subsequent_mask(4, dtype=DT)
    full = nn.Transformer(8, 2, 1, 1, 16, 0.0, batch_first=True, norm_first=True)
    return [
        ("encoder_layer_eval", enc.to(DT).eval(), (x,)),
        ("encoder_stack_seq_first", stack.to(DT).train(), (x.transpose(0, 1),)),
        ("decoder_layer", dec.to(DT), (x, mem)),
        ("decoder_stack_causal", dec_stack.to(DT).eval(), (x, mem, causal)),
        ("transformer", full.to(DT), (mem, x, None, causal)),
    ]


@pytest.mark.parametrize("case", _roots(), ids=lambda c: c[0])
def test_torch_modules_as_the_whole_model(case: tuple[str, nn.Module, tuple[Tensor, ...]]) -> None:
    """A transformer layer passed as the model itself is traced by its decomposition too."""
    _, model, inputs = case
    with torch.no_grad():
        target = torch.randn_like(model(*inputs))
    data = (inputs, target)
    for make in (so.GGN, so.Hessian):
        op = make(model, nn.MSELoss(), data)
        dense = op.to_dense()
        info = op.engine_info[0]
        assert info.path == "graph" and info.autograd_nodes == (), info
        ref = make(model, nn.MSELoss(), data, engine="autograd").to_dense()
        torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-12)


def test_a_changed_activation_is_retraced() -> None:
    """The decomposition bakes the layer's activation function in: changing it retraces."""
    torch.manual_seed(0)
    model = _EncoderLayerModel()
    data = (torch.randn(4, 3, 8, dtype=DT), torch.randint(0, 3, (4,)))
    so.GGN(model, CE, data).to_dense()
    model.enc.activation = F.gelu
    G = so.GGN(model, CE, data)
    dense = G.to_dense()
    assert G.engine_info[0].autograd_nodes == ()
    ref = so.GGN(model, CE, data, engine="autograd").to_dense()
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)


class _EncoderLayerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).to(DT)
        self.out = nn.Linear(8, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x).mean(1))
