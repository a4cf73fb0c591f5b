"""K-FAC and EKFAC against dense float64 references built with torch.func (not with the factors).

The references: the exact GGN (``so.GGN``, itself checked against ``jacrev(grad)``), and a
Kronecker product assembled by hand from each layer's inputs (convolution patches as the
Jacobian of the layer's output with respect to its weight) and the output-Hessian factor
:math:`\\sum_n J_n^\\top H_n J_n` with :math:`J_n` the Jacobian of the network above the layer
(``jacrev``) and :math:`H_n` the loss Hessian (``jacrev(grad)``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev
from torch.nn import functional as F

import secondorder as so

DT = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def offsets(model: nn.Module) -> dict[str, slice]:
    out, k = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(k, k + p.numel())
        k += p.numel()
    return out


def layer_index(model: nn.Module, i: int) -> torch.Tensor:
    """Flat indices of layer ``i``'s weight then bias."""
    sl = offsets(model)
    parts = [torch.arange(sl[f"{i}.{n}"].start, sl[f"{i}.{n}"].stop) for n in ("weight", "bias")]
    return torch.cat(parts)


def targets_for(loss_fn, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, z.shape[1], (z.shape[0], *z.shape[2:]), generator=gen)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.rand(z.shape, generator=gen, dtype=DT).round()
    return torch.randn(z.shape, generator=gen, dtype=DT)


LOSSES = {
    "mse": nn.MSELoss(),
    "mse_sum": nn.MSELoss(reduction="sum"),
    "ce": nn.CrossEntropyLoss(),
    "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
    "bce": nn.BCEWithLogitsLoss(),
}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, 3))


def cnn2d() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def cnn1d() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, dilation=2), nn.Sigmoid(), nn.Flatten(), nn.Linear(9, 3)
    )


def seq_mlp() -> nn.Sequential:  # inputs (N, T, d), outputs (N, T, C)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


INPUTS = {"mlp": (3,), "cnn2d": (2, 5, 5), "cnn1d": (2, 7), "seq": (4, 3)}
BUILD = {"mlp": mlp, "cnn2d": cnn2d, "cnn1d": cnn1d, "seq": seq_mlp}


def problem(kind: str, loss_name: str, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILD[kind]().to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *INPUTS[kind], generator=gen, dtype=DT)
    loss_fn = LOSSES[loss_name]
    y = targets_for(loss_fn, model(X).detach(), gen)
    return model, loss_fn, X, y


# ------------------------------------------------------------------ hand-built reference
def kronecker_layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def layer_inputs(model: nn.Sequential, i: int, x: torch.Tensor) -> torch.Tensor:
    """Rows ``(N, T, d)`` with ``y[n, :, t] = W a[n, t] + b`` (patches by ``jacrev``)."""
    h = x
    for m in model[:i]:
        h = m(h)
    layer = model[i]
    if isinstance(layer, nn.Linear):
        return h.reshape(h.shape[0], -1, h.shape[-1])

    def conv(w):
        return layer._conv_forward(h, w, None)

    jac = jacrev(conv)(layer.weight.detach())  # (N, out, *pos, out, in, *kernel)
    N, out = h.shape[0], layer.out_channels
    j = jac.reshape(N, out, -1, out, layer.weight[0].numel())
    return j[:, 0, :, 0, :]  # (N, P, in k)


def output_factor(model: nn.Sequential, i: int, x, y, loss_fn) -> torch.Tensor:
    """``M_n = J_n^T H_n J_n`` per sample, shape ``(N, T, out, T, out)``."""
    h = x
    for m in model[: i + 1]:
        h = m(h)
    rest = model[i + 1 :]
    z = rest(h).detach()
    H = jacrev(grad(lambda zz: loss_fn(zz, y)))(z)  # (*z, *z)
    N, Z = z.shape[0], z[0].numel()
    H = H.reshape(N, Z, N, Z)
    conv = isinstance(model[i], (nn.Conv1d, nn.Conv2d))
    out_blocks = []
    for n in range(N):
        J = jacrev(lambda yn: rest(yn.unsqueeze(0)).squeeze(0))(h[n].detach())  # (*z_n, *y_n)
        J = J.reshape(Z, *h[n].shape)
        J = J.reshape(Z, J.shape[1], -1).transpose(1, 2) if conv else J.reshape(Z, -1, J.shape[-1])
        Jf = J.reshape(Z, -1)  # (Z, T out)
        M = Jf.T @ H[n, :, n, :] @ Jf
        T, out = J.shape[1], J.shape[2]
        out_blocks.append(M.reshape(T, out, T, out))
    return torch.stack(out_blocks)


def reference_block(model, i, X, y, loss_fn, approx: str) -> torch.Tensor:
    a = layer_inputs(model, i, X).detach()
    a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=DT)], dim=-1)
    M = output_factor(model, i, X, y, loss_fn)
    N, T = a.shape[:2]
    if approx == "expand":
        A = torch.einsum("ntd,nte->de", a, a) / (N * T)
        G = torch.einsum("ntatb->ab", M)
    else:
        am = a.mean(1)
        A = am.T @ am / N
        G = torch.einsum("nsatb->ab", M)
    out, dt = G.shape[0], A.shape[0]
    K = torch.kron(G, A).reshape(out, dt, out, dt)
    # [W | b] -> flat order: weight (out, d) then bias (out,)
    W = K[:, :-1, :, :-1].reshape(out * (dt - 1), out * (dt - 1))
    Wb = K[:, :-1, :, -1].reshape(out * (dt - 1), out)
    bb = K[:, -1, :, -1]
    return torch.cat([torch.cat([W, Wb], 1), torch.cat([Wb.T, bb], 1)], 0)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_one_sample_exact_fisher_equals_ggn_blocks(loss_name):
    model, loss_fn, X, y = problem("mlp", loss_name, 1)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact").to_dense()
    G = so.GGN(model, loss_fn, (X, y)).to_dense()
    for i in kronecker_layers(model):
        idx = layer_index(model, i)
        assert rel_err(K[idx][:, idx], G[idx][:, idx]) <= 1e-12
    E = so.EKFAC(model, loss_fn, (X, y), fisher="exact").to_dense()
    for i in kronecker_layers(model):
        idx = layer_index(model, i)
        assert rel_err(E[idx][:, idx], G[idx][:, idx]) <= 1e-10


@pytest.mark.parametrize(
    "kind, loss_name",
    [
        ("mlp", "ce"),
        ("mlp", "mse_sum"),
        ("mlp", "bce"),
        ("cnn2d", "ce"),
        ("cnn1d", "mse"),
        ("seq", "mse"),
        ("seq", "bce"),
    ],
)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_dense_equals_hand_built_kronecker(kind, loss_name, approx):
    model, loss_fn, X, y = problem(kind, loss_name, 3)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact", approx=approx)
    D = K.to_dense()
    assert set(K.structure.values()) == {"kronecker"}
    layers = kronecker_layers(model)
    covered = torch.zeros_like(D, dtype=torch.bool)
    for i in layers:
        idx = layer_index(model, i)
        ref = reference_block(model, i, X, y, loss_fn, approx)
        assert rel_err(D[idx][:, idx], ref) <= 1e-10, (i, rel_err(D[idx][:, idx], ref))
        covered[idx[:, None], idx[None, :]] = True
    assert D[~covered].abs().max() == 0  # no coupling between layers


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_empirical_and_mc_match_their_definitions(fisher):
    """Empirical: one column of scaled true gradients; MC: the average of many draws -> exact."""
    model, loss_fn, X, y = problem("mlp", "ce", 1)
    exact = so.KFAC(model, loss_fn, (X, y), fisher="exact").to_dense()
    if fisher == "empirical":
        K = so.KFAC(model, loss_fn, (X, y), fisher="empirical").to_dense()
        g = so.GGN(model, loss_fn, (X, y)).gradient()  # one sample: the empirical Fisher is g g^T
        for i in kronecker_layers(model):
            idx = layer_index(model, i)
            assert rel_err(K[idx][:, idx], torch.outer(g[idx], g[idx])) <= 1e-12
        return
    M = 20000 if fisher == "mc" else 1
    gen = torch.Generator().manual_seed(3)
    K = so.KFAC(model, loss_fn, (X, y), fisher=fisher, num_samples=M, generator=gen).to_dense()
    # the G factor is a mean of M i.i.d. outer products: relative error ~ 1/sqrt(M)
    assert rel_err(K, exact) <= 5 / math.sqrt(M)
    assert rel_err(K, exact) > 0 or fisher == "exact"


def test_mc_is_reproducible_and_uses_the_generator():
    model, loss_fn, X, y = problem("mlp", "ce", 4)
    a = so.KFAC(model, loss_fn, (X, y), generator=torch.Generator().manual_seed(1)).to_dense()
    b = so.KFAC(model, loss_fn, (X, y), generator=torch.Generator().manual_seed(1)).to_dense()
    c = so.KFAC(model, loss_fn, (X, y), generator=torch.Generator().manual_seed(2)).to_dense()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("kind, loss_name", [("mlp", "ce"), ("cnn2d", "mse"), ("seq", "mse")])
def test_ekfac_diagonal_is_exact_block_in_the_eigenbasis(kind, loss_name, fisher):
    """D = diag((Q_G ⊗ Q_A)^T B (Q_G ⊗ Q_A)) with B the exact block of the same matrix."""
    model, loss_fn, X, y = problem(kind, loss_name, 3)
    gen = torch.Generator().manual_seed(0)
    E = so.EKFAC(model, loss_fn, (X, y), fisher=fisher, num_samples=1, generator=gen)
    if fisher == "exact":
        B = so.GGN(model, loss_fn, (X, y)).to_dense()
    else:  # per-sample gradients of the sampled (or true) targets, by torch.func
        B = sampled_fisher(model, loss_fn, X, y, fisher)
    D = E.to_dense()
    for block in E.blocks.values():
        assert block.weight is not None
        i = int(E.fmodel.names[block.weight].split(".")[0])
        _, qg, _, qa = block.eigh()
        Q = torch.kron(qg, qa).reshape(block.out, block.d + 1, -1)
        Qf = torch.cat([Q[:, :-1].reshape(-1, Q.shape[-1]), Q[:, -1]], 0)  # flat order
        idx = layer_index(model, i)
        ref = torch.diagonal(Qf.T @ B[idx][:, idx] @ Qf)
        assert block.D is not None
        assert rel_err(block.D.reshape(-1), ref) <= 1e-10
        assert rel_err(D[idx][:, idx], Qf @ torch.diag(ref) @ Qf.T) <= 1e-10


def sampled_fisher(model, loss_fn, X, y, fisher):
    """Σ s ∇ℓ ∇ℓᵀ per loss row (empirical) or per sample with regenerated draws (mc)."""
    from secondorder.curvature.losses import loss_terms

    z = model(X).detach()
    terms = loss_terms(loss_fn, z, y)
    if fisher == "empirical":
        U = terms.from_rows(terms.per_row_gradients().unsqueeze(0))
    else:
        U = terms.sampled_gradients(1, torch.Generator().manual_seed(0))
    U = U[0] * math.sqrt(terms.scale)
    params = dict(model.named_parameters())
    rows = []
    positions = z[0, ..., 0].numel() if fisher == "empirical" else 1
    for n in range(X.shape[0]):
        for j in range(positions):
            mask = torch.zeros_like(U[n]).reshape(-1, U.shape[-1])
            mask[j if positions > 1 else slice(None)] = 1

            def f(p, n=n, mask=mask):
                out = torch.func.functional_call(model, p, (X[n : n + 1],))
                return (out[0] * U[n] * mask.view_as(U[n])).sum()

            g = grad(f)({k: v.detach() for k, v in params.items()})
            rows.append(torch.cat([g[k].reshape(-1) for k in params]))
    R = torch.stack(rows)
    return R.T @ R


class LNNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.ln(self.fc(x))))


@pytest.mark.parametrize("width, kind", [(4, "dense"), (70, "diagonal")])
def test_other_parameters_get_exact_blocks(width, kind):
    torch.manual_seed(0)
    model = LNNet(width).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    K = so.KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    assert K.structure == {
        "fc.weight": "kronecker",
        "fc.bias": "kronecker",
        "ln.weight": kind,
        "ln.bias": kind,
        "head.weight": "kronecker",
        "head.bias": "kronecker",
    }
    D = K.to_dense()
    G = so.GGN(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    for name in ("ln.weight", "ln.bias"):
        sl = offsets(model)[name]
        ref = G[sl, sl] if kind == "dense" else torch.diag(torch.diagonal(G[sl, sl]))
        assert rel_err(D[sl, sl], ref) <= 1e-12
    ln_w, ln_b = offsets(model)["ln.weight"], offsets(model)["ln.bias"]
    assert D[ln_w, ln_b].abs().max() == 0


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("width", [4, 70])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_inverse_solves_the_damped_system(cls, width, damping):
    torch.manual_seed(0)
    model = LNNet(width).to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 1, 0, 2])
    K = cls(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    V = torch.randn(K.shape[0], 3, dtype=DT)
    inv = K.inverse(damping)
    assert rel_err(inv @ (K @ V + damping * V), V) <= 1e-9
    assert rel_err(inv @ V[:, 0], (inv @ V)[:, 0]) <= 1e-14
    dense = torch.linalg.inv(K.to_dense() + damping * torch.eye(K.shape[0], dtype=DT))
    assert rel_err(inv.to_dense(), dense) <= 1e-8


def test_inverse_damping_floor_and_bad_damping():
    model, loss_fn, X, y = problem("mlp", "ce", 1)  # rank-deficient factors
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact", damping_floor=1e-6)
    v = torch.randn(K.shape[0], dtype=DT)
    out = K.inverse(0.0) @ v
    assert torch.isfinite(out).all()
    assert rel_err(out, K.inverse(1e-6) @ v) == 0
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1.0)


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize(
    "kind, loss_name, approx",
    [
        ("mlp", "ce", "expand"),
        ("mlp", "mse_sum", "expand"),
        ("cnn2d", "bce", "expand"),
        ("seq", "mse", "reduce"),
        ("seq", "mse", "expand"),
    ],
)
def test_several_batches_equal_the_concatenated_batch(cls, fisher, kind, loss_name, approx):
    model, loss_fn, X, y = problem(kind, loss_name, 7)
    full = cls(model, loss_fn, (X, y), fisher=fisher, approx=approx).to_dense()
    parts = [(X[:3], y[:3]), (X[3:4], y[3:4]), (X[4:], y[4:])]
    split = cls(model, loss_fn, parts, fisher=fisher, approx=approx).to_dense()
    assert rel_err(split, full) <= 1e-12


def test_ignore_index_batches_are_weighted_like_the_loss():
    model, _, X, y = problem("mlp", "ce", 6)
    y = y.clone()
    y[[1, 4]] = -100
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    full = so.KFAC(model, loss_fn, (X, y), fisher="empirical").to_dense()
    split = so.KFAC(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])], fisher="empirical")
    assert rel_err(split.to_dense(), full) <= 1e-12


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
def test_float32_model(cls):
    model, loss_fn, X, y = problem("mlp", "ce", 4)
    model32 = model.float()
    K = cls(model32, loss_fn, (X.float(), y), fisher="exact")
    assert K.dtype == torch.float32 and K.factor_dtype == torch.float32
    K64 = cls(model32, loss_fn, (X.float(), y), fisher="exact", factor_dtype=torch.float64)
    assert K64.factor_dtype == torch.float64
    v = torch.randn(K.shape[0])
    assert (K64 @ v).dtype == torch.float32
    ref = cls(model.double(), loss_fn, (X, y), fisher="exact")
    assert rel_err((K @ v).double(), ref @ v.double()) <= 1e-4
    assert rel_err((K64 @ v).double(), ref @ v.double()) <= 1e-5


def test_params_subset_and_structure_order():
    model, loss_fn, X, y = problem("mlp", "ce", 4)
    chosen = [model[4].weight, model[0].bias]  # a bias without its weight, and the reverse
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact", params=chosen)
    assert list(K.structure) == ["4.weight", "0.bias"]
    full = so.KFAC(model, loss_fn, (X, y), fisher="exact").to_dense()
    sl = offsets(model)
    idx = torch.cat([torch.arange(sl["4.weight"].start, sl["4.weight"].stop)])
    D = K.to_dense()
    n4 = model[4].weight.numel()
    # a weight alone: G ⊗ A without the bias row of A (same A, same G)
    assert rel_err(D[:n4, :n4], full[idx][:, idx]) <= 1e-12
    b = torch.arange(sl["0.bias"].start, sl["0.bias"].stop)
    assert rel_err(D[n4:, n4:], full[b][:, b]) <= 1e-12


def test_bad_inputs_raise_clear_errors():
    model, loss_fn, X, y = problem("mlp", "ce", 4)
    with pytest.raises(ValueError, match="fisher"):
        so.KFAC(model, loss_fn, (X, y), fisher="type2")
    with pytest.raises(ValueError, match="approx"):
        so.KFAC(model, loss_fn, (X, y), approx="mean")
    with pytest.raises(ValueError, match="num_samples"):
        so.KFAC(model, loss_fn, (X, y), num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        so.KFAC(model, loss_fn, (X, y), fisher="exact", num_samples=3)
    with pytest.raises(ValueError, match="trainable parameters"):
        so.KFAC(model, loss_fn, (X, y), params=[])
    with pytest.raises(ValueError, match="likelihood"):
        so.KFAC(model, lambda z, t: F.cross_entropy(z, t), (X, y), fisher="exact")
    with pytest.raises(ValueError, match="factor_dtype"):
        so.KFAC(model, loss_fn, (X, y), factor_dtype=torch.float16)
    with pytest.raises(ValueError, match="damping_floor"):
        so.KFAC(model, loss_fn, (X, y), damping_floor=-1.0)
    with pytest.raises(ValueError, match="more than once"):
        so.KFAC(Twice().to(DT), loss_fn, (X, y))
    with pytest.raises(ValueError, match="samples"):  # BatchNorm in training mode mixes samples
        bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DT)
        so.KFAC(bn, loss_fn, (X, y))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class Attention(nn.Module):
    """Hand-written attention: its matrix products have no per-sample rule (autograd engine)."""

    def __init__(self, d: int = 6, T: int = 4, C: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 8), nn.Linear(8, d)
        self.head = nn.Linear(d * T, C)
        self.d = d

    def forward(self, x):
        h = self.inp(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        h = self.ln(h + att @ self.v(h))
        h = h + self.f2(torch.tanh(self.f1(h)))
        return self.head(h.flatten(1))


def refuse_graph(monkeypatch):
    from secondorder.curvature import kfac_factors

    monkeypatch.setattr(kfac_factors, "factor_linearization", lambda *a: (None, "forced"))


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
@pytest.mark.parametrize(
    "kind, loss_name, approx",
    [
        ("mlp", "ce", "expand"),
        ("cnn2d", "mse", "reduce"),
        ("seq", "mse", "reduce"),
        ("seq", "bce", "expand"),
        ("cnn1d", "ce", "expand"),
    ],
)
def test_autograd_engine_equals_graph_engine(monkeypatch, cls, fisher, kind, loss_name, approx):
    model, loss_fn, X, y = problem(kind, loss_name, 3)
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    kw = dict(fisher=fisher, approx=approx)
    graph = cls(model, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw)
    assert graph.engine == "sequential"
    refuse_graph(monkeypatch)
    auto = cls(model, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw)
    assert auto.engine == "autograd" and auto.engine_reason == "forced"
    assert auto.structure == graph.structure
    assert rel_err(auto.to_dense(), graph.to_dense()) <= 1e-12


@pytest.mark.parametrize("width", [4, 70])
def test_autograd_engine_other_parameters_get_exact_diagonals(monkeypatch, width):
    torch.manual_seed(0)
    model = LNNet(width).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    graph = so.KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact").to_dense()
    refuse_graph(monkeypatch)
    K = so.KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    assert K.structure["ln.weight"] == K.structure["ln.bias"] == "diagonal"
    D = K.to_dense()
    sl = offsets(model)
    ln = slice(sl["ln.weight"].start, sl["ln.bias"].stop)
    assert rel_err(D[ln, ln], torch.diag(torch.diagonal(graph[ln, ln]))) <= 1e-12
    rest = torch.ones(D.shape[0], dtype=torch.bool)
    rest[ln] = False
    assert rel_err(D[rest][:, rest], graph[rest][:, rest]) <= 1e-12


@pytest.mark.parametrize("model_name", ["attention", "encoder"])
def test_transformers_through_the_autograd_engine(model_name):
    torch.manual_seed(0)
    if model_name == "attention":
        model = Attention().to(DT)
    else:
        model = nn.Sequential(
            nn.Linear(3, 6),
            nn.TransformerEncoderLayer(6, 2, 8, 0.0, batch_first=True),
            nn.Flatten(),
            nn.Linear(24, 3),
        ).to(DT)
    X, y = torch.randn(3, 4, 3, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    assert K.engine == "autograd"
    G = so.GGN(model, loss_fn, (X, y)).to_dense()
    D = K.to_dense()
    sl = offsets(model)
    for name, kind in K.structure.items():
        if kind == "diagonal":  # exact
            ref = torch.diag(torch.diagonal(G[sl[name], sl[name]]))
            assert rel_err(D[sl[name], sl[name]], ref) <= 1e-10, name
    head = "head" if model_name == "attention" else "3"
    idx = torch.cat(
        [torch.arange(sl[f"{head}.{n}"].start, sl[f"{head}.{n}"].stop) for n in ("weight", "bias")]
    )
    # the head sees inputs (N, d): with one sample its K-FAC block is the exact GGN block
    K1 = so.KFAC(model, loss_fn, (X[:1], y[:1]), fisher="exact").to_dense()
    G1 = so.GGN(model, loss_fn, (X[:1], y[:1])).to_dense()
    assert rel_err(K1[idx][:, idx], G1[idx][:, idx]) <= 1e-10
    assert set(K.structure.values()) == {"kronecker", "diagonal"}
    if model_name == "encoder":  # the attention's projections: Kronecker blocks (recorded)
        assert K.structure["1.self_attn.in_proj_weight"] == "kronecker"
        assert K.structure["1.self_attn.out_proj.weight"] == "kronecker"
        assert K.structure["1.linear1.weight"] == "kronecker"
    v = torch.randn(K.shape[0], dtype=DT)
    assert rel_err(K.inverse(1e-2) @ (K @ v + 1e-2 * v), v) <= 1e-10


@pytest.mark.parametrize("T, out, d", [(1, 5, 4), (2, 10, 10), (4, 3, 3)])  # outer, Gram, rows
def test_ekfac_corrections_forms_agree(T, out, d):
    from secondorder.curvature.kfac_factors import _add_rotated_squares

    g = torch.Generator().manual_seed(0)
    gr, ar = (
        torch.randn(3, 5, T, out, generator=g, dtype=DT),
        torch.randn(5, T, d, generator=g, dtype=DT),
    )
    total = torch.zeros(out, d, dtype=DT)
    _add_rotated_squares(total, gr, ar)
    ref = sum((gr[k, n].T @ ar[n]).square() for k in range(3) for n in range(5))
    assert rel_err(total, ref) <= 1e-13


def test_inverse_preconditions_cg():
    """A linear model under MSE has a Kronecker GGN: K-FAC's M makes CG converge at once."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(DT)
    X = torch.randn(40, 6, dtype=DT) * torch.linspace(0.1, 10, 6, dtype=DT)  # ill-conditioned
    y = torch.randn(40, 4, dtype=DT)
    loss_fn = nn.MSELoss()
    G = so.GGN(model, loss_fn, (X, y))
    lam = 1e-4
    A = G + lam * so.Identity(G.shape[0], dtype=DT)
    b = G.gradient()
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    assert rel_err(K.to_dense(), G.to_dense()) <= 1e-12
    x0, plain = so.cg(A, b, rtol=1e-10, maxiter=500)
    x1, pre = so.cg(A, b, rtol=1e-10, maxiter=500, M=K.inverse(lam))
    assert pre.status == so.SolverStatus.CONVERGED and pre.iterations == 1
    assert plain.iterations > 3
    assert rel_err(x1, x0) <= 1e-8


def test_hessian_free_takes_kfac_as_preconditioner():
    model, loss_fn, X, y = problem("mlp", "ce", 16)

    def build(batches, damping):
        return so.KFAC(model, loss_fn, batches, fisher="mc").inverse(damping)

    opt = so.HessianFree(model, loss_fn, preconditioner=build, cg_maxiter=20)
    first = opt.step(X, y)
    for _ in range(3):
        last = opt.step(X, y)
    assert float(last) < float(first)
    assert opt.diagnostics["cg_iterations"] >= 1


def test_a_layer_without_per_sample_rows_sends_the_model_to_autograd():
    """Conv2d with groups=2 has no per-sample formula: its parameters get exact diagonals."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 2, groups=2), nn.Flatten(), nn.Linear(16, 3)
    ).to(DT)
    X, y = torch.randn(3, 2, 5, 5, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    for cls in (so.KFAC, so.EKFAC):
        K = cls(model, loss_fn, (X, y), fisher="exact")
        assert K.engine == "autograd"
        assert K.structure["2.weight"] == K.structure["2.bias"] == "diagonal"
        assert K.structure["0.weight"] == K.structure["4.weight"] == "kronecker"
        D, G = K.to_dense(), so.GGN(model, loss_fn, (X, y)).to_dense()
        sl = offsets(model)
        for name in ("2.weight", "2.bias"):
            ref = torch.diag(torch.diagonal(G[sl[name], sl[name]]))
            assert rel_err(D[sl[name], sl[name]], ref) <= 1e-12


class SmallResNet(nn.Module):
    """The benchmark ResNet's layout (functional ReLU and pools, BatchNorm, two residual sums)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.short = nn.Conv2d(3, 4, 1, stride=2, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)
        h = F.relu(h + self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(h)) + self.short(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = SmallResNet().to(DT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC])
@pytest.mark.parametrize("fisher, approx", [("exact", "expand"), ("mc", "reduce")])
def test_resnet_graph_engine_equals_autograd_engine(monkeypatch, cls, fisher, approx):
    """Functional pools and eval-mode BatchNorm: the graph engine serves, as autograd would.

    The Kronecker blocks agree; BatchNorm's parameters get their exact dense block from the
    graph engine (equal to the GGN's block for ``"exact"``) and its diagonal from autograd.
    """
    model = small_resnet()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 1, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    kw = dict(fisher=fisher, approx=approx)
    graph = cls(model, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw)
    assert graph.engine == "sequential", graph.engine_reason
    refuse_graph(monkeypatch)
    auto = cls(model, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw)
    assert auto.engine == "autograd"
    bn = [n for n in graph.structure if n.startswith("bn")]
    assert {graph.structure[n] for n in bn} == {"dense"}
    assert {auto.structure[n] for n in bn} == {"diagonal"}
    assert all(
        graph.structure[n] == auto.structure[n] == "kronecker"
        for n in graph.structure
        if n not in bn
    )
    G, A = graph.to_dense(), auto.to_dense()
    sl = offsets(model)
    mask = torch.zeros(G.shape[0], dtype=torch.bool)
    for n in bn:
        mask[sl[n]] = True
    assert rel_err(A[~mask][:, ~mask], G[~mask][:, ~mask]) <= 1e-10
    assert rel_err(torch.diagonal(A)[mask], torch.diagonal(G)[mask]) <= 1e-10
    assert (A[mask][:, mask] - torch.diag(torch.diagonal(A)[mask])).abs().max() == 0
    if fisher == "exact":  # the dense blocks are the GGN's (a reference built another way)
        ggn = so.GGN(model, loss_fn, data).to_dense()
        for n in bn:  # one block per parameter
            assert rel_err(G[sl[n], sl[n]], ggn[sl[n], sl[n]]) <= 1e-10
