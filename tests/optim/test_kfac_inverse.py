"""K-FAC's explicit-inverse mode (``inverse="cholesky"``) against dense float64 references.

The reference is built with torch.linalg from the operator ``so.KFAC``'s factors (whose own tests
check them against the exact GGN): per Kronecker block the dense
``kron(G + sqrt(lam)/pi I, A + pi sqrt(lam) I)`` placed at the block's flat indices, ``B + lam I``
for the other blocks, and the step solved by ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import secondorder as so
from secondorder.curvature.kron_inverse import damped_inverse, factored_damping

DT = torch.float64
LOSSES = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss()}
PLAIN = dict(
    factor_decay=0.0,
    factor_every=1,
    inverse_every=1,
    kl_clip=None,
    adapt_damping=False,
    inverse="cholesky",
)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


def normed() -> nn.Module:  # LayerNorm(6): dense blocks; LayerNorm(70): diagonal blocks
    return nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 70), nn.LayerNorm(70),
        nn.Tanh(), nn.Linear(70, 3),
    )  # fmt: skip


MODELS = {"mlp": (mlp, (4,)), "cnn": (cnn, (2, 4, 4)), "normed": (normed, (4,))}


def problem(kind="mlp", loss="ce", n=8, seed=0):
    make, shape = MODELS[kind]
    torch.manual_seed(seed)
    model = make().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = 3.0 * torch.randn(n, *shape, generator=g, dtype=DT)  # tr A / dim A far from tr G / dim G
    if loss == "ce":
        y = torch.randint(0, 3, (n,), generator=g)
    elif loss == "bce":
        y = torch.rand(n, 3, generator=g, dtype=DT).round()
    else:
        y = torch.randn(n, 3, generator=g, dtype=DT)
    return model, LOSSES[loss], X, y


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ref_grad(model, loss_fn, X, y) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    return torch.cat([g[k].reshape(-1) for k in params])


def block_indices(model: nn.Module, b) -> torch.Tensor:
    """Flat indices of the block's ``[W | b]`` entries in row-major ``(out, d~)`` order."""
    offsets = [0]
    for p in model.parameters():
        offsets.append(offsets[-1] + p.numel())
    cols = []
    if b.weight is not None:
        cols.append(torch.arange(offsets[b.weight], offsets[b.weight + 1]).reshape(b.out, b.d))
    if b.bias is not None:
        cols.append(torch.arange(offsets[b.bias], offsets[b.bias + 1]).reshape(b.out, 1))
    return torch.cat(cols, dim=1).reshape(-1)


def dense_damped(model, K, lam, split="factored"):
    """The dense damped matrix: factored Tikhonov per Kronecker block (``split``: the right
    one, ``"swapped"`` (pi inverted) or ``"even"`` (sqrt(lam) on both factors))."""
    n = K.shape[0]
    M = lam * torch.eye(n, dtype=DT)
    offsets = [0]
    for p in model.parameters():
        offsets.append(offsets[-1] + p.numel())
    pis = []
    for b in K.blocks.values():
        A, G = b.A.to(DT), b.G.to(DT)
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        pis.append(pi)
        pi = {"factored": pi, "swapped": 1 / pi, "even": 1.0}[split]
        r = math.sqrt(lam)
        blk = torch.kron(
            G + r / pi * torch.eye(G.shape[0], dtype=DT),
            A + r * pi * torch.eye(A.shape[0], dtype=DT),
        )
        idx = block_indices(model, b)
        M[idx[:, None], idx[None, :]] = blk
    for i, o in K._other.items():
        sl = slice(offsets[i], offsets[i + 1])
        value = o.value.to(DT)
        B = value if o.kind == "dense" else torch.diag(value.clamp_min(0))
        M[sl, sl] = B + lam * torch.eye(B.shape[0], dtype=DT)
    return M, pis


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cholesky_step_is_the_factored_damping_solve(kind, loss, fisher):
    model, loss_fn, X, y = problem(kind, loss)
    lam, lr = 0.05, 0.7
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher=fisher, **PLAIN)
    for _ in range(2):  # the second step: new factors and inverses at new parameters
        before = flat(model)
        K = so.KFAC(model, loss_fn, (X, y), fisher=fisher)  # MC: generator seeded 0, as opt's
        g = ref_grad(model, loss_fn, X, y)
        M, pis = dense_damped(model, K, lam)
        expected = before - lr * torch.linalg.solve(M, g)
        if fisher == "mc":
            opt.generator.manual_seed(0)
        opt.step(X, y)
        torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)
        assert opt.diagnostics["inverse_fallbacks"] == []
        # the test can fail: a wrong split of the damping moves the step
        assert max(abs(math.log(p)) for p in pis) > 0.5
        for split in ("swapped", "even"):
            wrong = before - lr * torch.linalg.solve(dense_damped(model, K, lam, split)[0], g)
            assert (wrong - expected).abs().max() > 1e-6


def test_factored_damping_and_damped_inverse_of_a_diagonal_factor():
    A = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=DT))
    G = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=DT) / 8
    pi = math.sqrt((6 / 3) / (0.25 / 2))
    assert factored_damping(A, G, 0.09) == pytest.approx((0.3 / pi, 0.3 * pi), rel=1e-14)
    assert factored_damping(A.diagonal(), G, 0.09) == factored_damping(A, G, 0.09)
    assert factored_damping(A, 0 * G, 0.09) == (0.3, 0.3)  # a dead layer: pi = 1
    inv, ok = damped_inverse(A.diagonal(), 0.5)
    assert ok and torch.equal(inv, 1 / (A.diagonal() + 0.5))
    inv, ok = damped_inverse(A, 0.5)
    assert ok
    torch.testing.assert_close(inv, torch.linalg.inv(A + 0.5 * torch.eye(3, dtype=DT)))


def test_an_indefinite_factor_falls_back_to_its_eigendecomposition():
    model, loss_fn, X, y = problem("mlp", "mse")
    lam = 1e-2
    kw = {**PLAIN, "factor_every": 100}  # factors from step 1 only; inverses every step
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **kw)
    opt.step(X, y)
    name = sorted(opt._running.blocks)[0]
    b = opt._running.blocks[name]
    e, q = torch.linalg.eigh(b["A"])
    da = factored_damping(b["A"], b["G"], lam)[1]
    e[0] = -10 * da  # rounding gone wild: A + delta_A I is indefinite
    b["A"] = (q * e) @ q.T
    da = factored_damping(b["A"], b["G"], lam)[1]  # the trace moved: delta_A with it
    assert -e[0] > da
    before = flat(model)
    g = ref_grad(model, loss_fn, X, y)
    opt.step(X, y)
    assert opt.diagnostics["accepted"] and opt.diagnostics["inverse_fallbacks"] == [f"{name}.A"]
    # the reference: that block's A with its negative eigenvalue clamped at 0
    blocks = copy.deepcopy(opt._running.blocks)
    A_psd = (q * e.clamp_min(0)) @ q.T
    step = torch.empty_like(g)
    for n_, blk in blocks.items():
        A = A_psd if n_ == name else blk["A"]
        G = blk["G"]
        dg_, da_ = factored_damping(blk["A"], G, lam)
        M = torch.kron(G + dg_ * torch.eye(len(G), dtype=DT), A + da_ * torch.eye(len(A), dtype=DT))
        kb = so.KFAC(model, loss_fn, (X, y), fisher="exact").blocks[n_]
        idx = block_indices(model, kb)
        step[idx] = torch.linalg.solve(M, g[idx])
    torch.testing.assert_close(flat(model), before - step, rtol=1e-9, atol=1e-12)


def test_zero_damping_on_a_singular_factor_is_rejected_not_taken():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    X, y = torch.randn(1, 4, dtype=DT), torch.tensor([1])  # one sample: rank-1 factors
    opt = so.KFACOptimizer(model, nn.CrossEntropyLoss(), damping=0.0, fisher="exact", **PLAIN)
    before = flat(model)
    with pytest.warns(so.NonFiniteStepWarning):
        opt.step(X, y)
    assert torch.equal(flat(model), before) and opt.diagnostics["accepted"] is False
    assert opt._running.fallbacks  # the Cholesky factorisation failed, and it was seen


def test_the_damping_of_the_inverses_follows_the_adapted_scale():
    model, loss_fn, X, y = problem("cnn", "ce")
    lam = 0.05
    kw = {**PLAIN, "factor_every": 100, "inverse_every": 100}
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **kw)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")  # the factors of step 1, kept
    opt.step(X, y)  # factors and inverses at lam
    assert opt._running.inv_damping == lam
    opt.global_state["damping_scale"] = 7.0  # as an adaptation would leave it
    before = flat(model)
    g = ref_grad(model, loss_fn, X, y)
    expected = before - torch.linalg.solve(dense_damped(model, K, 7 * lam)[0], g)
    opt.step(X, y)
    assert opt.diagnostics["inverted"] and opt.diagnostics["damping"] == pytest.approx(7 * lam)
    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_predicted_change_is_the_factored_quadratic_model(kl_clip):
    model, loss_fn, X, y = problem("cnn", "mse")
    lam, lr = 0.05, 0.8
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    g = ref_grad(model, loss_fn, X, y)
    M = dense_damped(model, K, lam)[0]
    s = torch.linalg.solve(M, g)
    nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / (lr * lr * float(g @ s))) ** 0.5)
    step = -lr * nu * s
    expected = float(g @ step + 0.5 * step @ (M @ step))
    kw = {**PLAIN, "adapt_damping": True, "kl_clip": kl_clip}
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher="exact", **kw)
    opt.step(X, y)
    assert opt.diagnostics["predicted_change"] == pytest.approx(expected, rel=1e-9)


def test_param_groups_step_and_model_use_the_factored_matrix():
    model, loss_fn, X, y = problem("normed", "ce")
    lam = 0.1
    theta = flat(model)
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    g = ref_grad(model, loss_fn, X, y)
    M = dense_damped(model, K, lam)[0]
    d = torch.linalg.solve(M, g)
    params = list(model.parameters())
    first, rest = params[:4], params[4:]
    groups = [{"params": first, "lr": 0.05, "weight_decay": 0.1}, {"params": rest, "lr": 0.02}]
    kw = {**PLAIN, "adapt_damping": True}
    opt = so.KFACOptimizer(model, loss_fn, damping=lam, fisher="exact", params=groups, **kw)
    opt.step(X, y)
    assert opt.diagnostics["accepted"]
    n0 = sum(p.numel() for p in first)
    lr = torch.cat(
        [torch.full((n0,), 0.05, dtype=DT), torch.full((len(theta) - n0,), 0.02, dtype=DT)]
    )
    wd = torch.cat([torch.full((n0,), 0.1, dtype=DT), torch.zeros(len(theta) - n0, dtype=DT)])
    torch.testing.assert_close(flat(model), (1 - lr * wd) * theta - lr * d, rtol=1e-10, atol=1e-12)
    step = -lr * d
    expected = float(g @ step + 0.5 * step @ (M @ step))
    assert opt.diagnostics["predicted_change"] == pytest.approx(expected, rel=1e-9)


def test_preconditioner_cholesky_gives_sgd_the_optimizers_step_and_resumes():
    model, loss_fn, X, y = problem("cnn", "ce", n=16)
    twin = copy.deepcopy(model)
    kw = dict(factor_decay=0.5, factor_every=1, inverse_every=2, fisher="exact")
    pre = so.KFACPreconditioner(
        model, loss_fn, damping=0.1, kl_clip=0.01, lr=0.3, inverse="cholesky", **kw
    )
    ref = so.KFACOptimizer(
        twin, loss_fn, lr=0.3, damping=0.1, kl_clip=0.01, adapt_damping=False, **kw,
        inverse="cholesky",
    )  # fmt: skip
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)

    def train(m, pre, sgd, chunks, ref=None):
        for i in chunks:
            xb, yb = X[i : i + 8], y[i : i + 8]
            sgd.zero_grad()
            loss_fn(m(xb), yb).backward()
            assert pre.step()["accepted"]
            sgd.step()
            if ref is not None:
                ref.step(xb, yb)
                torch.testing.assert_close(flat(m), flat(twin), rtol=1e-10, atol=1e-12)

    train(model, pre, sgd, [0, 8, 0], ref)
    buf = io.BytesIO()
    torch.save([model.state_dict(), pre.state_dict(), sgd.state_dict()], buf)
    train(model, pre, sgd, [8, 0, 8])
    buf.seek(0)
    m_state, p_state, s_state = torch.load(buf, weights_only=True)
    model2 = problem("cnn", "ce", seed=7)[0]
    model2.load_state_dict(m_state)
    pre2 = so.KFACPreconditioner(
        model2, loss_fn, damping=0.1, kl_clip=0.01, lr=0.3, inverse="cholesky", **kw
    )
    sgd2 = torch.optim.SGD(model2.parameters(), lr=0.3)
    pre2.load_state_dict(p_state)
    sgd2.load_state_dict(s_state)
    train(model2, pre2, sgd2, [8, 0, 8])
    assert torch.equal(flat(model), flat(model2))
    pre2.damping = 0.3  # a new damping: the inverses are formed again
    sgd2.zero_grad()
    loss_fn(model2(X), y).backward()
    assert pre2.step()["inverted"] and pre2.running.inv_damping == 0.3


def test_bad_inverse_is_refused():
    model, loss_fn, _, _ = problem()
    with pytest.raises(ValueError, match="inverse"):
        so.KFACOptimizer(model, loss_fn, inverse="lu")
    with pytest.raises(ValueError, match="inverse"):
        so.KFACPreconditioner(model, loss_fn, inverse="inv")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_operator_inverse_cholesky_is_the_factored_damping_inverse(kind):
    model, loss_fn, X, y = problem(kind, "ce")
    lam = 0.05
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    M = dense_damped(model, K, lam)[0]
    inv = K.inverse(lam, method="cholesky")
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(M), rtol=1e-9, atol=1e-10)
    assert inv.fallbacks == []
    exact = K.inverse(lam).to_dense()  # the default stays the exact damped inverse
    torch.testing.assert_close(exact @ (K.to_dense() + lam * torch.eye(len(M), dtype=DT)),
                               torch.eye(len(M), dtype=DT), rtol=1e-8, atol=1e-9)  # fmt: skip
    with pytest.raises(ValueError, match="method"):
        so.EKFAC(model, loss_fn, (X, y), fisher="exact").inverse(lam, method="cholesky")


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_operator_products_of_noncontiguous_blocks_of_vectors(method):
    model, loss_fn, X, y = problem("cnn", "mse")
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    V = torch.randn(3, K.shape[0], dtype=DT).T  # (n, 3), not contiguous
    inv = K.inverse(0.05, method=method)
    torch.testing.assert_close(inv @ V, inv.to_dense() @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(K @ V, K.to_dense() @ V, rtol=1e-10, atol=1e-12)
    v = V[:, 1]  # a strided vector
    torch.testing.assert_close(inv @ v, inv.to_dense() @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_damped_inverse_of_an_indefinite_factor_clamps_its_eigenvalues(dtype):
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))
    e = torch.tensor([-0.5, 0.0, 1e-3, 1.0, 4.0])
    F = ((q * e) @ q.T).to(dtype)
    inv, ok = damped_inverse(F, 0.1)
    assert not ok and inv.dtype == dtype
    expected = (q / (e.clamp_min(0) + 0.1)) @ q.T
    torch.testing.assert_close(inv, expected.to(dtype), rtol=1e-4, atol=1e-4)
    inv, ok = damped_inverse(F, 1.0)  # positive definite once damped: the Cholesky path
    assert ok
    torch.testing.assert_close(inv, torch.linalg.inv(F + torch.eye(5, dtype=dtype)))


class TinyLM(nn.Module):
    """Embedding (1-D input factor, stored transposed) -> encoder layer (packed in_proj rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x))).transpose(1, 2)  # (N, V, T)


def placed_indices(model: nn.Module, b) -> torch.Tensor:
    """Flat indices of a block's ``[W | b]`` entries, row-major ``(out, d~)``: its rows of a
    packed weight (``wrow``, ``brow``) and a weight stored ``(d, out)`` (``transposed``)."""
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    cols = []
    if b.weight is not None:
        o = offsets[b.weight]
        if b.transposed:
            cols.append(torch.arange(o, o + b.d * b.out).reshape(b.d, b.out).T)
        else:
            start = o + b.wrow * b.d
            cols.append(torch.arange(start, start + b.out * b.d).reshape(b.out, b.d))
    if b.bias is not None:
        start = offsets[b.bias] + b.brow
        cols.append(torch.arange(start, start + b.out).reshape(b.out, 1))
    return torch.cat(cols, dim=1).reshape(-1)


def lm_problem():
    torch.manual_seed(0)
    model = TinyLM().to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 11, (6, 3), generator=g)
    X[1, 2] = 0  # a padding token
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 11, (6, 3), generator=g)


def test_cholesky_on_embedding_and_attention_blocks_is_the_factored_damping_solve():
    """Row blocks of a packed weight, a transposed weight and a 1-D factor: the operator's and
    the optimizer's explicit inverses equal the dense factored-damping solve."""
    model, loss_fn, X, y = lm_problem()
    lam, lr = 0.05, 0.7
    K = so.KFAC(model, loss_fn, (X, y), fisher="exact")
    kinds = {b.A.ndim for b in K.blocks.values()}
    assert kinds == {1, 2} and any(b.wrow or b.transposed for b in K.blocks.values())
    # the index map is right: it rebuilds the operator's own dense Kronecker blocks
    dense = K.to_dense()
    M = lam * torch.eye(K.shape[0], dtype=DT)
    for b in K.blocks.values():
        A = b.A.to(DT)
        A = torch.diag(A) if A.ndim == 1 else A
        G = b.G.to(DT)
        idx = placed_indices(model, b)
        torch.testing.assert_close(dense[idx[:, None], idx[None, :]], torch.kron(G, A))
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        r = math.sqrt(lam)
        eye_g, eye_a = torch.eye(G.shape[0], dtype=DT), torch.eye(A.shape[0], dtype=DT)
        M[idx[:, None], idx[None, :]] = torch.kron(G + r / pi * eye_g, A + r * pi * eye_a)
    offsets = [0]
    for p in model.parameters():
        offsets.append(offsets[-1] + p.numel())
    for i, o in K._other.items():
        sl = slice(offsets[i], offsets[i + 1])
        B = o.value.to(DT) if o.kind == "dense" else torch.diag(o.value.to(DT).clamp_min(0))
        M[sl, sl] = B + lam * torch.eye(B.shape[0], dtype=DT)
    g = ref_grad(model, loss_fn, X, y)
    want = torch.linalg.solve(M, g)
    torch.testing.assert_close(K.inverse(lam, method="cholesky") @ g, want, rtol=1e-9, atol=1e-12)
    before = flat(model)
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher="exact", **PLAIN)
    opt.step(X, y)
    torch.testing.assert_close(flat(model), before - lr * want, rtol=1e-9, atol=1e-12)
