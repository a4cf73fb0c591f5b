"""Operators, diagonals and optimizer steps on models that need the autograd paths (issue 13).

Attention (items 7), GroupNorm, GRU/LSTM, train-mode BatchNorm and Dropout (item 8), against
dense float64 references built independently (see models_inputs_cases.py). Models whose forward
draws random numbers (Dropout) are built and referenced with the same seed: one forward pass
each, so one mask.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from models_inputs_cases import (
    CASE_IDS,
    CASES,
    DT,
    C,
    N,
    ref_empirical_fisher_ce,
    ref_ggn,
    ref_gradient,
    ref_hessian,
    ref_jacobian,
    trainable,
)
from torch import nn

import secondorder as so
from secondorder.curvature import FunctionalModel
from secondorder.curvature.blockwise import BlockDiagonalCurvature
from secondorder.curvature.diagonal import per_sample_gradient_diagonal
from secondorder.curvature.lowrank import LowRankGGN

RTOL = 1e-9

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def setup(case, seed=0):
    torch.manual_seed(seed)
    model = case.make()
    X = case.inputs()
    y = torch.randint(0, C, (N,))
    return model, X, y


def seeded(fn, seed=1234):
    torch.manual_seed(seed)
    return fn()


CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def _mse_targets():
    return torch.randn(N, C, dtype=DT)


# ----------------------------------------------------------------------------- operators
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_and_hessian_products(case, loss):
    model, X, y = setup(case)
    loss_fn = CE if loss == "ce" else MSE
    if loss == "mse":
        y = _mse_targets()
    for op_cls, ref in ((so.GGN, ref_ggn), (so.Hessian, ref_hessian)):
        op = seeded(lambda: op_cls(model, loss_fn, (X, y)))  # noqa: B023
        dense = seeded(lambda: ref(model, loss_fn, (X,), y))  # noqa: B023
        n = dense.shape[0]
        V = torch.randn(n, 3, dtype=DT)
        assert rel_err(op @ V[:, 0], dense @ V[:, 0]) < RTOL, op_cls.__name__
        assert rel_err(op @ V, dense @ V) < RTOL, op_cls.__name__
        assert rel_err(op.to_dense(), dense) < RTOL, op_cls.__name__
        assert rel_err(op.gradient(), seeded(lambda: ref_gradient(model, loss_fn, (X,), y))) < RTOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fisher_kinds(case):
    model, X, y = setup(case)
    exact = seeded(lambda: so.Fisher(model, CE, (X, y), kind="exact").to_dense())
    assert rel_err(exact, seeded(lambda: ref_ggn(model, CE, (X,), y))) < RTOL
    emp = seeded(lambda: so.Fisher(model, CE, (X, y), kind="empirical").to_dense())
    assert rel_err(emp, seeded(lambda: ref_empirical_fisher_ce(model, (X,), y))) < RTOL
    # Monte-Carlo: J^T (scale sum_s g_s g_s^T) J with the operator's sampled output gradients
    gen = torch.Generator().manual_seed(3)
    mc = seeded(lambda: so.Fisher(model, CE, (X, y), kind="mc", num_samples=2, generator=gen))
    state = mc._states[0][0]
    g = state.factor  # (S, R, C)
    M = torch.einsum("src,sqd->rcqd", g, g).reshape(N * C, N * C)
    M = M * (torch.eye(N, dtype=DT).repeat_interleave(C, 0).repeat_interleave(C, 1))
    _, J = seeded(lambda: ref_jacobian(model, trainable(model), (X,)))
    assert rel_err(mc.to_dense(), state.factor_scale * J.T @ M @ J) < RTOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_diagonals(case):
    model, X, y = setup(case)
    d, info = seeded(lambda: so.ggn_diagonal(model, CE, (X, y), return_info=True))
    assert rel_err(d, seeded(lambda: ref_ggn(model, CE, (X,), y)).diagonal()) < RTOL
    assert info.paths == [case.path], info.reasons
    d, info = seeded(lambda: so.empirical_fisher_diagonal(model, CE, (X, y), return_info=True))
    ref = seeded(lambda: ref_empirical_fisher_ce(model, (X,), y)).diagonal()
    assert rel_err(d, ref) < RTOL
    assert info.path == case.path and info.fallback == (case.path == "batch")
    # per-sample losses of the rows of the batch's outputs: (1/N) sum_i grad(l_i)^2
    d, info = seeded(lambda: per_sample_gradient_diagonal(model, CE, (X, y), return_info=True))
    z, J = seeded(lambda: ref_jacobian(model, trainable(model), (X,)))
    gz = torch.func.jacrev(lambda zz: nn.functional.cross_entropy(zz, y, reduction="none"))(z)
    rows = gz.reshape(N, -1) @ J
    assert rel_err(d, rows.square().sum(0) / N) < RTOL
    assert info.path == ("batch" if case.path == "batch" else "vmap")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_block_diagonal(case, curvature):
    model, X, y = setup(case)
    B = seeded(lambda: BlockDiagonalCurvature(model, CE, (X, y), curvature=curvature))
    ref = ref_ggn if curvature == "ggn" else ref_hessian
    dense = seeded(lambda: ref(model, CE, (X,), y))
    mask = torch.block_diag(*[torch.ones(p.numel(), p.numel()) for p in trainable(model)])
    assert rel_err(B.to_dense(), dense * mask) < RTOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_rank_ggn(case):
    model, X, y = setup(case)
    lr = seeded(lambda: LowRankGGN(model, CE, (X, y)))
    assert rel_err(lr.to_dense(), seeded(lambda: ref_ggn(model, CE, (X,), y))) < RTOL


def _kernel_state():
    from torch.nn.attention import _cur_sdpa_kernel_backends

    return _cur_sdpa_kernel_backends(), torch.backends.mha.get_fastpath_enabled()


def test_kernel_settings_switched_only_inside_library_calls():
    """The math kernel and no fast path inside; the user's settings restored after, always."""
    from torch.nn.attention import SDPBackend

    from secondorder.curvature.attention import differentiable_attention

    before = _kernel_state()
    with differentiable_attention():
        assert _kernel_state() == ([SDPBackend.MATH], False)
        with differentiable_attention():  # nested: unchanged inside and after
            assert _kernel_state() == ([SDPBackend.MATH], False)
        assert _kernel_state() == ([SDPBackend.MATH], False)
    assert _kernel_state() == before
    with pytest.raises(KeyError), differentiable_attention():
        raise KeyError
    assert _kernel_state() == before
    case = CASES[1]  # eval-mode encoder layer: fast path and flash kernel by default
    model, X, y = setup(case)
    so.Hessian(model, CE, (X, y)) @ torch.ones(sum(p.numel() for p in trainable(model)), dtype=DT)
    assert _kernel_state() == before


# ---------------------------------------------------------------------------- optimizers
def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)])


@pytest.mark.parametrize("case", [c for c in CASES if not c.random], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "kind", ["gauss_newton", "newton_hessian", "natural_gradient", "block_newton"]
)
def test_newton_cg_step_against_dense(case, kind):
    model, X, y = setup(case)
    if kind == "newton_hessian":
        H = ref_hessian(model, CE, (X,), y)
        damping = max(1.0, 1.0 - torch.linalg.eigvalsh(H)[0].item())
        A = H
    else:
        damping = 0.1
        A = ref_ggn(model, CE, (X,), y)
    g = ref_gradient(model, CE, (X,), y)
    if kind == "block_newton":  # one system per parameter tensor
        mask = torch.block_diag(*[torch.ones(p.numel(), p.numel()) for p in trainable(model)])
        A = A * mask
    expected = _flat(model) - torch.linalg.solve(A + damping * torch.eye(len(g), dtype=DT), g)
    kw = dict(lr=1.0, damping=damping, cg_rtol=1e-13, cg_maxiter=2000)
    if kind == "block_newton":
        opt = so.BlockDiagonalNewtonCG(model, CE, cg_atol=0.0, **kw)
    elif kind == "gauss_newton":
        opt = so.GaussNewton(model, CE, **kw)
    elif kind == "newton_hessian":
        opt = so.NewtonCG(model, CE, curvature="hessian", **kw)
    else:
        opt = so.NaturalGradient(model, CE, fisher="exact", **kw)
    opt.step(X, y)
    assert rel_err(_flat(model), expected) < 1e-8


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda m: so.HessianFree(m, CE, cg_maxiter=5),
        lambda m: so.HessianFree(m, CE, curvature="hessian", cg_maxiter=5),
        lambda m: so.BlockDiagonalNewtonCG(m, CE),
        lambda m: so.BlockDiagonalNewtonCG(m, CE, curvature="hessian"),
        lambda m: so.DirectionalDampedNewton(m, CE),
        lambda m: so.NaturalGradient(m, CE, fisher="mc"),
        lambda m: so.NaturalGradient(m, CE, fisher="empirical"),
    ],
    ids=["hf_ggn", "hf_hessian", "block_ggn", "block_hessian", "directional", "ng_mc", "ng_emp"],
)
def test_one_step_runs(case, make):
    model, X, y = setup(case)
    opt = make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a skipped (non-finite) step warns
        warnings.filterwarnings("ignore", "There is a performance drop")
        # a trial the adaptive damping rejects (the loss rose) is retried, not a failure
        warnings.filterwarnings("ignore", category=so.RejectedStepWarning)
        loss = opt.step(X, y)
    assert torch.isfinite(loss)
    assert torch.isfinite(_flat(model)).all()
    assert opt.diagnostics.get("rejected_reason") is None or "finite" not in str(
        opt.diagnostics.get("rejected_reason")
    )
    if isinstance(opt, so.HessianFree):  # its default preconditioner says which path ran
        assert opt.diagnostics["preconditioner_path"] in ("kronecker", "vmap", "batch")


@pytest.mark.parametrize("case", [c for c in CASES if not c.random], ids=lambda c: c.name)
def test_forward_mode_through_the_functional_model(case):
    """Forward mode (torch.func.jvp, forward_ad) works: no flash kernel, no fused fast path."""
    model, X, _ = setup(case)
    fmodel = FunctionalModel(model)
    ps = tuple(p.detach() for p in fmodel.params)
    ts = tuple(torch.randn_like(p) for p in ps)
    _, J = ref_jacobian(model, trainable(model), (X,))
    expected = J @ torch.cat([t.reshape(-1) for t in ts])
    if case.name != "bn_train":  # torch.func refuses the in-place running-statistics update
        _, jv = torch.func.jvp(lambda *q: fmodel(q, (X,)), ps, ts)
        assert rel_err(jv.reshape(-1), expected) < RTOL
    with fwAD.dual_level():
        out = fmodel([fwAD.make_dual(p, t) for p, t in zip(ps, ts)], (X,))
        jv = fwAD.unpack_dual(out).tangent
    assert rel_err(jv.reshape(-1), expected) < RTOL
    with torch.no_grad():  # values without gradient tracking agree with the user's forward
        assert rel_err(fmodel(ps, (X,)), model(X)) < 1e-12


def test_groupnorm_hessian_columns_fall_back_to_a_loop():
    case = next(c for c in CASES if c.name == "groupnorm")
    model, X, y = setup(case)
    H = so.Hessian(model, CE, (X, y), engine="autograd")
    assert H.batched_products == "vmap"
    dense = H.to_dense()  # GroupNorm's double backward has no batching rule
    assert H.batched_products == "loop"
    assert rel_err(dense, ref_hessian(model, CE, (X,), y)) < RTOL
    V = torch.randn(dense.shape[0], 2, dtype=DT)
    assert rel_err(H @ V, dense @ V) < RTOL
    # the graph engine: GroupNorm's residual is its double backward, one column at a time
    G = so.Hessian(model, CE, (X, y))
    assert G.engine_info[0].path == "graph"
    assert rel_err(G.to_dense(), dense) < RTOL
    assert rel_err(G @ V, dense @ V) < RTOL


class Centered(nn.Module):
    """Couples the samples outside any known module: subtracts the batch mean of a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, C)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Centered().double(),
        lambda: (
            nn.Sequential(
                nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, C)
            )
            .double()
            .eval()
        ),
    ],
    ids=["batch_mean_in_forward", "bn_without_running_stats"],
)
def test_coupled_samples_take_the_batch_path(make):
    torch.manual_seed(0)
    model = make()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, C, (N,))
    G = ref_ggn(model, CE, (X,), y)
    d, info = so.ggn_diagonal(model, CE, (X, y), return_info=True)
    assert info.paths == ["batch"], info.reasons
    assert rel_err(d, G.diagonal()) < RTOL
    d, info = so.empirical_fisher_diagonal(model, CE, (X, y), return_info=True)
    assert info.paths == ["batch"]
    assert rel_err(d, ref_empirical_fisher_ce(model, (X,), y).diagonal()) < RTOL
    d, info = per_sample_gradient_diagonal(model, CE, (X, y), return_info=True)
    assert info.paths == ["batch"]
    assert rel_err(d, ref_empirical_fisher_ce(model, (X,), y).diagonal()) < RTOL


@pytest.mark.parametrize("op_cls", [so.GGN, so.Hessian])
def test_batched_products_without_batching_rule_loop_over_columns(op_cls, monkeypatch):
    """A backward without a batching rule: products with several columns loop, exactly."""
    case = next(c for c in CASES if c.name == "gru")  # an autograd node (attention has rules)
    model, X, y = setup(case)
    dense = (ref_ggn if op_cls is so.GGN else ref_hessian)(model, CE, (X,), y)
    op = op_cls(model, CE, (X, y))
    real = torch.autograd.grad

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    V = torch.randn(dense.shape[0], 3, dtype=DT)
    assert rel_err(op @ V, dense @ V) < RTOL
    owner = op if op_cls is so.Hessian else op._states[0][0].lin
    assert owner.batched_products == "loop"


class PaddedEncoder(nn.Module):
    """A two-layer nn.TransformerEncoder (nested-tensor fast path in eval) with a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, 0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(4, C)

    def forward(self, x, pad):
        h = self.enc(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_with_padding_mask(mode):
    torch.manual_seed(0)
    model = getattr(PaddedEncoder().double(), mode)()
    X = torch.randn(N, 4, 4, dtype=DT)
    pad = torch.zeros(N, 4, dtype=torch.bool)
    pad[0, 3] = True
    pad[1, 2:] = True
    y = torch.randint(0, C, (N,))
    data = ((X, pad), y)
    G = ref_ggn(model, CE, (X, pad), y)
    H = ref_hessian(model, CE, (X, pad), y)
    assert rel_err(so.Hessian(model, CE, data).to_dense(), H) < RTOL
    assert rel_err(so.GGN(model, CE, data).to_dense(), G) < RTOL
    d, info = so.ggn_diagonal(model, CE, data, return_info=True)
    assert info.paths == ["vmap"] and rel_err(d, G.diagonal()) < RTOL
