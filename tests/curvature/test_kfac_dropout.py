"""K-FAC and EKFAC of models with dropout in training mode: the fixed-mask network's factors.

An operator built after ``torch.manual_seed(SEED)`` linearises at the masks the model's own
forward draws from that state (as every other operator does, ``test_dropout_products.py``):
its factors, its other parameters' blocks (the autograd engine's diagonal pass) and EKFAC's
corrections (a second pass) all belong to the network whose dropout is replaced by those masks.
The reference is K-FAC of that network written by hand (``masks`` multiplied in), on both
engines; the masks come from ``F.dropout`` on tensors of ones drawn in the forward's order.
Models: nn.Dropout / nn.Dropout1d / F.dropout (``DropNet``), a sequence MLP, an
``nn.TransformerEncoderLayer`` with its default ``dropout=0.1`` (attention weights, both
residual branches and the feed-forward block; its attention projections get Kronecker blocks,
compared with those of Linear modules in the hand-written twin), and
``F.scaled_dot_product_attention`` with ``dropout_p > 0`` in a custom forward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from test_dropout_products import SEED, DropNet, masks_from
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so

DT = torch.float64


def draws(seed: int, specs: list[tuple[tuple[int, ...], float]]) -> list[Tensor]:
    """The masks ``F.dropout`` draws on tensors of ones of these shapes, in order, from ``seed``."""
    torch.manual_seed(seed)
    return [F.dropout(torch.ones(shape, dtype=DT), p, True) for shape, p in specs]


class SeqNet(nn.Module):
    """Linear layers on ``(N, T, d)`` with nn.Dropout between them (shared positions)."""

    def __init__(self, masks: list[Tensor] | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(5, 4)
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.a(x))
        h = self.drop(h) if self.masks is None else h * self.masks[0]
        return self.b(h).mean(1)

    @staticmethod
    def specs(n: int) -> list[tuple[tuple[int, ...], float]]:
        return [((n, 4, 5), 0.3)]


class Encoder(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True)``, post-norm, ReLU."""

    def __init__(self) -> None:
        super().__init__(4, 2, dim_feedforward=6, batch_first=True)  # dropout=0.1 (default)

    @staticmethod
    def specs(n: int) -> list[tuple[tuple[int, ...], float]]:
        return [((n, 2, 3, 3), 0.1), ((3, n, 4), 0.1), ((n, 3, 6), 0.1), ((n, 3, 4), 0.1)]


class FixedEncoder(nn.Module):
    """:class:`Encoder` by hand with fixed ``masks``, its attention projections Linear modules.

    Attention with the mask on the attention weights (where the math kernel of
    ``scaled_dot_product_attention`` applies it), then the masks of ``dropout1`` (drawn in the
    memory order of attention's output, which is ``(T, N, E)``), of the feed-forward ``dropout``
    and of ``dropout2``. The packed in-projection is ``qkv`` (a Linear ``E -> 3E``) and the
    out-projection ``out``, called as modules: their blocks are those of Linear layers on
    sequences, built by the module hooks of the autograd engine, not by the attention recorder.
    The parameters are in the layer's order (the same flat vector); :meth:`load_state_dict`
    reads the layer's names.
    """

    def __init__(self, masks: list[Tensor]) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)
        self.linear1, self.linear2 = nn.Linear(4, 6), nn.Linear(6, 4)
        self.norm1, self.norm2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.masks = masks

    def load_state_dict(self, state, *args, **kwargs):  # type: ignore[override]
        def rename(key: str) -> str:
            for old, new in (("self_attn.in_proj_", "qkv."), ("self_attn.out_proj.", "out.")):
                key = key.replace(old, new)
            return key

        return super().load_state_dict({rename(k): v for k, v in state.items()}, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        m = self.masks
        N, T, E = x.shape
        q, k, v = (t.reshape(N, T, 2, E // 2).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E // 2), -1) * m[0]
        a = self.out((w @ v).transpose(1, 2).reshape(N, T, E))
        x = self.norm1(x + a * m[1].transpose(0, 1))  # drawn on attention's (T, N, E) layout
        f = self.linear2(torch.relu(self.linear1(x)) * m[2])
        return self.norm2(x + f * m[3])


def encoder(masks: list[Tensor] | None = None) -> nn.Module:
    """:class:`Encoder`, or with ``masks`` its fixed-mask twin :class:`FixedEncoder`."""
    return Encoder() if masks is None else FixedEncoder(masks)


encoder.specs = Encoder.specs  # type: ignore[attr-defined]


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` with ``dropout_p=0.2`` in training mode."""

    def __init__(self, masks: list[Tensor] | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.o = nn.Linear(4, 3)
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.masks is None:
            h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0)
        else:
            w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) * self.masks[0]
            h = w @ v
        return self.o(h).mean(1)

    @staticmethod
    def specs(n: int) -> list[tuple[tuple[int, ...], float]]:
        return [((n, 3, 3), 0.2)]


def _dropnet_masks(n: int) -> list[Tensor]:
    return masks_from(SEED, n)


# name -> (build(masks), input shape, output features, masks(n))
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], Callable[[int], list]]] = {
    "dropnet": (DropNet, (6, 4), _dropnet_masks),
    "sequence": (SeqNet, (5, 4, 3), lambda n: draws(SEED, SeqNet.specs(n))),
    "encoder": (encoder, (8, 3, 4), lambda n: draws(SEED, Encoder.specs(n))),
    "sdpa": (Attention, (3, 3, 4), lambda n: draws(SEED, Attention.specs(n))),
}


def pair(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """The model in training mode, its fixed-mask twin (same parameters) and a batch."""
    build, shape, masks = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DT).train()
    fixed = build(masks(shape[0])).to(DT)
    fixed.load_state_dict(model.state_dict())
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    return model, fixed, X


def targets(loss: str, z: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(4)
    if loss.startswith("ce"):  # classes along dim 1
        return torch.randint(0, z.shape[1], (z.shape[0], *z.shape[2:]), generator=g)
    if loss == "bce":
        return torch.rand(z.shape, generator=g, dtype=DT).round()
    return torch.randn(z.shape, generator=g, dtype=DT)


LOSSES = {
    "ce": nn.CrossEntropyLoss(),
    "mse": nn.MSELoss(),
    "bce": nn.BCEWithLogitsLoss(),
    "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_references_are_the_models_draw(name):
    model, fixed, X = pair(name)
    torch.manual_seed(SEED)
    torch.testing.assert_close(model(X), fixed(X), rtol=1e-13, atol=1e-14)


ATTENTION = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _build(cls, model, loss_fn, data, fisher, engine, approx="expand"):
    gen = torch.Generator().manual_seed(11) if fisher == "mc" else None
    return cls(model, loss_fn, data, fisher=fisher, engine=engine, approx=approx, generator=gen)


def _assert_same(K: so.KFAC, R: so.KFAC) -> None:
    assert list(K.structure.values()) == list(R.structure.values())  # the same flat order
    if any(name.startswith("self_attn.") for name in K.structure):  # attention with dropout
        assert {K.structure[f"self_attn.{n}"] for n in ATTENTION} == {"kronecker"}
    torch.testing.assert_close(K.to_dense(), R.to_dense(), rtol=1e-10, atol=1e-12)
    v = torch.randn(K.shape[0], dtype=DT)
    torch.testing.assert_close(K.inverse(1e-2) @ v, R.inverse(1e-2) @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["auto", "autograd"])
@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_kfac_is_the_fixed_mask_networks(name, loss, cls, engine):
    model, fixed, X = pair(name)
    loss_fn = LOSSES[loss]
    y = targets(loss, fixed(X))
    torch.manual_seed(SEED)
    K = _build(cls, model, loss_fn, (X, y), "exact", engine)
    R = _build(cls, fixed, loss_fn, (X, y), "exact", engine)
    assert K.engine == R.engine  # the same engine serves the random model and its reference
    _assert_same(K, R)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("name", ["dropnet", "sequence", "encoder"])
def test_sampled_and_empirical_kfac_are_the_fixed_mask_networks(name, cls, fisher, approx):
    model, fixed, X = pair(name)
    loss_fn = nn.MSELoss()
    y = targets("mse", fixed(X))
    torch.manual_seed(SEED)
    K = _build(cls, model, loss_fn, (X, y), fisher, "auto", approx)
    R = _build(cls, fixed, loss_fn, (X, y), fisher, "auto", approx)
    if name == "encoder" and cls is so.EKFAC and approx == "reduce":
        _assert_same_off_null_space(K, R)
    else:
        _assert_same(K, R)


def _assert_same_off_null_space(K: so.KFAC, R: so.KFAC) -> None:
    """EKFAC equal to the reference's off the null space of the packed block's ``G``.

    Under ``"reduce"`` the key rows of the packed in-projection have ``G = 0`` (softmax ignores
    a shift shared by all keys, so the summed key cotangents vanish): EKFAC's eigenbasis is
    arbitrary in ``null(G) (x) R^d~`` (set by rounding), and so is its matrix there. Elsewhere it
    is defined; ``P = I - N N^T`` removes those directions (``N``: ``u (x) e_j`` for ``G``'s null
    vectors ``u``, in the flat layout of weight ``(3E, E)`` then bias ``(3E,)``).
    """
    assert list(K.structure.values()) == list(R.structure.values())
    assert {K.structure[f"self_attn.{n}"] for n in ATTENTION} == {"kronecker"}
    k, r = K.blocks["self_attn.in_proj_weight[0:12]"], R.blocks["qkv"]
    torch.testing.assert_close(k.G, r.G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.A, r.A, rtol=1e-10, atol=1e-12)
    e, q = torch.linalg.eigh(r.G)
    null = q[:, e <= 1e-12 * e.max()]  # (3E, E): the key rows
    assert null.shape[1] == 4
    out, d = r.G.shape[0], r.A.shape[0] - 1
    N = torch.zeros(K.shape[0], null.shape[1] * (d + 1), dtype=DT)
    for j in range(d + 1):  # column u (x) e_j: weight entries o * d + j, then the bias o
        rows = torch.arange(out) * d + j if j < d else out * d + torch.arange(out)
        N[rows, j * null.shape[1] : (j + 1) * null.shape[1]] = null
    P = torch.eye(K.shape[0], dtype=DT) - N @ N.T
    torch.testing.assert_close(P @ K.to_dense() @ P, P @ R.to_dense() @ P, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
def test_attention_without_dropout_before_dropout_modules(cls):
    """Attention's output keeps the module's memory layout: ``dropout1`` draws the same mask."""
    model, fixed, X = pair("encoder")
    model.self_attn.dropout = 0.0
    specs = Encoder.specs(X.shape[0])
    fixed.masks = [torch.ones(specs[0][0], dtype=DT), *draws(SEED, specs[1:])]
    loss_fn = nn.MSELoss()
    y = targets("mse", fixed(X))
    torch.manual_seed(SEED)
    torch.testing.assert_close(model(X), fixed(X), rtol=1e-13, atol=1e-14)
    torch.manual_seed(SEED)
    K = _build(cls, model, loss_fn, (X, y), "exact", "auto")
    _assert_same(K, _build(cls, fixed, loss_fn, (X, y), "exact", "auto"))


def _masks_of_forward(n: int) -> list[Tensor]:
    """The masks DropNet's forward draws on a batch of ``n`` from the current state."""
    one = torch.ones((), dtype=DT)
    return [
        F.dropout(one.expand(n, 6), 0.4, True),
        F.dropout1d(one.expand(n, 2, 3), 0.5, True),
        F.dropout(one.expand(n, 6), 0.3, True),
    ]


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_several_batches_draw_one_mask_each(engine):
    """Batches get their own masks, drawn in order; the factors add up over them."""
    model, _, X = pair("dropnet")
    Xs = [X[:2], X[2:]]
    loss_fn = nn.CrossEntropyLoss()
    ys = [targets("ce", model(x)) for x in Xs]
    torch.manual_seed(SEED)
    masks = [_masks_of_forward(x.shape[0]) for x in Xs]  # batch by batch, in order
    fixed = [DropNet(m).to(DT) for m in masks]
    for f in fixed:
        f.load_state_dict(model.state_dict())
    torch.manual_seed(SEED)
    K = so.KFAC(model, loss_fn, list(zip(Xs, ys)), fisher="exact", engine=engine)
    parts = [
        so.KFAC(f, loss_fn, (x, y), fisher="exact", engine=engine) for f, x, y in zip(fixed, Xs, ys)
    ]
    n = X.shape[0]
    for node, block in K.blocks.items():  # mean loss: batch weights n_b / n
        A = sum(p.blocks[node].A * (x.shape[0] / n) for p, x in zip(parts, Xs))
        G = sum(p.blocks[node].G * (x.shape[0] / n) for p, x in zip(parts, Xs))
        torch.testing.assert_close(block.A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.G, G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_generators_move_on_as_after_one_forward_pass(name, cls):
    """One draw per batch however many passes: the next operator draws new masks."""
    model, _, X = pair(name)
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    torch.manual_seed(SEED)
    model(X)
    want = torch.get_rng_state()
    torch.manual_seed(SEED)
    cls(model, loss_fn, (X, y), fisher="exact")
    assert torch.equal(torch.get_rng_state(), want)


def without_dropout(name: str, model: nn.Module) -> nn.Module:
    """The network ``name`` without dropout, with ``model``'s weights.

    The hand-written forward with masks of ones; for the encoder torch's layer with every
    dropout probability 0 (the hand-written forward reads the attention parameters directly,
    which get diagonal blocks where torch's layer gets Kronecker ones).
    """
    if name == "encoder":
        plain = copy.deepcopy(model)
        for m in plain.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.0
        return plain
    build, shape, masks = MODELS[name]
    plain = build([torch.ones_like(m) for m in masks(shape[0])]).to(DT)
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("engine", ["auto", "autograd"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_mode_is_the_network_without_dropout(name, engine):
    model, _, X = pair(name)
    plain = without_dropout(name, model)
    model.eval()
    plain.eval()
    loss_fn = nn.MSELoss()
    y = targets("mse", plain(X))
    before = torch.get_rng_state()
    K = so.EKFAC(model, loss_fn, (X, y), fisher="exact", engine=engine)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn
    _assert_same(K, so.EKFAC(plain, loss_fn, (X, y), fisher="exact", engine=engine))


def test_batch_statistics_are_still_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"BatchNorm1d.*batch statistics"):
        so.KFAC(model.train(), nn.MSELoss(), (X, y), fisher="exact")
