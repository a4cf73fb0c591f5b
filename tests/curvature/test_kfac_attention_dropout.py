"""K-FAC of ``nn.MultiheadAttention`` with dropout in training mode: Kronecker blocks of one mask.

The model (``Net``): Linear layers -> ``nn.MultiheadAttention(dropout=0.25)`` (self-, cross-,
three-input and ``kdim``/``vdim`` attention, ``batch_first`` either way, ``need_weights``
either way, a causal mask and a padded key) -> a Linear head. Built after
``torch.manual_seed(SEED)``, K-FAC / EKFAC linearise at the mask of the attention weights the
module's forward draws from that state (``F.dropout`` on the weights ``(N H, L, S)`` with
``need_weights``, else ``scaled_dot_product_attention``'s ``dropout_p``, both drawn here by
``F.dropout`` on ones ``(N, H, L, S)``). The reference (``Twin``) is that network by hand, its
projections ``nn.Linear`` modules (a packed ``E -> 3E`` for self-attention, ``E -> E`` and
``E -> 2E`` where key and value are one tensor, three otherwise) and the mask multiplied into
the attention weights: its blocks come from the autograd engine's module hooks, not from the
attention recorder. Its parameters are the model's in another order (``index``).

Where the composite path cannot reproduce the module's draw (forced here), or the module has
options it does not decompose (``add_zero_attn``), the projections keep exact diagonals.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.curvature import kfac_attention

DT = torch.float64
E, H, T, C, P, SEED = 4, 2, 3, 3, 0.25, 1234
KDIM, VDIM = 5, 2
ATTN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
ATTN += ("out_proj.weight", "out_proj.bias")


def causal(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def inputs(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Query, key, value (sample-major), key padding and attention masks of ``m``'s layers."""
    h = m.inp(x)
    k = v = h if m.kind == "self" else m.key(x)
    if m.kind in ("qkv", "kdim"):
        v = m.value(x)
    kpm = x[..., -1] > 2.0  # (N, S): a padded key where the last input feature is large
    return h, k, v, kpm, causal(T) if m.kind == "self" else None


class Net(nn.Module):
    """Linear -> nn.MultiheadAttention(dropout=P) -> head; ``kind`` picks the inputs."""

    def __init__(self, kind: str, batch_first: bool, need_weights: bool, **mha) -> None:
        super().__init__()
        self.kind, self.bf, self.nw = kind, batch_first, need_weights
        kdim, vdim = (KDIM, VDIM) if kind == "kdim" else (None, None)
        self.inp = nn.Linear(3, E)
        if kind != "self":
            self.key = nn.Linear(3, kdim or E)
        if kind in ("qkv", "kdim"):
            self.value = nn.Linear(3, vdim or E)
        self.attn = nn.MultiheadAttention(
            E, H, dropout=P, batch_first=batch_first, kdim=kdim, vdim=vdim, **mha
        )
        self.head = nn.Linear(T * E, C)

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        return inputs(self, x)

    def forward(self, x: Tensor) -> Tensor:
        h, k, v, kpm, mask = self.inputs(x)
        if not self.bf:
            h, k, v = h.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if self.kind == "self":
                k = v = h
            elif self.kind == "cross":
                v = k
        out = self.attn(h, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=self.nw)[0]
        if not self.bf:
            out = out.transpose(0, 1)
        return self.head(out.flatten(1))


class Twin(nn.Module):
    """:class:`Net` by hand with the attention-weight ``mask`` ``(N, H, L, S)`` multiplied in.

    Its own copies of the model's layers; the projections are Linear modules.
    """

    def __init__(self, net: Net, mask: Tensor) -> None:
        super().__init__()
        self.kind, self.mask = net.kind, mask
        for name in ("inp", "key", "value"):
            if hasattr(net, name):
                setattr(self, name, copy.deepcopy(getattr(net, name)))
        a = net.attn
        kdim, vdim = (KDIM, VDIM) if self.kind == "kdim" else (E, E)
        # (name, in features, rows of the packed weight and bias)
        if self.kind == "self":
            self.proj = [("qkv", E, (0, 3 * E))]
        elif self.kind == "cross":
            self.proj = [("q", E, (0, E)), ("kv", E, (E, 3 * E))]
        else:
            self.proj = [("q", E, (0, E)), ("k", kdim, (E, 2 * E)), ("v", vdim, (2 * E, 3 * E))]
        for name, d, (r0, r1) in self.proj:
            lin = nn.Linear(d, r1 - r0).to(DT)
            with torch.no_grad():
                if a._qkv_same_embed_dim:
                    lin.weight.copy_(a.in_proj_weight[r0:r1])
                else:
                    lin.weight.copy_(getattr(a, f"{name}_proj_weight"))
                lin.bias.copy_(a.in_proj_bias[r0:r1])
            setattr(self, name, lin)
        self.out = copy.deepcopy(a.out_proj)
        self.head = copy.deepcopy(net.head)
        self.index = self._index(net)

    def forward(self, x: Tensor) -> Tensor:
        h, k, v, kpm, mask = inputs(self, x)
        if self.kind == "self":
            q, k, v = self.qkv(h).chunk(3, -1)
        elif self.kind == "cross":
            q, (k, v) = self.q(h), self.kv(k).chunk(2, -1)
        else:
            q, k, v = self.q(h), self.k(k), self.v(v)
        N, L, _ = q.shape
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(E // H)
        if mask is not None:
            s = s.masked_fill(mask, -math.inf)
        s = s.masked_fill(kpm[:, None, None, :], -math.inf)
        w = torch.softmax(s, -1) * self.mask
        a = self.out((w @ v).transpose(1, 2).reshape(N, L, E))
        return self.head(a.flatten(1))

    def _index(self, net: Net) -> Tensor:
        """Flat positions in the model's parameter vector of the twin's parameters, in order."""
        start, pos = 0, {}
        for name, p in net.named_parameters():
            pos[name] = torch.arange(start, start + p.numel())
            start += p.numel()
        for name, _, (r0, r1) in self.proj:
            if "attn.in_proj_weight" in pos:
                pos[f"{name}.weight"] = pos["attn.in_proj_weight"][r0 * E : r1 * E]
            else:
                pos[f"{name}.weight"] = pos[f"attn.{name}_proj_weight"]
            pos[f"{name}.bias"] = pos["attn.in_proj_bias"][r0:r1]
        pos["out.weight"], pos["out.bias"] = pos["attn.out_proj.weight"], pos["attn.out_proj.bias"]
        return torch.cat([pos[n] for n, _ in self.named_parameters()])


def setup(kind: str, batch_first: bool, need_weights: bool, n: int = 4, **mha):
    """The model in training mode, its twin with the mask of the next draw from SEED, a batch."""
    torch.manual_seed(0)
    model = Net(kind, batch_first, need_weights, **mha).to(DT).train()
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(n, T, 3, generator=gen, dtype=DT)
    X[0, 1, -1] = 3.0  # sample 0 has a padded key
    y = torch.randint(0, C, (n,), generator=gen)
    torch.manual_seed(SEED)
    mask = F.dropout(torch.ones(n, H, T, T, dtype=DT), P, True)
    return model, Twin(model, mask), X, y


CASES = [
    (kind, bf, nw)
    for kind in ("self", "cross", "qkv", "kdim")
    for bf in (True, False)
    for nw in (False, True)
]
IDS = [f"{k}-{'bf' if b else 'tn'}-{'weights' if w else 'sdpa'}" for k, b, w in CASES]


def attention_structure(K: so.KFAC) -> set[str]:
    return {v for k, v in K.structure.items() if k.removeprefix("attn.") in ATTN}


@pytest.mark.parametrize(("kind", "bf", "nw"), CASES, ids=IDS)
def test_the_twin_is_the_models_draw(kind, bf, nw):
    model, twin, X, _ = setup(kind, bf, nw)
    torch.manual_seed(SEED)
    torch.testing.assert_close(model(X), twin(X), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
@pytest.mark.parametrize(("kind", "bf", "nw"), CASES, ids=IDS)
def test_kronecker_blocks_are_the_fixed_mask_networks(kind, bf, nw, cls):
    model, twin, X, y = setup(kind, bf, nw)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(SEED)
    model(X)
    after = torch.get_rng_state()  # where one forward pass leaves the generators
    torch.manual_seed(SEED)
    K = cls(model, loss_fn, (X, y), fisher="exact")
    assert torch.equal(torch.get_rng_state(), after)
    R = cls(twin, loss_fn, (X, y), fisher="exact")
    assert attention_structure(K) == {"kronecker"}
    assert set(R.structure.values()) == {"kronecker"}
    idx = twin.index
    torch.testing.assert_close(K.to_dense()[idx][:, idx], R.to_dense(), rtol=1e-10, atol=1e-12)
    v = torch.randn(K.shape[0], dtype=DT)
    torch.testing.assert_close(
        (K.inverse(1e-2) @ v)[idx], R.inverse(1e-2) @ v[idx], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("kind", ["self", "kdim"])
def test_sampled_and_empirical_kfac_are_the_fixed_mask_networks(kind, fisher, approx):
    model, twin, X, y = setup(kind, False, False)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(SEED)
    K = so.KFAC(
        model,
        loss_fn,
        (X, y),
        fisher=fisher,
        approx=approx,
        generator=torch.Generator().manual_seed(5),
    )
    R = so.KFAC(
        twin,
        loss_fn,
        (X, y),
        fisher=fisher,
        approx=approx,
        generator=torch.Generator().manual_seed(5),
    )
    assert attention_structure(K) == {"kronecker"}
    idx = twin.index
    torch.testing.assert_close(K.to_dense()[idx][:, idx], R.to_dense(), rtol=1e-10, atol=1e-12)


def test_optimizer_step_is_the_fixed_mask_networks_kfac_step():
    """One KFACOptimizer step: theta - lr (K + lam I)^{-1} g of the twin (Kronecker blocks)."""
    model, twin, X, y = setup("self", True, False)
    loss_fn = nn.CrossEntropyLoss()
    lr, lam = 0.5, 0.05
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    idx = twin.index
    R = so.KFAC(twin, loss_fn, (X, y), fisher="exact")
    twin.zero_grad()
    loss_fn(twin(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    step = torch.zeros_like(theta)
    step[idx] = R.inverse(lam) @ g
    opt = so.KFACOptimizer(
        model,
        loss_fn,
        lr=lr,
        damping=lam,
        fisher="exact",
        factor_decay=0.0,
        factor_every=1,
        inverse_every=1,
        kl_clip=None,
        adapt_damping=False,
    )
    torch.manual_seed(SEED)
    opt.step(X, y)
    new = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(new, theta - lr * step, rtol=1e-10, atol=1e-12)


def _exact_diagonal(model: nn.Module, loss_fn, X: Tensor, y: Tensor) -> Tensor:
    """The GGN diagonal of the network with the mask of the draw from SEED."""
    torch.manual_seed(SEED)
    return so.GGN(model, loss_fn, (X, y)).to_dense().diagonal()


def test_an_unmatched_draw_keeps_exact_diagonals(monkeypatch):
    """A composite path that draws another mask fails the check: diagonals, never a block."""
    original = kfac_attention.torch_attention

    def shifted(*args, **kwargs):
        torch.rand(1)  # one extra draw: another mask than the module's
        return original(*args, **kwargs)

    monkeypatch.setattr(kfac_attention, "torch_attention", shifted)
    model, _, X, y = setup("self", True, False)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(SEED)
    model(X)
    after = torch.get_rng_state()
    torch.manual_seed(SEED)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    assert torch.equal(torch.get_rng_state(), after)
    assert attention_structure(K) == {"diagonal"}
    assert K.structure["inp.weight"] == "kronecker"
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    keep = torch.cat(
        [torch.full((s,), n.startswith("attn."), dtype=torch.bool) for n, s in zip(names, sizes)]
    )
    D = _exact_diagonal(model, loss_fn, X, y)
    torch.testing.assert_close(K.to_dense().diagonal()[keep], D[keep], rtol=1e-10, atol=1e-12)


def test_options_it_does_not_decompose_keep_exact_diagonals():
    model, _, X, y = setup("self", True, False, add_zero_attn=True)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(SEED)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    assert attention_structure(K) == {"diagonal"}
    keep = torch.cat(
        [
            torch.full((p.numel(),), n.startswith("attn."), dtype=torch.bool)
            for n, p in model.named_parameters()
        ]
    )
    D = _exact_diagonal(model, loss_fn, X, y)
    torch.testing.assert_close(K.to_dense().diagonal()[keep], D[keep], rtol=1e-10, atol=1e-12)


class Decoder(nn.Module):
    """Linear -> ``nn.TransformerDecoderLayer`` (dropout 0.1, sequence-first) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mem = nn.Linear(3, E), nn.Linear(3, E)
        self.layer = nn.TransformerDecoderLayer(E, H, 6)  # dropout=0.1, batch_first=False
        self.head = nn.Linear(T * E, C)

    def forward(self, x: Tensor) -> Tensor:
        h, m = self.inp(x).transpose(0, 1), self.mem(x.flip(1)).transpose(0, 1)
        return self.head(self.layer(h, m, tgt_mask=causal(T)).transpose(0, 1).flatten(1))


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
def test_every_pass_of_a_decoder_layer_draws_the_forward_passs_masks(monkeypatch, cls):
    """Both attentions get Kronecker blocks; every pass draws the dropout modules' masks of
    one forward pass (the recorded attention leaves the generators where the module does)."""
    torch.manual_seed(0)
    model = Decoder().to(DT).train()
    X = torch.randn(4, T, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = torch.randint(0, C, (4,), generator=torch.Generator().manual_seed(4))
    masks: list[Tensor] = []
    original = F.dropout

    def recorded(x, p=0.5, training=True, inplace=False):
        out = original(x, p, training, inplace)
        if training and p > 0:
            masks.append(out != 0)
        return out

    monkeypatch.setattr(F, "dropout", recorded)
    torch.manual_seed(SEED)
    model(X)
    after, once = torch.get_rng_state(), list(masks)
    assert len(once) == 4  # dropout1, dropout2, the feed-forward's dropout, dropout3
    masks.clear()
    torch.manual_seed(SEED)
    K = cls(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    assert torch.equal(torch.get_rng_state(), after)
    passes = len(masks) // len(once)
    assert passes >= 2 and len(masks) == passes * len(once)  # recorded pass, diagonals (EKFAC)
    for i, m in enumerate(masks):
        assert torch.equal(m, once[i % len(once)])
    attn = {k: v for k, v in K.structure.items() if "attn." in k}
    assert len(attn) == 8 and set(attn.values()) == {"kronecker"}
