"""K-FAC and EKFAC of ``nn.Embedding`` (diagonal input factor) and of tied parameters.

Reference: the embedding is the bias-free Linear map of one-hot rows (zero at ``padding_idx``),
built here as dense one-hot tensors; the output factor :math:`\\sum_n J_n^\\top H_n J_n` comes
from ``jacrev`` of the layers above the embedding and ``jacrev(grad)`` of the loss. The weight
``(V, D)`` is row-major, so its block is :math:`A \\otimes G`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

import secondorder as so

DT = torch.float64
V, D, T, C = 7, 3, 4, 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def offsets(model: nn.Module) -> dict[str, slice]:
    out, k = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(k, k + p.numel())
        k += p.numel()
    return out


def emb_model(kind: str, pad: int | None) -> nn.Sequential:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D, padding_idx=pad)
    if kind == "flat":  # (N, T) -> (N, C)
        return nn.Sequential(emb, nn.Tanh(), nn.Flatten(), nn.Linear(T * D, C)).to(DT)
    return nn.Sequential(emb, nn.Tanh(), nn.Linear(D, C)).to(DT)  # (N, T) -> (N, T, C)


def problem(kind: str, pad: int | None, n: int = 5, seq: int = T):
    model = emb_model(kind, pad)
    gen = torch.Generator().manual_seed(1)
    X = torch.randint(0, V, (n, seq) if seq else (n,), generator=gen)
    if pad is not None and seq:
        X[0, 0] = X[1, 2] = pad
    if kind == "flat":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, C, (n,), generator=gen)
    y = torch.randn(model(X).shape, generator=gen, dtype=DT)
    return model, nn.MSELoss(), X, y


def reference(model, loss_fn, X, y, pad):
    """``A ⊗ G`` of the embedding weight (expand) from one-hot rows and jacrev."""
    X2 = X.reshape(X.shape[0], -1)
    N, Tn = X2.shape
    a = torch.nn.functional.one_hot(X2, V).to(DT)
    if pad is not None:
        a[X2 == pad] = 0.0
    e = model[0](X).detach().reshape(N, Tn, D)
    rest = model[1:]
    z = model(X).detach()
    H = jacrev(grad(lambda zz: loss_fn(zz, y)))(z).reshape(N, z[0].numel(), N, z[0].numel())
    G = torch.zeros(D, D, dtype=DT)
    for n in range(N):

        def f(en, n=n):
            return rest(en.reshape(1, *X.shape[1:], D)).reshape(-1)

        J = jacrev(f)(e[n])  # (Z, T, D)
        for t in range(Tn):
            G += J[:, t].T @ H[n, :, n] @ J[:, t]
    A = torch.einsum("ntv,ntw->vw", a, a) / (N * Tn)
    assert torch.equal(A, torch.diag(torch.diagonal(A)))
    return torch.kron(A, G)


def refuse_graph(monkeypatch):
    from secondorder.curvature import kfac_factors

    monkeypatch.setattr(kfac_factors, "factor_linearization", lambda *a: (None, "forced"))


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("engine", ["sequential", "autograd"])
@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("kind", ["flat", "seq"])
def test_embedding_block_equals_hand_built_kronecker(monkeypatch, kind, pad, engine):
    model, loss_fn, X, y = problem(kind, pad)
    if engine == "autograd":
        refuse_graph(monkeypatch)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    assert K.engine == engine
    assert set(K.structure.values()) == {"kronecker"}
    block = next(b for b in K.blocks.values() if b.transposed)
    assert block.A.shape == (V,)  # diagonal input factor, never V x V
    sl = offsets(model)["0.weight"]
    Dn = K.to_dense()
    ref = reference(model, loss_fn, X, y, pad)
    assert rel_err(Dn[sl, sl], ref) <= 1e-10
    if pad is not None:  # the padding row's block is zero
        rows = torch.arange(sl.start + pad * D, sl.start + (pad + 1) * D)
        assert Dn[rows].abs().max() == 0
    assert Dn[sl, sl.stop :].abs().max() == 0  # no coupling with the other layers


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
def test_reduce_with_shared_positions_keeps_the_exact_diagonal(cls):
    model, loss_fn, X, y = problem("flat", 2)
    K = cls(model, loss_fn, (X, y), fisher="exact", approx="reduce")
    assert K.structure["0.weight"] == "dense"  # V * D <= 64 entries: the exact dense block
    assert K.structure["3.weight"] == "kronecker"
    sl = offsets(model)["0.weight"]
    G = so.GGN(model, loss_fn, (X, y)).to_dense()
    assert rel_err(K.to_dense()[sl, sl], G[sl, sl]) <= 1e-12
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Embedding(30, D, padding_idx=2), nn.Flatten(), nn.Linear(T * D, C))
    wide = wide.to(DT)
    K = cls(wide, loss_fn, (X, y), fisher="exact", approx="reduce")
    assert K.structure["0.weight"] == "diagonal"
    sl = offsets(wide)["0.weight"]
    G = so.GGN(wide, loss_fn, (X, y)).to_dense()
    assert rel_err(K.to_dense()[sl, sl], torch.diag(torch.diagonal(G[sl, sl]))) <= 1e-12
    # one position per sample (inputs (N,)): reduce is expand, a Kronecker block
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Embedding(V, D), nn.Tanh(), nn.Linear(D, C)).to(DT)
    X1 = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(2))
    y1 = torch.randint(0, C, (6,), generator=torch.Generator().manual_seed(3))
    Kr = cls(m1, nn.CrossEntropyLoss(), (X1, y1), fisher="exact", approx="reduce")
    Ke = cls(m1, nn.CrossEntropyLoss(), (X1, y1), fisher="exact", approx="expand")
    assert Kr.structure["0.weight"] == "kronecker"
    assert rel_err(Kr.to_dense(), Ke.to_dense()) <= 1e-12


def test_one_sample_one_token_exact_fisher_equals_ggn_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D), nn.Tanh(), nn.Linear(D, C)).to(DT)
    X, y = torch.tensor([4]), torch.tensor([1])
    loss_fn = nn.CrossEntropyLoss()
    G = so.GGN(model, loss_fn, (X, y)).to_dense()
    sl = offsets(model)
    for cls in (so.KFAC, so.EKFAC):
        K = cls(model, loss_fn, (X, y), fisher="exact")
        assert set(K.structure.values()) == {"kronecker"}
        Kd = K.to_dense()
        for block in (sl["0.weight"], slice(sl["2.weight"].start, sl["2.bias"].stop)):
            assert rel_err(Kd[block, block], G[block, block]) <= 1e-10


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("engine", ["sequential", "autograd"])
def test_ekfac_diagonal_is_the_exact_block_in_the_eigenbasis(monkeypatch, fisher, engine):
    model, loss_fn, X, y = problem("seq", 2)
    if engine == "autograd":
        refuse_graph(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    Ek = so.EKFAC(model, loss_fn, (X, y), fisher=fisher, generator=gen)
    if fisher == "exact":
        B = so.GGN(model, loss_fn, (X, y)).to_dense()
    else:
        from test_kfac import sampled_fisher

        B = sampled_fisher(model, loss_fn, X, y, "mc")
    block = next(b for b in Ek.blocks.values() if b.transposed)
    _, qg, la, qa = block.eigh()
    assert qa is None and torch.equal(la, block.A.clamp_min(0))
    Q = torch.kron(torch.eye(V, dtype=DT), qg.contiguous())  # (V, D) row-major: I_V ⊗ Q_G
    sl = offsets(model)["0.weight"]
    ref = torch.diagonal(Q.T @ B[sl, sl] @ Q)
    assert block.D is not None and block.D.shape == (D, V)
    assert rel_err(block.D.T.reshape(-1), ref) <= 1e-10
    assert rel_err(Ek.to_dense()[sl, sl], Q @ torch.diag(ref) @ Q.T) <= 1e-10


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_inverse_solves_the_damped_system(cls, damping):
    model, loss_fn, X, y = problem("seq", 2)
    K = cls(model, loss_fn, (X, y), fisher="mc")
    v = torch.randn(K.shape[0], dtype=DT)
    M = K.to_dense() + damping * torch.eye(K.shape[0], dtype=DT)
    assert rel_err(K.inverse(damping) @ v, torch.linalg.solve(M, v)) <= 1e-10


def test_several_batches_equal_the_concatenated_batch():
    model, loss_fn, X, y = problem("seq", 2, n=6)
    for cls in (so.KFAC, so.EKFAC):
        one = cls(model, loss_fn, (X, y), fisher="exact").to_dense()
        two = cls(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])], fisher="exact").to_dense()
        assert rel_err(two, one) <= 1e-12


class TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> logits by the embedding's weight (``head`` or direct)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        if how == "module":
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.fc(self.emb(x)))
        logits = self.head(h) if self.how == "module" else h @ self.emb.weight.T
        return logits.transpose(1, 2)  # (N, V, T) for CrossEntropyLoss


class TiedLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        if how == "module":
            self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) if self.how == "module" else h @ self.a.weight.T


@pytest.mark.parametrize("how", ["module", "direct"])
@pytest.mark.parametrize("net", ["lm", "linear"])
def test_tied_parameters_keep_their_exact_diagonal(net, how):
    """A parameter used twice gets no Kronecker block of one use: its exact diagonal."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if net == "lm":
        model = TiedLM(how).to(DT)
        X = torch.randint(0, V, (3, T), generator=gen)
        y = torch.randint(0, V, (3, T), generator=gen)
        loss_fn, tied = nn.CrossEntropyLoss(), "emb.weight"
    else:
        model = TiedLinear(how).to(DT)
        X = torch.randn(5, 4, generator=gen, dtype=DT)
        y = torch.randn(5, 4, generator=gen, dtype=DT)
        loss_fn, tied = nn.MSELoss(), "a.weight"
    for cls in (so.KFAC, so.EKFAC):
        K = cls(model, loss_fn, (X, y), fisher="exact")
        assert K.structure[tied] == "diagonal"
        G = so.GGN(model, loss_fn, (X, y)).to_dense()
        Kd = K.to_dense()
        sl = offsets(model)
        for name, kind in K.structure.items():
            if kind == "diagonal":
                ref = torch.diag(torch.diagonal(G[sl[name], sl[name]]))
                assert rel_err(Kd[sl[name], sl[name]], ref) <= 1e-10, name
        if net == "lm":
            assert K.structure["fc.weight"] == "kronecker"
