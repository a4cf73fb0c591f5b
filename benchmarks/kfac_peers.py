r"""so.KFAC / so.EKFAC side by side with curvlinops' KFACLinearOperator / EKFACLinearOperator.

Three tables:

1. Agreement (float64, small models so that dense matrices fit): relative Frobenius difference
   of the dense matrices, and of the dense damped inverses, for an MLP, a CNN and a small
   transformer (hand-written attention from ``nn.Linear`` layers), ``fisher`` exact (curvlinops
   ``"type-2"``) and empirical, ``approx`` expand and reduce. curvlinops is run with
   ``separate_weight_and_bias=False`` (one Kronecker block for ``[W | b]``, as here) and
   ``use_exact_damping=True`` for its inverse; only the parameters of ``nn.Linear`` /
   ``nn.Conv2d`` layers are selected (curvlinops supports no others).
2. Timings (float32, the benchmark problems A, B, C of ``problems.py`` and a larger
   transformer): building the operator (factors, and EKFAC's second pass), one product
   ``K @ v`` and one damped inverse product (both operators' eigendecompositions cached), median
   of interleaved runs, and our inverse product in units of one gradient of the same batch.

Where the definitions differ: the Monte-Carlo variants draw different targets (not compared);
with several loss terms per sample, curvlinops back-propagates the exact loss-Hessian factor of
every row at once (cross terms between the rows of a sample), while so.KFAC keeps one set of
columns per row position; the models here have one loss row per sample, where both agree.
EKFAC with ``approx="reduce"`` on weight-sharing layers differs (1e-3..1e-1) only on layers whose
reduce factors are singular: the eigenbasis of a repeated (zero) eigenvalue is arbitrary, and the
per-sample cotangents :math:`\sum_t g_t a_t^\top` have components there (the averaged inputs span
less than the individual positions), so the corrected eigenvalues depend on the basis chosen by
each library's ``eigh``; every other combination agrees to rounding.

3. A transformer from torch's modules (``nn.Embedding`` with ``padding_idx``,
   ``nn.MultiheadAttention``, LayerNorm, MLP, head), block by block: curvlinops hooks
   ``nn.Linear`` / ``nn.Conv2d`` modules only, so it refuses the embedding and ``in_proj_weight``
   ("un-supported layers") and fails on ``out_proj`` (an ``nn.Linear`` that
   ``F.multi_head_attention_forward`` reads without calling it: its hook never fires, a
   ``KeyError``). It runs on the same function written with ``nn.Linear`` modules (a bias-free
   Linear on one-hot rows for the embedding; q, k, v, o). Agreement (K-FAC, exact and empirical,
   expand and reduce; EKFAC where the blocks are the same): f1, f2, head, ``out_proj`` vs o, and
   (expand) the embedding's ``(V, d)`` block vs the one-hot Linear's ``(d, V)`` one, to 1e-15;
   the packed ``in_proj`` of self-attention is one block ``G (3E x 3E) ⊗ A`` whose q, k, v
   diagonal sub-blocks equal curvlinops' separate q, k, v blocks (same input, same ``A``), and
   which in addition holds the q-k-v cross-covariances of the output cotangents (3e-2 – 5e-2 of
   the block's norm here): a different definition, so EKFAC's eigenbasis (of the joint ``G``)
   and its corrected eigenvalues differ there. Under ``reduce`` the keys' ``G`` vanishes in both
   (softmax ignores a shift shared by all keys) and the embedding keeps its exact diagonal in
   ours (the reduce input factor of one-hot rows is a dense ``V x V`` matrix), not curvlinops'
   dense reduce block.

Usage::

    PYTHONPATH=$PWD/src /work/main/.refenv/bin/python benchmarks/kfac_peers.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import secondorder as so
from _harness import ensure_environment, markdown_table, set_threads, time_interleaved
from problems import make_problem


class Attention(nn.Module):
    """One attention block and an MLP from nn.Linear layers; outputs (N, C) from the flattened
    sequence (curvlinops needs 2-D outputs)."""

    def __init__(self, d_in: int, d: int, T: int, C: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d * T, C)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(self.d)
        h = self.ln(h + self.o(torch.softmax(scores, dim=-1) @ self.v(h)))
        h = h + self.f2(torch.tanh(self.f1(h)))
        return self.head(h.flatten(1))


def small_problems(dtype: torch.dtype) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )
    cnn = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(54, 5),
    )
    tr = Attention(4, 8, 6, 5)
    out = {
        "MLP 10-32-32-5": (mlp, torch.randn(64, 10, generator=g)),
        "CNN 2 conv + linear": (cnn, torch.randn(32, 3, 10, 10, generator=g)),
        "transformer d=8 T=6": (tr, torch.randn(32, 6, 4, generator=g)),
    }
    problems = {}
    for name, (model, X) in out.items():
        model = model.to(dtype)
        y = torch.randint(0, 5, (X.shape[0],), generator=g)
        problems[name] = (model, nn.CrossEntropyLoss(), X.to(dtype), y)
    model, X = out["MLP 10-32-32-5"]
    problems["MLP 10-32-32-5, MSE"] = (
        model.to(dtype),
        nn.MSELoss(),
        X.to(dtype),
        torch.randn(64, 5, generator=g, dtype=dtype),
    )
    return problems


class TorchLM(nn.Module):
    """Embedding (padding 0) -> nn.MultiheadAttention (self) + LayerNorm -> MLP -> head."""

    def __init__(self, V: int, d: int, T: int, C: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d * T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.f2(torch.tanh(self.f1(h)))
        return self.head(h.flatten(1))


class LinearLM(nn.Module):
    """:class:`TorchLM` written with nn.Linear modules only (curvlinops' layers): a bias-free
    Linear on one-hot rows (zero at padding) for the embedding, q, k, v, o for the attention.
    """

    def __init__(self, lm: TorchLM) -> None:
        super().__init__()
        V, d = lm.emb.weight.shape
        E = d
        self.V, self.heads = V, lm.attn.num_heads
        self.emb = nn.Linear(V, d, bias=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln, self.f1, self.f2, self.head = lm.ln, lm.f1, lm.f2, lm.head
        with torch.no_grad():
            self.emb.weight.copy_(lm.emb.weight.T)
            W, b = lm.attn.in_proj_weight, lm.attn.in_proj_bias
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(W[i * E : (i + 1) * E])
                lin.bias.copy_(b[i * E : (i + 1) * E])
            self.o.weight.copy_(lm.attn.out_proj.weight)
            self.o.bias.copy_(lm.attn.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        N, T, d = h.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, T, self.heads, -1).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(
            heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        )
        h = self.ln(h + self.o(a.transpose(1, 2).reshape(N, T, d)))
        h = h + self.f2(torch.tanh(self.f1(h)))
        return self.head(h.flatten(1))


def one_hot(x: torch.Tensor, V: int, dtype: torch.dtype) -> torch.Tensor:
    a = nn.functional.one_hot(x, V).to(dtype)
    a[x == 0] = 0.0  # padding_idx 0: no gradient, a zero input row
    return a


def torch_transformer_agreement() -> list[list[object]]:
    """so.KFAC / EKFAC on :class:`TorchLM` against curvlinops on :class:`LinearLM`, by block.

    Rows: each block of ours with its curvlinops counterpart (the packed in-projection's
    q, k, v diagonal sub-blocks; the embedding's ``(V, d)`` block against the one-hot Linear's
    ``(d, V)`` block, permuted), and the part of ours curvlinops has no counterpart for.
    """
    V, d, T, C, N = 12, 8, 5, 4, 24
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    lm = TorchLM(V, d, T, C).double()
    lin = LinearLM(lm).double()
    X = torch.randint(0, V, (N, T), generator=g)
    X[:4, -1] = 0
    y = torch.randint(0, C, (N,), generator=g)
    Xh = one_hot(X, V, torch.float64)
    assert rel(lin(Xh), lm(X)) < 1e-13  # the same function
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in lm.named_parameters()]
    sl, k = {}, 0
    for n, p in lm.named_parameters():
        sl[n] = torch.arange(k, k + p.numel())
        k += p.numel()
    lsl, k = {}, 0
    lparams = kronecker_params(lin)
    lnames = {id(p): n for n, p in lin.named_parameters()}
    for p in lparams:
        lsl[lnames[id(p)]] = torch.arange(k, k + p.numel())
        k += p.numel()
    emb_perm = sl["emb.weight"].view(V, d).T.reshape(-1)  # ours (V, d) read as (d, V)
    E = d

    def rowblock(i: int) -> torch.Tensor:
        w = sl["attn.in_proj_weight"].view(3 * E, d)[i * E : (i + 1) * E].reshape(-1)
        return torch.cat([w, sl["attn.in_proj_bias"][i * E : (i + 1) * E]])

    pairs = {
        "embedding (V, d) vs one-hot Linear": (emb_perm, lsl["emb.weight"]),
        "in_proj rows q vs q": (rowblock(0), torch.cat([lsl["q.weight"], lsl["q.bias"]])),
        "in_proj rows k vs k": (rowblock(1), torch.cat([lsl["k.weight"], lsl["k.bias"]])),
        "in_proj rows v vs v": (rowblock(2), torch.cat([lsl["v.weight"], lsl["v.bias"]])),
        "out_proj vs o": (
            torch.cat([sl["attn.out_proj.weight"], sl["attn.out_proj.bias"]]),
            torch.cat([lsl["o.weight"], lsl["o.bias"]]),
        ),
        "f1, f2, head": (
            torch.cat([sl[n] for n in names if n.startswith(("f1", "f2", "head"))]),
            torch.cat([lsl[n] for n in lsl if n.startswith(("f1", "f2", "head"))]),
        ),
    }
    rows = []
    eye = torch.eye(k, dtype=torch.float64)
    for cls_name in ("KFAC", "EKFAC"):
        for fisher in ("exact", "empirical"):
            for approx in ("expand", "reduce"):
                K = getattr(so, cls_name)(lm, loss_fn, (X, y), fisher=fisher, approx=approx)
                P = peer(lin, loss_fn, Xh, y, lparams, cls_name, fisher, approx)
                ours_d, peer_d = K.to_dense(), P @ eye
                qkv = torch.cat([sl["attn.in_proj_weight"], sl["attn.in_proj_bias"]])
                for label, (a, b) in pairs.items():
                    note = ""
                    if label.startswith("embedding"):
                        note = K.structure["emb.weight"]
                    if label.startswith("in_proj") and cls_name == "EKFAC":
                        note = "eigenbasis of the 3E x 3E G"
                    ref = peer_d[b][:, b]
                    if ref.norm() < 1e-12 * peer_d.norm():
                        note = "G = 0 (softmax ignores a shift of all keys)"
                    scale = max(float(ref.norm()), 1e-12 * float(peer_d.norm()))
                    diff = float((ours_d[a][:, a] - ref).norm()) / scale
                    rows.append([cls_name, fisher, approx, label, note, f"{diff:.1e}"])
                block = ours_d[qkv][:, qkv]
                diag = torch.zeros_like(block)
                for i in range(3):
                    r = rowblock(i) - sl["attn.in_proj_weight"][0]
                    diag[r[:, None], r[None, :]] = block[r[:, None], r[None, :]]
                rows.append(
                    [
                        cls_name,
                        fisher,
                        approx,
                        "in_proj q-k-v cross blocks (ours only)",
                        "norm ÷ block norm",
                        f"{(block - diag).norm() / block.norm():.1e}",
                    ]
                )
                print(rows[-1], flush=True)
    return rows


def kronecker_params(model: nn.Module) -> list[torch.Tensor]:
    return [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters(recurse=False)
    ]


def peer(model, loss_fn, X, y, params, cls_name, fisher, approx):
    import curvlinops

    cls = getattr(curvlinops, f"{cls_name}LinearOperator")
    fisher_type = {"exact": "type-2", "empirical": "empirical", "mc": "mc"}[fisher]
    op = cls(
        model,
        loss_fn,
        params,
        [(X, y)],
        check_deterministic=False,
        fisher_type=fisher_type,
        kfac_approx=approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    if cls_name == "EKFAC":
        op.compute_eigenvalue_correction()
    return op


def peer_inverse(op, damping):
    from curvlinops import KFACInverseLinearOperator

    return KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)


def ours(model, loss_fn, X, y, params, cls_name, fisher, approx):
    return getattr(so, cls_name)(
        model, loss_fn, (X, y), params=params, fisher=fisher, approx=approx
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def agreement() -> list[list[object]]:
    rows = []
    damping = 1e-3
    for name, (model, loss_fn, X, y) in small_problems(torch.float64).items():
        params = kronecker_params(model)
        n = sum(p.numel() for p in params)
        eye = torch.eye(n, dtype=torch.float64)
        for cls_name in ("KFAC", "EKFAC"):
            for fisher in ("exact", "empirical"):
                for approx in ("expand", "reduce"):
                    if approx == "reduce" and "transformer" not in name and "CNN" not in name:
                        continue  # no weight sharing: reduce == expand
                    K = ours(model, loss_fn, X, y, params, cls_name, fisher, approx)
                    P = peer(model, loss_fn, X, y, params, cls_name, fisher, approx)
                    dense, pdense = K.to_dense(), P @ eye
                    inv, pinv = K.inverse(damping) @ eye, peer_inverse(P, damping) @ eye
                    rows.append(
                        [
                            name,
                            n,
                            cls_name,
                            fisher,
                            approx,
                            K.engine,
                            f"{rel(dense, pdense):.1e}",
                            f"{rel(inv, pinv):.1e}",
                        ]
                    )
                    print(rows[-1], flush=True)
    return rows


def timing_problems() -> dict[str, tuple]:
    out = {}
    for key in ("A", "B", "C"):
        p = make_problem(key)
        out[f"{key}: {p.description}"] = (p.model, p.loss_fn, p.X, p.y)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    tr = Attention(16, 64, 16, 10)
    X = torch.randn(128, 16, 16, generator=g)
    out["transformer d=64 T=16, N=128"] = (
        tr,
        nn.CrossEntropyLoss(),
        X,
        torch.randint(0, 10, (128,), generator=g),
    )
    return out


def timings(repeats: int) -> list[list[object]]:
    rows = []
    damping = 1e-3
    for name, (model, loss_fn, X, y) in timing_problems().items():
        params = kronecker_params(model)
        v = torch.randn(sum(p.numel() for p in params))
        for cls_name in ("KFAC", "EKFAC"):
            args = (model, loss_fn, X, y, params, cls_name, "mc", "expand")
            K, P = ours(*args), peer(*args)
            Ki, Pi = K.inverse(damping), peer_inverse(P, damping)
            Ki @ v, Pi @ v  # eigendecompositions cached by both
            t = time_interleaved(
                {"ours build": lambda a=args: ours(*a), "peer build": lambda a=args: peer(*a)},
                repeats=max(3, repeats // 3),
                warmup=1,
            )
            t.update(
                time_interleaved(
                    {
                        "ours Kv": lambda K=K, v=v: K @ v,
                        "peer Kv": lambda P=P, v=v: P @ v,
                        "ours inv": lambda K=Ki, v=v: K @ v,
                        "peer inv": lambda P=Pi, v=v: P @ v,
                        "gradient": lambda f=loss_fn, m=model, X=X, y=y, p=params: (
                            torch.autograd.grad(f(m(X), y), p)
                        ),
                    },
                    repeats=repeats,
                )
            )
            ms = {k: 1e3 * t[k].median for k in t}
            rows.append(
                [
                    name,
                    cls_name,
                    K.engine,
                    f"{ms['ours build']:.1f}",
                    f"{ms['peer build']:.1f}",
                    f"{ms['ours Kv']:.2f}",
                    f"{ms['peer Kv']:.2f}",
                    f"{ms['ours inv']:.2f}",
                    f"{ms['peer inv']:.2f}",
                    f"{ms['gradient']:.2f}",
                    f"{ms['ours inv'] / ms['gradient']:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-torch-transformer", action="store_true")
    args = parser.parse_args()
    # idle OpenMP threads sleep instead of spinning (shared machine; see _harness)
    ensure_environment(
        {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}, __file__, sys.argv[1:]
    )
    set_threads(2)
    start = time.perf_counter()
    agree = [] if args.skip_agreement else agreement()
    print()
    print(
        markdown_table(
            [
                "problem",
                "n",
                "operator",
                "fisher",
                "approx",
                "our engine",
                "rel diff K",
                "rel diff (K+λI)⁻¹, λ=1e-3",
            ],
            agree,
        )
    )
    if not args.skip_torch_transformer:
        print()
        print(
            markdown_table(
                [
                    "operator",
                    "fisher",
                    "approx",
                    "block",
                    "note",
                    "rel diff (÷ max(block, 1e-12 K))",
                ],
                torch_transformer_agreement(),
            )
        )
    if not args.skip_timings:
        rows = timings(args.repeats)
        print()
        print(
            markdown_table(
                [
                    "problem",
                    "operator",
                    "our engine",
                    "build ms (so)",
                    "build ms (curvlinops)",
                    "K v ms (so)",
                    "K v ms (curvlinops)",
                    "inverse v ms (so)",
                    "inverse v ms (curvlinops)",
                    "gradient ms",
                    "our inverse v ÷ gradient",
                ],
                rows,
            )
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s, torch {torch.__version__}, 2 threads")


if __name__ == "__main__":
    main()
