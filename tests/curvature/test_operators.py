"""Curvature operators against dense references built independently (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import CASE_IDS, CASES, DT, LOSSES, targets
from torch import nn

import secondorder as so
from reference import dense_empirical_fisher, dense_ggn, dense_hessian

RTOL = 1e-10
N = 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def build(case, loss_name, red, n=N):
    model, inputs = case.make(n)
    loss_fn = LOSSES[loss_name](red)
    y = targets(loss_name, n)
    return model, loss_fn, inputs, y


OPERATORS = {
    "ggn": (lambda m, l, d, **kw: so.GGN(m, l, d, **kw), dense_ggn),
    "hessian": (lambda m, l, d, **kw: so.Hessian(m, l, d, **kw), dense_hessian),
    "fisher_exact": (lambda m, l, d, **kw: so.Fisher(m, l, d, kind="exact", **kw), dense_ggn),
    "fisher_empirical": (
        lambda m, l, d, **kw: so.Fisher(m, l, d, kind="empirical", **kw),
        dense_empirical_fisher,
    ),
}


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_matches_reference(case, loss_name, red, op_name):
    model, loss_fn, inputs, y = build(case, loss_name, red)
    make, reference = OPERATORS[op_name]
    op = make(model, loss_fn, (inputs, y))
    dense = op.to_dense()
    expected = reference(model, loss_fn, inputs, y)
    assert dense.shape == expected.shape
    assert rel_err(dense, expected) <= RTOL
    assert rel_err(dense, dense.T) <= RTOL  # symmetric
    # matvec and matmat agree with the dense matrix
    v = torch.randn(op.shape[0], dtype=DT)
    assert rel_err(op @ v, expected @ v) <= RTOL
    V = torch.randn(op.shape[0], 3, dtype=DT)
    assert rel_err(op @ V, expected @ V) <= RTOL
    assert rel_err(v @ op, expected.T @ v) <= RTOL
    if op_name != "hessian":
        assert op.IS_PSD
        assert torch.linalg.eigvalsh(dense).min() >= -1e-10 * dense.abs().max()


@pytest.mark.parametrize("engine", ["autograd", "sequential"])
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("mlp", "cnn", "bn_sequential", "tied_sequential")],
    ids=lambda c: c.name,
)
def test_engines_agree(case, engine):
    model, loss_fn, inputs, y = build(case, "ce", "mean")
    dense = so.GGN(model, loss_fn, (inputs, y), engine=engine).to_dense()
    assert rel_err(dense, dense_ggn(model, loss_fn, inputs, y)) <= RTOL


@pytest.mark.parametrize("engine", ["autograd", "sequential"])
def test_linear_layers_on_sequence_inputs(engine):
    # Linear on (N, T, d) inputs: batched products (to_dense, G @ V) broadcast over T
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 3, 2, dtype=DT)
    G = so.GGN(model, nn.MSELoss(), (x, y), engine=engine)
    expected = dense_ggn(model, nn.MSELoss(), (x,), y)
    assert rel_err(G.to_dense(), expected) <= RTOL
    V = torch.randn(G.shape[0], 3, dtype=DT)
    assert rel_err(G @ V, expected @ V) <= RTOL


def test_sequential_engine_is_the_graph_engine_on_other_modules():
    # engine="sequential" names the former hand-written nn.Sequential engine: now the graph
    # engine's alias, it serves any module (this one exactly, as autograd does)
    model, loss_fn, inputs, y = build(CASES[3], "ce", "mean")  # bn_module
    G = so.GGN(model, loss_fn, (inputs, y), engine="sequential")
    ref = so.GGN(model, loss_fn, (inputs, y), engine="autograd")
    assert G.engine_info[0].path == "graph"
    assert rel_err(G.to_dense(), ref.to_dense()) <= RTOL


@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_multi_batch_equals_full_batch(op_name, loss_name):
    case = CASES[0]
    model, loss_fn, inputs, y = build(case, loss_name, "mean", n=10)
    make, _ = OPERATORS[op_name]
    full = make(model, loss_fn, (inputs, y)).to_dense()
    # uneven batches: 4 + 3 + 3
    splits = [(tuple(x[a:b] for x in inputs), y[a:b]) for a, b in [(0, 4), (4, 7), (7, 10)]]
    batched = make(model, loss_fn, splits).to_dense()
    assert rel_err(batched, full) <= RTOL
    # also streamed from a re-iterable (no caching) and from a one-shot generator
    streamed = make(model, loss_fn, _ReIterable(splits)).to_dense()
    assert rel_err(streamed, full) <= RTOL
    generated = make(model, loss_fn, (b for b in splits)).to_dense()
    assert rel_err(generated, full) <= RTOL


def test_multi_batch_sum_reduction():
    model, loss_fn, inputs, y = build(CASES[0], "mse", "sum", n=9)
    full = so.GGN(model, loss_fn, (inputs, y)).to_dense()
    splits = [((inputs[0][a:b],), y[a:b]) for a, b in [(0, 5), (5, 9)]]
    assert rel_err(so.GGN(model, loss_fn, splits).to_dense(), full) <= RTOL


class _ReIterable:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


class _Augmenting:
    """A loader that adds fresh noise on every pass: the operator is not well defined."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x + 0.1 * torch.randn_like(self.x), self.y


def test_determinism_guard_names_causes():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    with pytest.raises(RuntimeError, match="data augmentation"):
        so.GGN(model, loss_fn, _Augmenting(inputs[0], y))
    so.GGN(model, loss_fn, _Augmenting(inputs[0], y), check_deterministic=False)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mc_fisher_converges_to_exact(loss_name):
    """The MC Fisher is unbiased; its error falls like 1/sqrt(S).

    With S samples the relative Frobenius error is about c/sqrt(S) with c = O(1) for these
    small problems; going from S=100 to S=10_000 must shrink it by about 10x. We require a 4x
    drop (robust to the fixed seed) and an absolute error below 0.1 at S=10_000.
    """
    model, loss_fn, inputs, y = build(CASES[0], loss_name, "mean")
    exact = dense_ggn(model, loss_fn, inputs, y)
    errs = []
    for s in (100, 10_000):
        gen = torch.Generator().manual_seed(0)
        mc = so.Fisher(model, loss_fn, (inputs, y), kind="mc", num_samples=s, generator=gen)
        errs.append(rel_err(mc.to_dense(), exact))
    assert errs[1] < errs[0] / 4
    assert errs[1] < 0.1


def test_mc_fisher_reproducible_and_psd():
    model, loss_fn, inputs, y = build(CASES[1], "ce", "mean")
    a = so.Fisher(
        model, loss_fn, (inputs, y), kind="mc", generator=torch.Generator().manual_seed(3)
    )
    b = so.Fisher(
        model, loss_fn, (inputs, y), kind="mc", generator=torch.Generator().manual_seed(3)
    )
    da, db = a.to_dense(), b.to_dense()
    assert torch.equal(da, db)
    assert rel_err(da, da.T) <= RTOL
    assert torch.linalg.eigvalsh(da).min() >= -1e-10 * da.abs().max()


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_block_diagonal(op_name):
    model, loss_fn, inputs, y = build(CASES[1], "ce", "mean")
    make, _ = OPERATORS[op_name]
    op = make(model, loss_fn, (inputs, y))
    dense = op.to_dense()
    mask = torch.zeros_like(dense, dtype=torch.bool)
    start = 0
    for n in op.fmodel.numels:
        mask[start : start + n, start : start + n] = True
        start += n
    expected = torch.where(mask, dense, torch.zeros_like(dense))
    assert rel_err(op.block_diagonal().to_dense(), expected) <= RTOL
    v = torch.randn(op.shape[0], dtype=DT)
    assert rel_err(op.block_diagonal() @ v, expected @ v) <= RTOL


def test_generic_loss_callable():
    model, _, inputs, y = build(CASES[0], "mse", "mean")

    def quartic(z, t):
        return ((z - t) ** 4).mean() + (z.sum(1) ** 2).mean()

    ggn = so.GGN(model, quartic, (inputs, y)).to_dense()
    assert rel_err(ggn, dense_ggn(model, quartic, inputs, y)) <= RTOL
    hess = so.Hessian(model, quartic, (inputs, y)).to_dense()
    assert rel_err(hess, dense_hessian(model, quartic, inputs, y)) <= RTOL


def test_cross_entropy_options_and_spatial_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Tanh(), nn.Conv2d(3, 4, 1)).to(DT)
    x = torch.randn(3, 2, 2, 2, dtype=DT)
    y = torch.randint(0, 4, (3, 2, 2))
    y[0, 0, 0] = -100  # ignored position
    for loss_fn in (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(weight=torch.rand(4, dtype=DT)),  # generic (autograd) path
    ):
        g = so.GGN(model, loss_fn, (x, y))
        assert rel_err(g.to_dense(), dense_ggn(model, loss_fn, (x,), y)) <= RTOL
        assert torch.allclose(g.loss, loss_fn(model(x), y))


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_loss_and_gradient(op_name):
    model, loss_fn, inputs, y = build(CASES[6], "ce", "mean")
    make, _ = OPERATORS[op_name]
    op = make(
        model,
        loss_fn,
        [((inputs[0][:2], inputs[1][:2]), y[:2]), ((inputs[0][2:], inputs[1][2:]), y[2:])],
    )
    loss = loss_fn(model(*inputs), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    assert torch.allclose(op.loss, loss.detach(), rtol=1e-12)
    assert rel_err(op.gradient(), torch.cat([g.reshape(-1) for g in grads])) <= RTOL


def test_parameter_subset_and_list_input():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    full = so.GGN(model, loss_fn, (inputs, y)).to_dense()
    params = list(model.parameters())
    sub = so.GGN(model, loss_fn, (inputs, y), params=[params[2], params[3]])
    start = params[0].numel() + params[1].numel()
    stop = start + params[2].numel() + params[3].numel()
    assert rel_err(sub.to_dense(), full[start:stop, start:stop]) <= RTOL
    vs = [torch.randn_like(params[2]), torch.randn_like(params[3])]
    out = sub @ vs
    assert [o.shape for o in out] == [p.shape for p in vs]
    flat = sub @ torch.cat([v.reshape(-1) for v in vs])
    assert torch.allclose(torch.cat([o.reshape(-1) for o in out]), flat)


def test_damping_algebra():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    G = so.GGN(model, loss_fn, (inputs, y))
    D = G + 0.5 * so.Identity(G.shape[0], dtype=DT)
    expected = G.to_dense() + 0.5 * torch.eye(G.shape[0], dtype=DT)
    assert rel_err(D.to_dense(), expected) <= RTOL
    assert D.IS_PSD and D.SELF_ADJOINT


def test_to_scipy_matches():
    scipy = pytest.importorskip("scipy")  # noqa: F841
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    G = so.GGN(model, loss_fn, (inputs, y))
    S = G.to_scipy()
    v = torch.randn(G.shape[0], dtype=DT)
    assert rel_err(torch.from_numpy(S @ v.numpy()), G @ v) <= RTOL


# ------------------------------------------------------------------------- errors
@pytest.fixture
def ggn():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    return so.GGN(model, loss_fn, (inputs, y))


def test_wrong_length(ggn):
    with pytest.raises(ValueError, match=rf"expected a vector of shape \({ggn.shape[0]},\)"):
        ggn @ torch.zeros(ggn.shape[0] + 1, dtype=DT)


def test_wrong_dtype(ggn):
    with pytest.raises(ValueError, match=r"expected dtype torch\.float64, got torch\.float32"):
        ggn @ torch.zeros(ggn.shape[0], dtype=torch.float32)


def test_wrong_device(ggn):
    with pytest.raises(ValueError, match="expected device cpu, got meta"):
        ggn @ torch.zeros(ggn.shape[0], dtype=DT, device="meta")


def test_empty_data():
    model, loss_fn, _, _ = build(CASES[0], "ce", "mean")
    with pytest.raises(ValueError, match="at least one batch"):
        so.GGN(model, loss_fn, [])
    with pytest.raises(ValueError, match="at least one batch"):
        so.GGN(model, loss_fn, _ReIterable([]))


def test_fisher_needs_likelihood():
    model, _, inputs, y = build(CASES[0], "mse", "mean")
    for kind in ("exact", "mc", "empirical"):
        with pytest.raises(ValueError, match="needs a loss with a likelihood"):
            so.Fisher(model, lambda z, t: (z - t).abs().mean(), (inputs, y), kind=kind)
    with pytest.raises(ValueError, match="kind must be one of"):
        so.Fisher(model, nn.MSELoss(), (inputs, y), kind="true")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        so.Fisher(model, nn.MSELoss(), (inputs, y), kind="mc", num_samples=0)


def test_no_trainable_parameters():
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        so.GGN(model, loss_fn, (inputs, y))


def test_reduction_none_rejected():
    model, _, inputs, y = build(CASES[0], "ce", "mean")
    with pytest.raises(ValueError, match="reduction='none'"):
        so.GGN(model, nn.CrossEntropyLoss(reduction="none"), (inputs, y))


def test_bad_batch_format():
    model, loss_fn, inputs, _ = build(CASES[0], "ce", "mean")
    with pytest.raises(ValueError, match=r"expected a batch \(inputs, targets\)"):
        so.GGN(model, loss_fn, [inputs[0]])


def test_module_instance_applied_twice():
    """A module reused inside a Sequential is applied (and differentiated) every time."""
    torch.manual_seed(0)
    act = nn.Tanh()
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), act, lin, act, lin, act, nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    for engine in ("auto", "autograd"):
        G = so.GGN(model, loss_fn, (X, y), engine=engine)
        assert rel_err(G.to_dense(), dense_ggn(model, loss_fn, (X,), y)) <= RTOL
        assert torch.allclose(G.loss, loss_fn(model(X), y))


def _eval_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


LAYER_ZOO = {
    "avgpool": lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ),
    "conv1d_bn_maxpool": lambda: _eval_bn(
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.BatchNorm1d(3),
            nn.Tanh(),
            nn.MaxPool1d(2),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
    ),
    "unflatten_bn2d": lambda: _eval_bn(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(16, 18),
            nn.Unflatten(1, (2, 3, 3)),
            nn.BatchNorm2d(2),
            nn.Sigmoid(),
            nn.Conv2d(2, 2, 2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
    ),
    "activations": lambda: nn.Sequential(
        nn.Linear(16, 5),
        nn.LeakyReLU(0.1),
        nn.Linear(5, 5),
        nn.GELU(),
        nn.Linear(5, 5),
        nn.ELU(),
        nn.Dropout(0.3).eval(),
        nn.Linear(5, 5),
        nn.Softplus(),
        nn.Linear(5, 3),
    ),
    "pool_after_sigmoid": lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(1 * 2, 2, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 3),
    ),
}
ZOO_INPUTS = {"conv1d_bn_maxpool": (4, 2, 4), "activations": (4, 16)}


@pytest.mark.parametrize("name", list(LAYER_ZOO))
def test_sequential_engine_single_and_batched_products_match_autograd(name):
    # every layer type of the hand-written engine, single (G @ v) and batched (G @ V) products
    torch.manual_seed(0)
    model = LAYER_ZOO[name]().to(DT)
    shape = ZOO_INPUTS.get(name, (4, 1, 6, 6) if name != "unflatten_bn2d" else (4, 1, 4, 4))
    x = torch.randn(*shape, dtype=DT)
    y = torch.randn(model(x).shape, dtype=DT)
    ours = so.GGN(model, nn.MSELoss(), (x, y), engine="sequential")
    ref = so.GGN(model, nn.MSELoss(), (x, y), engine="autograd")
    V = torch.randn(ours.shape[0], 4, dtype=DT)
    assert rel_err(ours @ V, ref @ V) <= RTOL
    assert rel_err(ours @ V[:, 1], ref @ V[:, 1]) <= RTOL


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (
            lambda: nn.Sequential(
                nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
            ),
            (6, 4),
        ),
        (lambda: LAYER_ZOO["activations"](), (6, 16)),
        (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Sigmoid(), nn.Linear(4, 3)),
            (6, 4, 4),
        ),
    ],
    ids=["silu_relu", "activations", "flatten_sigmoid"],
)
def test_graph_hessian_of_mlps_matches_autograd(build, shape):
    # the R-operator path (the graph engine) against the double-backward route, full and subsets
    torch.manual_seed(0)
    model = build().to(DT)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for params in (None, [linears[0].bias, linears[-1].weight]):
        ours = so.Hessian(model, loss_fn, (x, y), params=params)
        assert ours.engine_info[0].path == "graph"
        ref = so.Hessian(model, loss_fn, (x, y), params=params, engine="autograd")
        assert rel_err(ours.to_dense(), ref.to_dense()) <= RTOL
        assert rel_err(ours.gradient(), ref.gradient()) <= RTOL
        assert float(ours.loss) == pytest.approx(float(ref.loss), rel=1e-12)


def test_hessian_keeps_the_recorded_graph_under_a_torch_function_mode():
    # positive_curvature_mode modifies the double backward: the R-operator must not bypass it
    from secondorder.curvature.pch import positive_curvature_mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    with positive_curvature_mode("abs"):
        modified = so.Hessian(model, nn.MSELoss(), (x, y)).to_dense()
    exact = so.Hessian(model, nn.MSELoss(), (x, y)).to_dense()
    assert rel_err(modified, exact) > 1e-6


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_damped_product_starts_from_the_shift(op_name):
    # (C + lam I) v: the operator starts its output at lam v (over several batches too)
    model, loss_fn, inputs, y = build(CASES[0], "ce", "mean")
    data = [((inputs[0][:3],), y[:3]), ((inputs[0][3:],), y[3:])]
    C = OPERATORS[op_name][0](model, loss_fn, data)
    v = torch.randn(C.shape[0], dtype=DT)
    for lam in (0.3, 0.0):
        damped = C + lam * so.Identity(C.shape[0], dtype=DT)
        expected = C.to_dense() @ v + lam * v
        assert rel_err(damped @ v, expected) <= RTOL
        assert rel_err(damped @ v.clone(), C @ v + lam * v) <= RTOL
