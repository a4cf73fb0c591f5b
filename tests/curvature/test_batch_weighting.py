"""Several batches equal their concatenation, for every loss and option torch allows.

Generated matrix: {every supported loss x every option combination} x {one batch, unequal
batches 3+5+1, a one-shot generator, a DataLoader streamed with cache=False} x {loss, gradient,
GGN, Hessian, exact and empirical Fisher, the diagonals, BlockDiagonalCurvature, LowRankGGN},
each against a dense float64 reference on the concatenated batch: Hessians from
``jacrev(grad(f))``, GGNs as ``J^T H_z J`` with ``J`` from ``jacrev``, empirical Fishers from
per-position gradients (one row per prediction, see ``secondorder.curvature.losses``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import secondorder as so

DT = torch.float64
N, C, IN = 9, 3, 3
SPLITS = ((0, 3), (3, 8), (8, 9))  # unequal batches 3 + 5 + 1
ATOL = 1e-10


def _model(head: str = "") -> nn.Module:
    torch.manual_seed(3)
    layers: list[nn.Module] = [nn.Linear(IN, 3), nn.Tanh(), nn.Linear(3, C)]
    if head == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers).to(DT)


# ----------------------------------------------------------------------------- loss cases
@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Any]  # a fresh loss_fn
    targets: Callable[[torch.Generator], Tensor]  # targets of all N samples
    head: str = ""  # "sigmoid": the model ends in a Sigmoid (BCELoss)
    likelihood: bool = False  # Fisher, diagonals and LowRankGGN apply
    # per-row (position) unreduced losses and the scale s, for the empirical Fisher reference
    rows: Callable[[Any, Tensor, Tensor], tuple[Tensor, float]] | None = None


def _index_targets(g: torch.Generator) -> Tensor:
    y = torch.randint(0, C, (N,), generator=g)
    y[[1, 4, 5]] = 1  # class 1 (the ignore_index below) unevenly over the batches
    return y


def _prob_targets(g: torch.Generator) -> Tensor:
    return torch.softmax(torch.randn(N, C, generator=g, dtype=DT), -1)


def _class_weight() -> Tensor:
    return torch.tensor([0.5, 2.0, 1.25], dtype=DT)


def _ce_rows(loss: nn.CrossEntropyLoss, z: Tensor, y: Tensor) -> tuple[Tensor, float]:
    per = F.cross_entropy(
        z,
        y,
        ignore_index=loss.ignore_index,
        label_smoothing=loss.label_smoothing,
        reduction="none",
    )
    if loss.reduction == "sum":
        return per, 1.0
    d = y.shape[0] if y.dtype.is_floating_point else int((y != loss.ignore_index).sum())
    return per, 1.0 / d


def _elementwise_rows(fn: Callable[..., Tensor]) -> Callable[[Any, Tensor, Tensor], Any]:
    def rows(loss: Any, z: Tensor, y: Tensor) -> tuple[Tensor, float]:
        per = fn(z, y, reduction="none").reshape(-1, z.shape[-1]).sum(-1)
        return per, 1.0 if loss.reduction == "sum" else 1.0 / z.numel()

    return rows


def _cases() -> list[Case]:
    cases: list[Case] = []
    red = ("mean", "sum")
    for r, ig, w, ls in itertools.product(red, (None, 1), (False, True), (0.0, 0.15)):
        kw: dict[str, Any] = {"reduction": r, "label_smoothing": ls}
        if ig is not None:
            kw["ignore_index"] = ig
        name = f"ce-index-{r}-ignore{ig}-weight{w}-ls{ls}"
        cases.append(
            Case(
                name,
                functools.partial(_ce, kw, w),
                _index_targets,
                likelihood=not w,
                rows=_ce_rows,
            )
        )
    for r, w, ls in itertools.product(red, (False, True), (0.0, 0.15)):
        kw = {"reduction": r, "label_smoothing": ls}
        cases.append(
            Case(
                f"ce-probs-{r}-weight{w}-ls{ls}",
                functools.partial(_ce, kw, w),
                _prob_targets,
                likelihood=not w,
                rows=_ce_rows,
            )
        )
    for r, ig, w in itertools.product(red, (None, 1), (False, True)):
        kw = {"reduction": r}
        if ig is not None:
            kw["ignore_index"] = ig
        cases.append(
            Case(f"nll-{r}-ignore{ig}-weight{w}", functools.partial(_nll, kw, w), _index_targets)
        )
    for r, log_target in itertools.product(("mean", "sum", "batchmean"), (False, True)):
        cases.append(
            Case(
                f"kldiv-{r}-log_target{log_target}",
                functools.partial(nn.KLDivLoss, reduction=r, log_target=log_target),
                _kl_targets(log_target),
            )
        )
    for r in red:
        cases.append(
            Case(
                f"mse-{r}",
                functools.partial(nn.MSELoss, reduction=r),
                _randn,
                likelihood=True,
                rows=_elementwise_rows(F.mse_loss),
            )
        )
        cases.append(Case(f"l1-{r}", functools.partial(nn.L1Loss, reduction=r), _randn))
        cases.append(
            Case(f"huber-{r}", functools.partial(nn.HuberLoss, reduction=r, delta=0.3), _randn)
        )
        cases.append(
            Case(f"smoothl1-{r}", functools.partial(nn.SmoothL1Loss, reduction=r, beta=0.3), _randn)
        )
        cases.append(
            Case(f"softmargin-{r}", functools.partial(nn.SoftMarginLoss, reduction=r), _signs)
        )
        cases.append(
            Case(f"poissonnll-{r}", functools.partial(nn.PoissonNLLLoss, reduction=r), _counts)
        )
        for w in (False, True):
            cases.append(
                Case(
                    f"bce-{r}-weight{w}",
                    functools.partial(_bce, r, w),
                    _rand,
                    head="sigmoid",
                )
            )
            for pw in (False, True):
                cases.append(
                    Case(
                        f"bcelogits-{r}-weight{w}-pos_weight{pw}",
                        functools.partial(_bce_logits, r, w, pw),
                        _rand,
                        likelihood=not (w or pw),
                        rows=_elementwise_rows(F.binary_cross_entropy_with_logits),
                    )
                )
    cases.append(Case("callable-mean", lambda: _callable_mean, _randn))
    cases.append(Case("callable-sum", lambda: _callable_sum, _randn))
    return cases


def _ce(kw: dict[str, Any], w: bool) -> nn.Module:
    return nn.CrossEntropyLoss(weight=_class_weight() if w else None, **kw)


def _nll(kw: dict[str, Any], w: bool) -> nn.Module:
    return nn.NLLLoss(weight=_class_weight() if w else None, **kw)


def _bce(r: str, w: bool) -> nn.Module:
    return nn.BCELoss(reduction=r, weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT) if w else None)


def _bce_logits(r: str, w: bool, pw: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss(
        reduction=r,
        weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT) if w else None,
        pos_weight=torch.tensor([3.0, 0.5, 1.5], dtype=DT) if pw else None,
    )


def _randn(g: torch.Generator) -> Tensor:
    return torch.randn(N, C, generator=g, dtype=DT)


def _rand(g: torch.Generator) -> Tensor:
    return torch.rand(N, C, generator=g, dtype=DT)


def _signs(g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (N, C), generator=g).to(DT) * 2 - 1


def _counts(g: torch.Generator) -> Tensor:
    return torch.randint(0, 4, (N, C), generator=g).to(DT)


def _kl_targets(log_target: bool) -> Callable[[torch.Generator], Tensor]:
    def make(g: torch.Generator) -> Tensor:
        p = torch.softmax(torch.randn(N, C, generator=g, dtype=DT), -1)
        return p.log() if log_target else p

    return make


def _callable_mean(z: Tensor, y: Tensor) -> Tensor:
    return ((z - y) ** 2).sum(-1).mean() + (z**4).sum(-1).mean() / 10


def _callable_sum(z: Tensor, y: Tensor) -> Tensor:
    return ((z - y) ** 2).sum() + torch.tanh(z).sum()


CASES = {c.name: c for c in _cases()}


# ------------------------------------------------------------------------------- references
@functools.cache
def _reference(name: str) -> dict[str, Tensor]:
    """Dense float64 quantities on the concatenated batch (one forward over all N samples)."""
    case = CASES[name]
    model, loss_fn = _model(case.head), case.make()
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, IN, generator=g, dtype=DT)
    Y = case.targets(g)
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    shapes, sizes = [v.shape for v in values], [v.numel() for v in values]
    theta = torch.cat([v.reshape(-1) for v in values])

    def f(th: Tensor) -> Tensor:
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), (X,))

    def L(th: Tensor) -> Tensor:
        return loss_fn(f(th), Y)

    z = f(theta).detach()
    J = jacrev(f)(theta).reshape(z.numel(), -1)

    def output_loss(zz: Tensor) -> Tensor:
        return loss_fn(zz.view(z.shape), Y)

    Hz = jacrev(grad(output_loss))(z.reshape(-1))
    ref = {
        "X": X,
        "Y": Y,
        "loss": L(theta).detach(),
        "grad": grad(L)(theta),
        "hessian": jacrev(grad(L))(theta),
        "ggn": J.T @ Hz @ J,
        "sizes": torch.tensor(sizes),
    }
    rows_of = case.rows
    if rows_of is not None and case.likelihood:
        per_row, s = rows_of(loss_fn, z, Y)
        G = jacrev(lambda th: rows_of(loss_fn, f(th), Y)[0])(theta)  # (R, P)
        ref["empirical"] = s * G.T @ G
        assert per_row.ndim == 1
    return ref


def _block_diagonal(M: Tensor, sizes: Tensor) -> Tensor:
    out = torch.zeros_like(M)
    start = 0
    for n in sizes.tolist():
        out[start : start + n, start : start + n] = M[start : start + n, start : start + n]
        start += n
    return out


def _data(ref: dict[str, Tensor], split: str) -> tuple[Any, dict[str, Any]]:
    X, Y = ref["X"], ref["Y"]
    if split == "one":
        return (X, Y), {}
    if split == "list":
        return [(X[a:b], Y[a:b]) for a, b in SPLITS], {}
    if split == "generator":
        return ((X[a:b], Y[a:b]) for a, b in SPLITS), {}
    loader = DataLoader(TensorDataset(X, Y), batch_sampler=[list(range(a, b)) for a, b in SPLITS])
    return loader, {"cache": False}


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= ATOL * scale, f"{what}: max abs error {err:.3e} (scale {scale:.3e})"


SPLIT_NAMES = ("one", "list", "generator", "loader")


@pytest.mark.parametrize("split", SPLIT_NAMES)
@pytest.mark.parametrize("name", list(CASES))
def test_operators_equal_concatenated_batch(name: str, split: str) -> None:
    case, ref = CASES[name], _reference(name)
    model, loss_fn = _model(case.head), case.make()

    def data() -> tuple[Any, dict[str, Any]]:
        return _data(ref, split)

    d, kw = data()
    G = so.GGN(model, loss_fn, d, **kw)
    _close(G.to_dense(), ref["ggn"], "GGN")
    _close(G.loss.reshape(()), ref["loss"], "loss")
    _close(G.gradient(), ref["grad"], "gradient")
    d, kw = data()
    H = so.Hessian(model, loss_fn, d, **kw)
    _close(H.to_dense(), ref["hessian"], "Hessian")
    _close(H.gradient(), ref["grad"], "Hessian's gradient")
    v = torch.linspace(-1, 1, G.shape[0], dtype=DT)
    _close(H @ v, ref["hessian"] @ v, "Hessian product")
    if split in ("one", "list"):  # these take a list or a single batch
        for curvature in ("ggn", "hessian"):
            B = so.BlockDiagonalCurvature(model, loss_fn, _data(ref, split)[0], curvature=curvature)
            _close(
                B.to_dense(), _block_diagonal(ref[curvature], ref["sizes"]), f"{curvature} blocks"
            )
            _close(B.loss.reshape(()), ref["loss"], "block loss")
            _close(B.gradient(), ref["grad"], "block gradient")
    if not case.likelihood:
        return
    d, kw = data()
    _close(so.Fisher(model, loss_fn, d, kind="exact", **kw).to_dense(), ref["ggn"], "exact Fisher")
    d, kw = data()
    emp = so.Fisher(model, loss_fn, d, kind="empirical", **kw)
    _close(emp.to_dense(), ref["empirical"], "empirical Fisher")
    d, _ = data()
    _close(so.ggn_diagonal(model, loss_fn, d), ref["ggn"].diagonal(), "ggn_diagonal")
    d, _ = data()
    _close(
        so.empirical_fisher_diagonal(model, loss_fn, d),
        ref["empirical"].diagonal(),
        "empirical_fisher_diagonal",
    )
    d, _ = data()
    low = so.LowRankGGN(model, loss_fn, d)
    _close(low.to_dense(), ref["ggn"], "LowRankGGN")
    _close(low.gradient(), ref["grad"], "LowRankGGN gradient")
    _close(low.loss.reshape(()), ref["loss"], "LowRankGGN loss")


# ------------------------------------------------------------- batches with normaliser 0
def _split_data(ref: dict[str, Tensor], splits: tuple[tuple[int, int], ...]) -> list[Any]:
    return [(ref["X"][a:b], ref["Y"][a:b]) for a, b in splits]


@pytest.mark.parametrize("weight", [False, True])
def test_batch_with_every_target_ignored(weight: bool) -> None:
    """A batch whose targets are all ``ignore_index`` adds nothing, and no NaN."""
    name = f"ce-index-mean-ignore1-weight{weight}-ls0.15"
    ref, case = _reference(name), CASES[name]
    assert bool((ref["Y"][4:6] == 1).all())  # the batch (4, 6) is ignored entirely
    data = _split_data(ref, ((0, 4), (4, 6), (6, 9)))
    model, loss_fn = _model(), case.make()
    for op in (so.GGN(model, loss_fn, data), so.Hessian(model, loss_fn, data)):
        key = "ggn" if isinstance(op, so.GGN) else "hessian"
        _close(op.to_dense(), ref[key], key)
        _close(op.gradient(), ref["grad"], "gradient")
        _close(op.loss.reshape(()), ref["loss"], "loss")
    B = so.BlockDiagonalCurvature(model, loss_fn, data, curvature="hessian")
    _close(B.to_dense(), _block_diagonal(ref["hessian"], ref["sizes"]), "blocks")
    if not weight:
        _close(so.ggn_diagonal(model, loss_fn, data), ref["ggn"].diagonal(), "ggn_diagonal")
        _close(so.LowRankGGN(model, loss_fn, data).to_dense(), ref["ggn"], "LowRankGGN")


def test_every_target_ignored_is_refused() -> None:
    model, loss_fn = _model(), nn.CrossEntropyLoss(ignore_index=2)
    X, y = torch.randn(4, IN, dtype=DT), torch.full((4,), 2)
    for build in (so.GGN, so.Hessian, so.ggn_diagonal):
        with pytest.raises(ValueError, match="every target of the data is ignored"):
            build(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])])


# ----------------------------------------------------------------- generic callables
def _not_a_mean(z: Tensor, y: Tensor) -> Tensor:
    return ((z - y) ** 2).sum() / z.shape[0] ** 0.5


def test_generic_callable_neither_mean_nor_sum_is_refused() -> None:
    model = _model()
    X, Y = torch.randn(N, IN, dtype=DT), torch.randn(N, C, dtype=DT)
    data = [(X[a:b], Y[a:b]) for a, b in SPLITS]
    builders: list[Callable[[], Any]] = [
        lambda: so.GGN(model, _not_a_mean, data),
        lambda: so.Hessian(model, _not_a_mean, iter(data)),
        lambda: so.BlockDiagonalCurvature(model, _not_a_mean, data),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="mean over the samples") as info:
            build()
        assert "sample-weighted mean" in str(info.value) and "sum" in str(info.value)
    # one batch: its weight is 1 whatever the reduction
    H = so.Hessian(model, _not_a_mean, (X, Y))
    assert torch.isfinite(H.to_dense()).all()


class _DoubledCE(nn.CrossEntropyLoss):
    """A subclass with its own forward (twice the cross-entropy)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return 2 * super().forward(input, target)


class _KeptCE(nn.CrossEntropyLoss):
    """A subclass that keeps torch's forward."""


def test_subclass_with_own_forward_is_not_given_the_parents_closed_form() -> None:
    from secondorder.curvature.losses import loss_terms, supports_likelihood

    name = "ce-index-mean-ignoreNone-weightFalse-ls0.0"
    ref = _reference(name)
    model, loss_fn = _model(), _DoubledCE()
    assert not supports_likelihood(loss_fn) and supports_likelihood(_KeptCE())
    z = torch.randn(5, C, dtype=DT)
    y = torch.randint(0, C, (5,))
    terms = loss_terms(loss_fn, z, y)
    _close(terms.value, 2 * F.cross_entropy(z, y), "loss_terms value")
    for split in ("one", "list", "loader"):
        d, kw = _data(ref, split)
        G = so.GGN(model, loss_fn, d, **kw)
        _close(G.loss.reshape(()), 2 * ref["loss"], "loss")
        _close(G.gradient(), 2 * ref["grad"], "gradient")
        _close(G.to_dense(), 2 * ref["ggn"], "GGN")
        d, kw = _data(ref, split)
        _close(so.Hessian(model, loss_fn, d, **kw).to_dense(), 2 * ref["hessian"], "Hessian")
    B = so.BlockDiagonalCurvature(model, loss_fn, _data(ref, "list")[0])
    _close(B.to_dense(), 2 * _block_diagonal(ref["ggn"], ref["sizes"]), "blocks")
    with pytest.raises(ValueError, match="likelihood"):
        so.Fisher(model, loss_fn, (ref["X"], ref["Y"]))
    with pytest.raises(ValueError, match="likelihood"):
        so.ggn_diagonal(model, loss_fn, (ref["X"], ref["Y"]))


def test_subclass_whose_mean_is_not_over_samples_is_refused() -> None:
    """A subclass (own forward) ignoring targets is checked like any callable: refused."""

    class _IgnoringCE(nn.CrossEntropyLoss):
        def forward(self, input: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(input, target, ignore_index=1)

    ref = _reference("ce-index-mean-ignore1-weightFalse-ls0.0")
    with pytest.raises(ValueError, match="mean over the samples"):
        so.GGN(_model(), _IgnoringCE(), _data(ref, "list")[0])


# ------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("name", ["ce-index-mean-ignore1-weightTrue-ls0.15", "callable-sum"])
def test_optimizer_losses_are_weighted_like_the_operators(name: str) -> None:
    from secondorder.curvature.model import as_batches
    from secondorder.optim.hessian_free_data import _loss_and_gradient

    ref, case = _reference(name), CASES[name]
    model, loss_fn = _model(), case.make()
    batches = list(as_batches(_data(ref, "list")[0]))
    opt = so.GaussNewton(model, loss_fn)
    _close(opt.loss_at(opt.fmodel.current(), batches), ref["loss"], "loss_at")
    loss, g = _loss_and_gradient(opt.fmodel, loss_fn, batches, lambda t: t)
    _close(loss, ref["loss"], "HF loss")
    _close(g, ref["grad"], "HF gradient")


# --------------------------------------------------- Fisher rows: one row per position
class _PositionModel(nn.Module):
    """Outputs (N, S, D) for MSE/BCE, or (N, D, S) (class dimension 1) for cross-entropy."""

    def __init__(self, class_dim_1: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(IN, 3), nn.Tanh(), nn.Linear(3, C)).to(DT)
        self.class_dim_1 = class_dim_1

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)  # (N, S, C)
        return z.transpose(1, 2) if self.class_dim_1 else z


_POSITION_LOSSES = {
    "mse": (nn.MSELoss, lambda z, y: F.mse_loss(z, y, reduction="none").sum(-1)),
    "bcelogits": (
        nn.BCEWithLogitsLoss,
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1),
    ),
    "ce": (nn.CrossEntropyLoss, lambda z, y: F.cross_entropy(z, y, reduction="none")),
}


def _position_problem(kind: str, reduction: str) -> dict[str, Any]:
    S = 2
    model = _PositionModel(kind == "ce")
    g = torch.Generator().manual_seed(11)
    X = torch.randn(4, S, IN, generator=g, dtype=DT)
    if kind == "ce":
        Y: Tensor = torch.randint(0, C, (4, S), generator=g)
    elif kind == "mse":
        Y = torch.randn(4, S, C, generator=g, dtype=DT)
    else:
        Y = torch.rand(4, S, C, generator=g, dtype=DT)
    cls, per_position = _POSITION_LOSSES[kind]
    loss_fn = cls(reduction=reduction)
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    shapes, sizes = [v.shape for v in values], [v.numel() for v in values]
    theta = torch.cat([v.reshape(-1) for v in values])

    def f(th: Tensor) -> Tensor:
        parts = [t.view(s) for t, s in zip(th.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), (X,))

    z = f(theta).detach()
    J = jacrev(f)(theta).reshape(z.numel(), -1)

    def output_loss(zz: Tensor) -> Tensor:
        return loss_fn(zz.view(z.shape), Y)

    Hz = jacrev(grad(output_loss))(z.reshape(-1))
    rows = jacrev(lambda th: per_position(f(th), Y).reshape(-1))(theta)  # (N S, P)
    assert rows.shape[0] == 4 * S  # one row per position
    if reduction == "sum":
        s = 1.0
    else:
        s = 1.0 / (Y.numel() if kind == "ce" else z.numel())
    return {
        "model": model,
        "loss_fn": loss_fn,
        "X": X,
        "Y": Y,
        "ggn": J.T @ Hz @ J,
        "empirical": s * rows.T @ rows,
        "grad": grad(lambda th: loss_fn(f(th), Y))(theta),
        "positions": 4 * S,
    }


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(_POSITION_LOSSES))
def test_fisher_rows_are_positions(kind: str, reduction: str) -> None:
    p = _position_problem(kind, reduction)
    model, loss_fn, X, Y = p["model"], p["loss_fn"], p["X"], p["Y"]
    for data in ((X, Y), [(X[:1], Y[:1]), (X[1:], Y[1:])]):
        emp = so.Fisher(model, loss_fn, data, kind="empirical")
        _close(emp.to_dense(), p["empirical"], "empirical Fisher")
        _close(
            so.empirical_fisher_diagonal(model, loss_fn, data), p["empirical"].diagonal(), "EF diag"
        )
        _close(so.ggn_diagonal(model, loss_fn, data), p["ggn"].diagonal(), "ggn_diagonal")
        _close(so.Fisher(model, loss_fn, data).to_dense(), p["ggn"], "exact Fisher")
        low = so.LowRankGGN(model, loss_fn, data)
        per_row = C - 1 if kind == "ce" else C  # softmax's null column dropped
        assert low.num_columns == p["positions"] * per_row
        _close(low.to_dense(), p["ggn"], "LowRankGGN")
        _close(low.gradient(), p["grad"], "LowRankGGN gradient")
        mc = so.LowRankGGN(model, loss_fn, data, mc_samples=2)
        assert mc.num_columns == p["positions"] * 2


@pytest.mark.parametrize("kind", list(_POSITION_LOSSES))
def test_mc_fisher_expectation_is_the_exact_fisher(kind: str) -> None:
    p = _position_problem(kind, "mean")
    gen = torch.Generator().manual_seed(0)
    mc = so.Fisher(
        p["model"], p["loss_fn"], (p["X"], p["Y"]), kind="mc", num_samples=4000, generator=gen
    ).to_dense()
    rel = (mc - p["ggn"]).norm() / p["ggn"].norm()
    assert rel < 0.06, f"MC Fisher relative error {rel:.3f}"


# ------------------------------------------------------------------------ bad targets
def _builders(model: nn.Module, loss_fn: Any, data: Any) -> list[Callable[[], Any]]:
    out: list[Callable[[], Any]] = [
        lambda: so.GGN(model, loss_fn, data),
        lambda: so.Hessian(model, loss_fn, data),
        lambda: so.Hessian(model, loss_fn, data, engine="autograd"),
        lambda: so.BlockDiagonalCurvature(model, loss_fn, data),
        lambda: so.BlockDiagonalCurvature(model, loss_fn, data, curvature="hessian"),
    ]
    from secondorder.curvature.losses import supports_likelihood

    if supports_likelihood(loss_fn):
        out += [
            lambda: so.Fisher(model, loss_fn, data, kind="empirical"),
            lambda: so.ggn_diagonal(model, loss_fn, data),
            lambda: so.LowRankGGN(model, loss_fn, data),
        ]
    return out


_BAD_TARGETS = [
    ("ce", lambda: nn.CrossEntropyLoss(), torch.zeros(N, 1, dtype=torch.long), r"\(9,\)"),
    ("ce", lambda: nn.CrossEntropyLoss(), torch.zeros(N - 1, dtype=torch.long), r"\(9,\)"),
    ("ce", lambda: nn.CrossEntropyLoss(), torch.zeros(N, dtype=torch.int32), "torch.int64"),
    ("ce", lambda: nn.CrossEntropyLoss(), torch.zeros(N, C + 1, dtype=DT), r"\(9, 3\)"),
    ("ce", lambda: nn.CrossEntropyLoss(), torch.full((N,), C), r"\[0, 3\)"),
    (
        "ce-w",
        lambda: nn.CrossEntropyLoss(weight=_class_weight()),
        torch.zeros(N, 1).long(),
        r"\(9,\)",
    ),
    ("nll", lambda: nn.NLLLoss(), torch.zeros(N, C, dtype=DT), r"\(9,\)"),
    ("mse", lambda: nn.MSELoss(), torch.zeros(N, dtype=DT), r"\(9, 3\)"),
    ("mse", lambda: nn.MSELoss(), torch.zeros(N + 1, C, dtype=DT), r"\(9, 3\)"),
    ("bcelogits", lambda: nn.BCEWithLogitsLoss(), torch.zeros(N, C, dtype=torch.long), "floating"),
    ("l1", lambda: nn.L1Loss(), torch.zeros(N, 1, dtype=DT), r"\(9, 3\)"),
    (
        "kldiv",
        lambda: nn.KLDivLoss(reduction="batchmean"),
        torch.zeros(N, 2, dtype=DT),
        r"\(9, 3\)",
    ),
]


@pytest.mark.parametrize("case", range(len(_BAD_TARGETS)))
def test_bad_targets_name_what_is_expected(case: int) -> None:
    _, make, Y, pattern = _BAD_TARGETS[case]
    model, loss_fn = _model(), make()
    X = torch.randn(N, IN, dtype=DT)
    for build in _builders(model, loss_fn, (X, Y)):
        with pytest.raises(ValueError, match=pattern):
            build()
    # in a list of batches (the bad batch second), too
    good = _reference("ce-index-mean-ignoreNone-weightFalse-ls0.0")["Y"][:3]
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        good = torch.zeros(3, C, dtype=DT)
    with pytest.raises(ValueError, match=pattern):
        so.GGN(model, loss_fn, [(X[:3], good), (X, Y)])


def test_targets_torch_accepts_are_accepted() -> None:
    model = _model()
    X = torch.randn(N, IN, dtype=DT)
    y = torch.randint(0, C, (N,))
    z = model(X).detach()
    probs32 = torch.softmax(torch.randn(N, C), -1)  # float32 probabilities, float64 outputs
    for loss_fn, Y in (
        (nn.CrossEntropyLoss(), y.to(torch.uint8)),
        (nn.CrossEntropyLoss(), probs32),
        (nn.NLLLoss(), y.to(torch.uint8)),
        (nn.MSELoss(), torch.randint(0, 2, (N, C))),
    ):
        G = so.GGN(model, loss_fn, (X, Y))
        _close(G.loss.reshape(()), loss_fn(z, Y), f"{loss_fn} loss")


# --------------------------------------------------------------------- data passes
class _CountingLoader:
    """A re-iterable over fixed batches that counts its passes."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("loss", ["ce-index-mean-ignore1-weightTrue-ls0.0", "callable-mean"])
def test_streamed_data_is_read_once_at_construction(loss: str) -> None:
    ref, case = _reference(loss), CASES[loss]
    loader = _CountingLoader(_split_data(ref, SPLITS))
    G = so.GGN(_model(), case.make(), loader, cache=False, check_deterministic=False)
    assert loader.passes == 1
    assert G.num_samples == N
    _close(G.to_dense(), ref["ggn"], "GGN")
    cached = _CountingLoader(_split_data(ref, SPLITS))
    so.GGN(_model(), case.make(), cached, cache=True)
    assert cached.passes == 1


def test_reduction_check_leaves_buffers_alone() -> None:
    from secondorder.curvature.model import FunctionalModel, as_batches
    from secondorder.curvature.weighting import batch_weights

    model = nn.Sequential(nn.Linear(IN, 4), nn.BatchNorm1d(4), nn.Linear(4, C)).to(DT).train()
    before = [b.clone() for b in model.buffers()]
    X, Y = torch.randn(N, IN, dtype=DT), torch.randn(N, C, dtype=DT)
    batches = list(as_batches([(X[:4], Y[:4]), (X[4:], Y[4:])]))
    weights = batch_weights(lambda z, y: ((z - y) ** 2).mean(), batches, FunctionalModel(model))
    assert weights.mean and weights.weights(batches) == [4 / N, 5 / N]
    for b, saved in zip(model.buffers(), before):
        assert torch.equal(b, saved)
