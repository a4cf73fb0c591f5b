"""K-FAC of attention projections and embeddings against references built with torch.func.

Reference of a projection's block: with a zero probe added to the attention module's output
(a forward hook of the test), ``jacrev`` of the real model per sample gives the Jacobian of the
output with respect to the out-projection's output, :math:`J_{nt}`, and with respect to each
parameter. A Linear map's weight Jacobian is :math:`\\sum_t J_{nt} \\otimes \\tilde a_{nt}`, so
the unknown side (the in-projections' output Jacobians from the observed inputs, the
out-projection's inputs from the probe's Jacobians) follows by a pseudo-inverse (checked to
reconstruct). :math:`G = \\sum J^\\top H J` (loss Hessian ``jacrev(grad)``) and :math:`A` then
follow the expand/reduce definitions, independently of the library's factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

import secondorder as so

DT = torch.float64
E, HEADS, T, C = 4, 2, 3, 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def close(a: torch.Tensor, b: torch.Tensor, whole: torch.Tensor, tol: float = 1e-9) -> bool:
    """``a`` equals ``b`` relatively, or to ``tol * 1e-8`` of ``whole`` where ``b`` is ~0."""
    return bool((a - b).norm() <= tol * max(float(b.norm()), 1e-8 * float(whole.norm())))


def offsets(model: nn.Module) -> dict[str, slice]:
    out, k = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(k, k + p.numel())
        k += p.numel()
    return out


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


# --------------------------------------------------------------------------------- models
class AttnNet(nn.Module):
    """Linear -> nn.MultiheadAttention -> head; masks computed from the input (per sample)."""

    def __init__(self, kind: str, batch_first: bool, seq: int = T) -> None:
        super().__init__()
        kdim = vdim = None
        if kind == "kdim":
            kdim, vdim = 5, 2
        self.kind, self.bf = kind, batch_first
        self.inp = nn.Linear(3, E)
        if kind != "self":
            self.key = nn.Linear(3, kdim or E)
        if kind in ("qkv", "kdim"):
            self.value = nn.Linear(3, vdim or E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.head = nn.Linear(seq * E, C)

    def forward(self, x):
        h = self.inp(x)
        k = v = h if self.kind == "self" else self.key(x)
        if self.kind in ("qkv", "kdim"):
            v = self.value(x)
        kpm = x[..., -1] > 2.0  # (N, S): a padded key where the last input feature is large
        if not self.bf:
            h, k, v = h.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if self.kind == "self":
                k = v = h
            elif self.kind == "cross":
                v = k
        mask = causal(h.shape[1] if self.bf else h.shape[0]) if self.kind == "self" else None
        out = self.attn(h, k, v, key_padding_mask=kpm, attn_mask=mask)[0]
        if not self.bf:
            out = out.transpose(0, 1)
        return self.head(out.flatten(1))


class EncoderNet(nn.Module):
    def __init__(self, batch_first: bool, decoder: bool = False) -> None:
        super().__init__()
        self.bf, self.decoder = batch_first, decoder
        self.inp = nn.Linear(3, E)
        if decoder:
            self.mem = nn.Linear(3, E)
            self.layer = nn.TransformerDecoderLayer(E, HEADS, 6, 0.0, batch_first=batch_first)
        else:
            self.layer = nn.TransformerEncoderLayer(E, HEADS, 6, 0.0, batch_first=batch_first)
        self.head = nn.Linear(T * E, C)

    def forward(self, x):
        h = self.inp(x)
        m = self.mem(x.flip(1)) if self.decoder else None
        if not self.bf:
            h = h.transpose(0, 1)
            m = None if m is None else m.transpose(0, 1)
        if self.decoder:
            out = self.layer(h, m, tgt_mask=causal(T))
        else:
            out = self.layer(h, src_mask=causal(T))
        if not self.bf:
            out = out.transpose(0, 1)
        return self.head(out.flatten(1))


def data(n: int, seed: int = 0, seq: int = T):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, seq, 3, generator=gen, dtype=DT)
    if seq > 1:
        X[0, 1, -1] = 3.0  # sample 0 has a padded key
    y = torch.randint(0, C, (n,), generator=gen)
    return X, y


# ------------------------------------------------------------------------------ reference
class Probe:
    """A forward hook adding ``delta`` to an attention module's output (first element)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.delta = module, None

    def __enter__(self):
        def hook(mod, args, out):
            return (out[0] + self.delta, *out[1:]) if self.delta is not None else out

        self.h = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.h.remove()


def sample_jacobians(model, attn, X, names, batch_first):
    """Per sample: ``{name: dz/dparam}`` ``(Z, *shape)`` and ``dz/d(attention output)``
    ``(Z, T, E)``, and the attention module's (query, key, value) inputs (sample-major)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    seen = []
    pre = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append([t.detach() for t in (a + tuple(kw.values()))[:3]]),
        with_kwargs=True,
    )
    out = []
    try:
        for n in range(X.shape[0]):
            xn = X[n : n + 1]
            with torch.no_grad():
                seen.clear()
                model(xn)
            qkv = [t[0] if batch_first else t[:, 0] for t in seen[0]]
            shape = (1, *qkv[0].shape) if batch_first else (qkv[0].shape[0], 1, E)

            def f(sub, delta, xn=xn):
                with Probe(attn) as probe:
                    probe.delta = delta
                    return functional_call(model, {**params, **sub}, (xn,)).reshape(-1)

            sub = {k: params[k] for k in names}
            Js, Jd = jacrev(f, argnums=(0, 1))(sub, torch.zeros(shape, dtype=DT))
            Jd = Jd.reshape(Jd.shape[0], *qkv[0].shape[:1], E)
            out.append((Js, Jd, qkv))
    finally:
        pre.remove()
    return out


def loss_hessian(model, loss_fn, X, y):
    z = model(X).detach()
    H = jacrev(grad(lambda zz: loss_fn(zz, y)))(z)
    N = z.shape[0]
    return H.reshape(N, -1, N, z[0].numel())


def factors(J, a, H, approx):
    """``G`` and ``A`` from ``J`` ``(N, Z, T, out)``, inputs ``a`` ``(N, T, d~)``, ``H``."""
    N, Tn = a.shape[:2]
    M = torch.einsum("nzto,nzy,nysp->ntosp", J, torch.stack([H[n, :, n] for n in range(N)]), J)
    if approx == "expand":
        return torch.einsum("ntotp->op", M), torch.einsum("ntd,nte->de", a, a) / (N * Tn)
    am = a.mean(1)
    return torch.einsum("nsotp->op", M), am.T @ am / N


def flat_index(sl: dict[str, slice], wname, bname, r0, out, d, b0):
    w = sl[wname].start + r0 * d
    idx = [torch.arange(w, w + out * d)]
    if bname is not None:
        idx.append(torch.arange(sl[bname].start + b0, sl[bname].start + b0 + out))
    return torch.cat(idx)


def kron_block(G, A, has_bias):
    out, dt = G.shape[0], A.shape[0]
    K = torch.kron(G, A).reshape(out, dt, out, dt)
    if not has_bias:
        return K.reshape(out * dt, out * dt)
    W = K[:, :-1, :, :-1].reshape(out * (dt - 1), out * (dt - 1))
    Wb = K[:, :-1, :, -1].reshape(out * (dt - 1), out)
    return torch.cat([torch.cat([W, Wb], 1), torch.cat([Wb.T, K[:, -1, :, -1]], 1)], 0)


def ones(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=DT)], -1)


def solve_right(Jw, a):
    """``J`` with ``Jw = J a`` (``Jw`` ``(Z, out, d~)``, ``a`` ``(T, d~)``): ``(Z, T, out)``."""
    Z, out, dt = Jw.shape
    J = Jw.reshape(Z * out, dt) @ torch.linalg.pinv(a)
    assert rel_err(J @ a, Jw.reshape(Z * out, dt)) <= 1e-9
    return J.reshape(Z, out, -1).transpose(1, 2)


def attention_pieces(attn: nn.MultiheadAttention, prefix: str, self_attn: bool, cross: bool):
    """``(weight name, bias name, row0, rows, bias row0, input slot)`` of each projection."""
    p = f"{prefix}."
    if not attn._qkv_same_embed_dim:
        return [
            (p + f"{c}_proj_weight", p + "in_proj_bias", 0, E, i * E, i)
            for i, c in enumerate("qkv")
        ]
    w, b = p + "in_proj_weight", p + "in_proj_bias"
    if self_attn:
        return [(w, b, 0, 3 * E, 0, 0)]
    if cross:
        return [(w, b, 0, E, 0, 0), (w, b, E, 2 * E, E, 1)]
    return [(w, b, i * E, E, i * E, i) for i in range(3)]


def check_attention(model, attn, prefix, X, y, approx, self_attn, cross, batch_first):
    """Every projection block of ``attn`` equals the reference; cross blocks are zero."""
    loss_fn = nn.CrossEntropyLoss()
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact", approx=approx)
    assert K.engine == "autograd"
    names = [n for n, _ in attn.named_parameters()]
    for n in names:
        assert K.structure[f"{prefix}.{n}"] == "kronecker", n
    D = K.to_dense()
    sl = offsets(model)
    H = loss_hessian(model, loss_fn, X, y)
    full = [f"{prefix}.{n}" for n in names]
    per = sample_jacobians(model, attn, X, full, batch_first)
    blocks = []
    for wname, bname, r0, rows, b0, slot in attention_pieces(attn, prefix, self_attn, cross):
        Js, a = [], []
        for J_par, _, qkv in per:
            Jw = torch.cat(
                [J_par[wname][:, r0 : r0 + rows], J_par[bname][:, b0 : b0 + rows, None]], -1
            )
            at = ones(qkv[slot])
            Js.append(solve_right(Jw, at))
            a.append(at)
        G, A = factors(torch.stack(Js), torch.stack(a), H, approx)
        idx = flat_index(sl, wname, bname, r0, rows, A.shape[0] - 1, b0)
        # (under "reduce" the keys' G vanishes: softmax ignores a shift shared by all keys)
        assert close(D[idx][:, idx], kron_block(G, A, True), D), (wname, r0)
        blocks.append(idx)
    # out_proj: J from the probe, its inputs from the weight Jacobian
    ow, ob = f"{prefix}.out_proj.weight", f"{prefix}.out_proj.bias"
    Js, a = [], []
    for J_par, Jd, _ in per:
        Z = Jd.shape[0]
        Jm = Jd.transpose(1, 2).reshape(Z * E, -1)  # (Z out, T)
        o = torch.linalg.pinv(Jm) @ J_par[ow].reshape(Z * E, E)  # (T, E)
        assert rel_err(Jm @ o, J_par[ow].reshape(Z * E, E)) <= 1e-9
        Js.append(Jd)
        a.append(ones(o))
    G, A = factors(torch.stack(Js), torch.stack(a), H, approx)
    idx = flat_index(sl, ow, ob, 0, E, E, 0)
    assert close(D[idx][:, idx], kron_block(G, A, True), D)
    blocks.append(idx)
    for i, bi in enumerate(blocks):  # different projections: zero blocks
        for bj in blocks[i + 1 :]:
            assert D[bi][:, bj].abs().max() == 0
    return K


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "qkv", "kdim"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_projections_equal_hand_built_kronecker(kind, batch_first, approx):
    torch.manual_seed(0)
    model = AttnNet(kind, batch_first).to(DT)
    X, y = data(3)
    check_attention(
        model, model.attn, "attn", X, y, approx, kind == "self", kind == "cross", batch_first
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("decoder", [False, True])
def test_transformer_layers_equal_hand_built_kronecker(batch_first, decoder):
    torch.manual_seed(0)
    model = EncoderNet(batch_first, decoder).to(DT)
    X, y = data(3)
    layer = model.layer
    K = check_attention(
        model, layer.self_attn, "layer.self_attn", X, y, "expand", True, False, batch_first
    )
    if decoder:
        check_attention(
            model,
            layer.multihead_attn,
            "layer.multihead_attn",
            X,
            y,
            "expand",
            False,
            True,
            batch_first,
        )
    assert set(K.structure.values()) == {"kronecker", "diagonal"}
    assert {n for n, s in K.structure.items() if s == "diagonal"} == {
        n for n, _ in model.named_parameters() if ".norm" in n
    }
    # linear1 of a batch_first=False layer sees (T, N, E): its block is read sample-major
    lin = layer.linear1
    seen = []
    hook = lin.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    model(X)
    hook.remove()
    x = seen[0] if batch_first else seen[0].transpose(0, 1)
    sl = offsets(model)
    D = K.to_dense()
    loss_fn = nn.CrossEntropyLoss()
    H = loss_hessian(model, loss_fn, X, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    Js = []
    for n in range(X.shape[0]):
        sub = {k: params[k] for k in ("layer.linear1.weight", "layer.linear1.bias")}
        Jp = jacrev(lambda s, n=n: functional_call(model, {**params, **s}, (X[n : n + 1],))[0])(sub)
        Jw = torch.cat([Jp["layer.linear1.weight"], Jp["layer.linear1.bias"][..., None]], -1)
        Js.append(solve_right(Jw, ones(x[n])))
    G, A = factors(torch.stack(Js), ones(x), H, "expand")
    idx = flat_index(sl, "layer.linear1.weight", "layer.linear1.bias", 0, 6, E, 0)
    assert rel_err(D[idx][:, idx], kron_block(G, A, True)) <= 1e-9


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_one_token_one_sample_exact_fisher_equals_ggn_blocks(kind):
    """With T = 1 and N = 1 every projection's K-FAC block is its exact GGN block."""
    torch.manual_seed(0)
    model = AttnNet(kind, True, seq=1).to(DT)
    X, y = data(1, seq=1)
    loss_fn = nn.CrossEntropyLoss()
    for cls in (so.KFAC, so.EKFAC):
        K = cls(model, loss_fn, (X, y), fisher="exact")
        assert K.structure["attn.in_proj_weight"] == "kronecker"
        D = K.to_dense()
        G = so.GGN(model, loss_fn, (X, y)).to_dense()
        sl = offsets(model)
        E3 = 3 * E
        pieces = [torch.arange(sl["attn.out_proj.weight"].start, sl["attn.out_proj.bias"].stop)]
        w, b = sl["attn.in_proj_weight"].start, sl["attn.in_proj_bias"].start
        rows = [(0, E3)] if kind == "self" else [(0, E), (E, E3)]
        for r0, r1 in rows:
            pieces.append(
                torch.cat([torch.arange(w + r0 * E, w + r1 * E), torch.arange(b + r0, b + r1)])
            )
        for idx in pieces:
            assert rel_err(D[idx][:, idx], G[idx][:, idx]) <= 1e-10


def test_recorded_attention_equals_the_module_and_falls_back_on_disagreement(monkeypatch):
    """The recorder's composite forward reproduces torch's; a disagreement gives diagonals."""
    from secondorder.curvature import kfac_attention
    from secondorder.curvature.model import FunctionalModel

    torch.manual_seed(0)
    for kind in ("self", "cross", "qkv", "kdim"):
        for bf in (True, False):
            model = AttnNet(kind, bf).to(DT)
            X, _ = data(3)
            ref = model(X)
            fm = FunctionalModel(model, None)
            with kfac_attention.AttentionRecorder(fm) as rec:
                got = model(X)
            assert len(rec.pieces) == {"self": 2, "cross": 3}.get(kind, 4)
            assert rel_err(got, ref) <= 1e-12
    model = AttnNet("self", True).to(DT)
    X, y = data(3)
    real = kfac_attention.multi_head_attention
    monkeypatch.setattr(
        kfac_attention, "multi_head_attention", lambda *a: (real(*a)[0] * 1.1, None)
    )
    K = so.KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    assert K.structure["attn.in_proj_weight"] == K.structure["attn.out_proj.weight"] == "diagonal"
    assert K.structure["inp.weight"] == K.structure["head.weight"] == "kronecker"
    Gd = torch.diagonal(so.GGN(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    sl = offsets(model)
    span = slice(sl["attn.in_proj_weight"].start, sl["attn.out_proj.bias"].stop)
    assert rel_err(torch.diagonal(K.to_dense())[span], Gd[span]) <= 1e-10


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_ekfac_diagonal_in_the_eigenbasis_of_attention_blocks(kind, fisher):
    """EKFAC's D on every projection block is diag(Q^T B Q) of the exact block B."""
    torch.manual_seed(0)
    model = AttnNet(kind, False).to(DT)
    X, y = data(3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    Ek = so.EKFAC(model, loss_fn, (X, y), fisher=fisher, generator=gen)
    if fisher == "exact":
        B = so.GGN(model, loss_fn, (X, y)).to_dense()
    else:
        from test_kfac import sampled_fisher

        B = sampled_fisher(model, loss_fn, X, y, "mc")
    sl = offsets(model)
    Kf = so.KFAC(model, loss_fn, (X, y), fisher=fisher, generator=torch.Generator().manual_seed(0))
    D = Ek.to_dense()
    seen = 0
    for name, block in Ek.blocks.items():
        if not name.startswith("attn"):
            continue
        seen += 1
        _, qg, _, qa = block.eigh()
        wn, bn = Ek.fmodel.names[block.weight], Ek.fmodel.names[block.bias]
        idx = flat_index(sl, wn, bn, block.wrow, block.out, block.d, block.brow)
        Q = torch.kron(qg, qa).reshape(block.out, block.d + 1, -1)
        Qf = torch.cat([Q[:, :-1].reshape(-1, Q.shape[-1]), Q[:, -1]], 0)
        ref = torch.diagonal(Qf.T @ B[idx][:, idx] @ Qf)
        assert rel_err(block.D.reshape(-1), ref) <= 1e-10
        assert rel_err(D[idx][:, idx], Qf @ torch.diag(ref) @ Qf.T) <= 1e-10
        kb = Kf.blocks[name]
        assert rel_err(kb.G, block.G) <= 1e-12 and rel_err(kb.A, block.A) <= 1e-12
    assert seen == (2 if kind == "self" else 3)  # in_proj (or q rows, k/v rows), out_proj


@pytest.mark.parametrize("kind", ["self", "kdim"])
def test_a_subset_of_the_projections_gives_the_sub_blocks(kind):
    """Selecting weights without their biases (or one bias): the blocks restricted to them."""
    torch.manual_seed(0)
    model = AttnNet(kind, True).to(DT)
    X, y = data(3)
    loss_fn = nn.CrossEntropyLoss()
    full = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    names = ["attn.out_proj.bias", "inp.weight"]
    names += ["attn.in_proj_weight"] if kind == "self" else ["attn.k_proj_weight"]
    named = dict(model.named_parameters())
    sub = so.KFAC(model, loss_fn, (X, y), fisher="exact", params=[named[n] for n in names])
    assert set(sub.structure.values()) == {"kronecker"}
    sl = offsets(model)
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in sub.structure])
    assert rel_err(sub.to_dense(), full.to_dense()[idx][:, idx]) <= 1e-12


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("model_name", ["encoder", "decoder"])
def test_inverse_solves_the_damped_system(cls, model_name):
    torch.manual_seed(0)
    model = EncoderNet(False, model_name == "decoder").to(DT)
    X, y = data(3)
    K = cls(model, nn.CrossEntropyLoss(), (X, y), fisher="mc")
    v = torch.randn(K.shape[0], dtype=DT)
    M = K.to_dense() + 1e-2 * torch.eye(K.shape[0], dtype=DT)
    assert rel_err(K.inverse(1e-2) @ v, torch.linalg.solve(M, v)) <= 1e-9


def test_attention_called_twice_is_refused_like_a_linear_layer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(E, HEADS, batch_first=True)
            self.head = nn.Linear(T * E, C)

        def forward(self, x):
            h = x.repeat(1, 1, 2)[..., :E]
            h = self.a(h, h, h)[0]
            return self.head(self.a(h, h, h)[0].flatten(1))

    X, y = data(3)
    with pytest.raises(ValueError, match="more than once"):
        so.KFAC(Twice().to(DT), nn.CrossEntropyLoss(), (X, y))


def test_unbatched_and_unsupported_attention_keep_exact_diagonals():
    """add_bias_kv (no decomposition) keeps diagonals, exactly the GGN's."""
    torch.manual_seed(0)
    model = AttnNet("self", True).to(DT)
    model.attn = nn.MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True).to(DT)
    X, y = data(3)
    K = so.KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    assert K.structure["attn.in_proj_weight"] == "diagonal"
    assert K.structure["attn.out_proj.weight"] == "diagonal"
    Gd = torch.diagonal(so.GGN(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    sl = offsets(model)
    for n in ("attn.in_proj_weight", "attn.out_proj.weight", "attn.bias_k"):
        assert rel_err(torch.diagonal(K.to_dense())[sl[n]], Gd[sl[n]]) <= 1e-10
