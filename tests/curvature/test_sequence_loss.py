"""SequenceCrossEntropyLoss and the fused, chunked head product (issue 15, sequence losses).

The operators against dense float64 references over reductions x padding x data splits are
in the conformance matrix (``tests/conformance``: losses ``seqce*``, models ``seq_last_mlp``,
``lm_tied``, ``lm_untied``, ``seq_transposed``). Here: the fused head path (``chunk_size``)
equals the reference path (the head's output and the loss terms on the full logits) for every
chunk size, it is taken where it should be, nothing allocates O(V^2), torch's loss on transposed
logits gives the same operators and optimizer steps, and bad inputs are refused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import secondorder as so
from secondorder.curvature.fused_head import FusedHead

DT = torch.float64
V, L, N = 5, 4, 6


class LM(nn.Module):
    """Tokens (N, L) -> class-last logits (N, L, V): embedding, residual tanh, LayerNorm, head."""

    def __init__(self, tied: bool, bias: bool = False, vocab: int = V, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=bias)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        h = h + torch.tanh(self.mix(h))
        return self.head(self.norm(h))


class Transposed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx: Tensor) -> Tensor:
        return self.inner(idx).transpose(1, 2)


def _lm(tied: bool, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return LM(tied, bias).to(DT)


def _mlp() -> nn.Module:  # the head's input depends on parameters; inputs are features
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, V)).to(DT)


def _head_only() -> nn.Module:  # the head's input depends on no parameter
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, V)).to(DT)


MODELS = {
    "lm_tied": (lambda: _lm(True), "tokens"),
    "lm_untied_bias": (lambda: _lm(False, True), "tokens"),
    "mlp": (_mlp, "features"),
    "head_only": (_head_only, "features"),
}


def _data(kind: str, pad: bool = True) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "tokens":
        x = torch.randint(0, V, (N, L), generator=g)
    else:
        x = torch.randn(N, L, 3, generator=g, dtype=DT)
    y = torch.randint(0, V, (N, L), generator=g)
    if pad:
        y[:, -1] = -100
        y[1, :] = -100
    return x, y


LOSSES = {
    "mean": lambda c: so.SequenceCrossEntropyLoss(chunk_size=c),
    "sum": lambda c: so.SequenceCrossEntropyLoss(reduction="sum", chunk_size=c),
    "smoothing": lambda c: so.SequenceCrossEntropyLoss(label_smoothing=0.3, chunk_size=c),
}


def _operator_outputs(op: Any, P: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    v, Vm = torch.randn(P, generator=g, dtype=DT), torch.randn(P, 3, generator=g, dtype=DT)
    blocks = [op.block(i) for i in range(len(op.fmodel.params))]
    sizes = [b.shape[0] for b in blocks]
    parts = v.split(sizes)
    return {
        "matvec": op @ v,
        "matmat": op @ Vm,
        "block": torch.cat([b @ p for b, p in zip(blocks, parts)]),
        "block_mat": torch.cat([b @ m for b, m in zip(blocks, Vm.split(sizes))]),
        "gradient": op.gradient(),
        "loss": op.loss.reshape(1),
    }


OPERATORS = {
    "ggn": lambda m, lf, d: so.GGN(m, lf, d, engine="graph"),
    "fisher_exact": lambda m, lf, d: so.Fisher(m, lf, d, kind="exact", engine="graph"),
}


@pytest.mark.parametrize("chunk", [1, 5, 7, 10**6])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("split", ["one", "two"])
def test_fused_head_equals_reference(
    op_name: str, model_name: str, loss: str, chunk: int, split: str
) -> None:
    build, kind = MODELS[model_name]
    model = build()
    x, y = _data(kind)
    data: Any = (x, y) if split == "one" else [(x[:2], y[:2]), (x[2:], y[2:])]
    make = OPERATORS[op_name]
    fused = make(model, LOSSES[loss](chunk), data)
    ref = make(model, LOSSES[loss](None), data)
    assert all(isinstance(s.terms, FusedHead) for s, _ in fused._states)
    assert not any(isinstance(s.terms, FusedHead) for s, _ in ref._states)
    P = fused.shape[0]
    got, want = _operator_outputs(fused, P), _operator_outputs(ref, P)
    for key in want:
        err = (got[key] - want[key]).norm() / want[key].norm()
        assert err < 1e-12, (key, float(err))


def test_fused_head_not_taken_where_it_does_not_apply() -> None:
    x, y = _data("tokens")
    probs = torch.softmax(torch.randn(N, L, V, dtype=DT), -1)
    weight = torch.rand(V, dtype=DT) + 0.5
    seq = so.SequenceCrossEntropyLoss(chunk_size=2)
    cases = [
        (so.GGN(_lm(True), seq, (x, y), engine="autograd"), False),
        (so.GGN(_lm(True), seq, (x, probs)), False),
        (
            so.GGN(_lm(True), so.SequenceCrossEntropyLoss(weight=weight, chunk_size=2), (x, y)),
            False,
        ),
        (so.GGN(Transposed(_lm(True)), nn.CrossEntropyLoss(), (x, y)), False),
        (so.Fisher(_lm(True), so.SequenceCrossEntropyLoss(chunk_size=2), (x, y), kind="mc"), False),
        (so.GGN(_lm(True), so.SequenceCrossEntropyLoss(), (x, y)), False),  # no chunk_size
        (so.GGN(_lm(True), so.SequenceCrossEntropyLoss(chunk_size=2), (x, y)), True),
    ]
    for op, fused in cases:
        assert [isinstance(s.terms, FusedHead) for s, _ in op._states] == [fused]


def test_no_product_allocates_vocabulary_squared() -> None:
    """V = 2**17: a (V, V) float64 tensor (128 GiB) cannot be allocated here; N T V can."""
    vocab = 2**17
    torch.manual_seed(0)
    model = LM(True, vocab=vocab, d=2).to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randint(0, vocab, (2, 3), generator=g),
        torch.randint(0, vocab, (2, 3), generator=g),
    )
    y[0, 2] = -100
    loss_fn = so.SequenceCrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=DT)
    ops = [
        so.GGN(model, so.SequenceCrossEntropyLoss(chunk_size=4), (x, y)),
        so.GGN(model, loss_fn, (x, y)),
        so.GGN(model, loss_fn, (x, y), engine="autograd"),
        so.Fisher(model, loss_fn, (x, y), kind="mc", engine="graph"),
        so.Fisher(model, loss_fn, (x, y), kind="empirical", engine="graph"),
        so.Hessian(model, loss_fn, (x, y)),
    ]
    results = [op @ v for op in ops]
    assert all(bool(torch.isfinite(r).all()) for r in results)
    # GGN = exact Fisher; the three GGN paths agree
    for r in results[1:3]:
        assert torch.allclose(r, results[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tied", [True, False])
def test_transposed_torch_loss_gives_the_same_operators(tied: bool) -> None:
    """(a) nn.CrossEntropyLoss on logits.transpose(1, 2) equals (b) SequenceCrossEntropyLoss."""
    x, y = _data("tokens")
    model = _lm(tied)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    a_loss, b_loss = nn.CrossEntropyLoss(ignore_index=-100), so.SequenceCrossEntropyLoss()
    for kind in ("exact", "empirical"):
        A = so.Fisher(Transposed(model), a_loss, data, kind=kind).to_dense()
        B = so.Fisher(model, b_loss, data, kind=kind).to_dense()
        assert torch.allclose(A, B, rtol=1e-10, atol=1e-13), kind
    A = so.ggn_diagonal(Transposed(model), a_loss, data)
    B = so.ggn_diagonal(model, b_loss, data)
    assert torch.allclose(A, B, rtol=1e-10, atol=1e-13)
    A = so.Hessian(Transposed(model), a_loss, data).to_dense()
    B = so.Hessian(model, b_loss, data).to_dense()
    assert torch.allclose(A, B, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, lf: so.GaussNewton(m, lf, damping=0.1, cg_maxiter=10),
        lambda m, lf: so.NaturalGradient(m, lf, damping=0.1, cg_maxiter=10),
        lambda m, lf: so.NaturalGradient(m, lf, damping=0.1, fisher="empirical", cg_maxiter=10),
        lambda m, lf: so.NewtonCG(m, lf, damping=0.1, cg_maxiter=10),
        lambda m, lf: so.HessianFree(m, lf),
        lambda m, lf: so.BlockDiagonalNewtonCG(m, lf, damping=0.1),
    ],
    ids=["gauss_newton", "natural_exact", "natural_empirical", "newton_cg", "hf", "block"],
)
def test_optimizer_steps_match_transposed_torch_loss(make: Any) -> None:
    x, y = _data("tokens")
    model_b = _lm(True)
    model_a = Transposed(copy.deepcopy(model_b))
    opt_a = make(model_a, nn.CrossEntropyLoss())
    opt_b = make(model_b, so.SequenceCrossEntropyLoss())
    for _ in range(2):
        la, lb = opt_a.step(x, y), opt_b.step(x, y)
        assert torch.allclose(torch.as_tensor(la), torch.as_tensor(lb), rtol=1e-9)
    for pa, pb in zip(model_a.inner.parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-8, atol=1e-10)


def test_bad_inputs_are_refused() -> None:
    model = _lm(True)
    x, y = _data("tokens")
    loss_fn = so.SequenceCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"class indices of shape \(6, 4\)"):
        so.GGN(model, loss_fn, (x, y.reshape(-1)))
    with pytest.raises(ValueError, match=r"dtype torch\.int32"):
        so.GGN(model, loss_fn, (x, y.int()))
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        so.GGN(model, loss_fn, (x, torch.full_like(y, 7)))
    with pytest.raises(ValueError, match=r"expected logits \(N, T, V\)"):
        loss_fn(torch.randn(5), torch.tensor(1))
    with pytest.raises(ValueError, match="every target of the data is ignored"):
        so.GGN(model, loss_fn, (x, torch.full_like(y, -100)))
    with pytest.raises(ValueError, match="chunk_size"):
        so.SequenceCrossEntropyLoss(chunk_size=0)
    # a batch whose every token is padding adds nothing (weight 0), as in the full batch
    y2 = y.clone()
    y2[:2] = -100
    G1 = so.GGN(model, loss_fn, [(x[:2], y2[:2]), (x[2:], y2[2:])]).to_dense()
    G2 = so.GGN(model, loss_fn, (x, y2)).to_dense()
    assert torch.allclose(G1, G2, rtol=1e-12, atol=1e-14)
    # torch's own mean over no token is nan; the loss class keeps torch's value
    assert torch.isnan(loss_fn(torch.randn(1, 2, V), torch.full((1, 2), -100)))


@pytest.mark.parametrize("chunk_elements", [10, 100, 2**22])
@pytest.mark.parametrize(
    "loss_fn, shape, classes_last",
    [
        (nn.CrossEntropyLoss(ignore_index=1), (5, V, 3, 2), False),
        (nn.CrossEntropyLoss(label_smoothing=0.2), (6, V), False),
        (so.SequenceCrossEntropyLoss(ignore_index=1), (5, 3, 2, V), True),
        (so.SequenceCrossEntropyLoss(reduction="sum"), (5, 3, V), True),
    ],
    ids=["ce_dim1", "ce_2d", "seqce_4d", "seqce_sum"],
)
def test_output_hessian_in_chunks_of_samples(
    chunk_elements: int, loss_fn: Any, shape: tuple[int, ...], classes_last: bool, monkeypatch: Any
) -> None:
    """The cross-entropy's output-Hessian product, in chunks of samples, against
    ``jacrev(grad(loss))`` on the logits (dense float64), for one and for four columns."""
    from torch.func import grad, jacrev

    from secondorder.curvature import losses

    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g, dtype=DT)
    tshape = shape[:-1] if classes_last else (shape[0], *shape[2:])
    y = torch.randint(0, V, tshape, generator=g)
    H = jacrev(grad(lambda zz: loss_fn(zz.view(shape), y)))(z.reshape(-1))
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    terms = losses.loss_terms(loss_fn, z, y)
    U = torch.randn(4, *shape, generator=g, dtype=DT)
    got = terms.hessian_matmat(U)
    want = (U.reshape(4, -1) @ H).reshape(U.shape)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(terms.hessian_matmat(U[0]), want[0], rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_are_per_sequence() -> None:
    """A sample is one sequence: its own mean over its tokens; padding only adds zero."""
    model = _lm(True)
    x, y = _data("tokens")  # sequence 1 is padding only
    loss_fn = so.SequenceCrossEntropyLoss()
    got = so.curvature.per_sample_gradient_diagonal(
        model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])]
    )
    params = list(model.parameters())
    want = torch.zeros_like(got)
    for i in range(N):
        if (y[i] != -100).any():
            g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
            want += torch.cat([t.reshape(-1) for t in g]).square()
    assert torch.allclose(got, want / N, rtol=1e-12, atol=1e-15)
    other = so.curvature.per_sample_gradient_diagonal(
        Transposed(model), nn.CrossEntropyLoss(), (x, y)
    )
    assert torch.allclose(got, other, rtol=1e-12, atol=1e-15)


def test_factors_of_vocabulary_size_squared_are_refused(monkeypatch: Any) -> None:
    from secondorder.curvature import losses

    monkeypatch.setattr(losses, "_FACTOR_ELEMENTS", 100)
    model = _lm(True)
    x, y = _data("tokens")
    with pytest.raises(ValueError, match=r"\(rows, C, C\) = \(24, 5, 5\)"):
        so.ggn_diagonal(model, so.SequenceCrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="C backward passes per row"):
        so.LowRankGGN(model, so.SequenceCrossEntropyLoss(), (x, y))
    so.empirical_fisher_diagonal(model, so.SequenceCrossEntropyLoss(), (x, y))  # no factor
