"""Block-diagonal GGN / Hessian / PCH against dense references built independently (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F

import secondorder as so
from secondorder.curvature.blockwise import (
    CURVATURES,
    BlockDiagonalCurvature,
    sequential_blocks,
)
from secondorder.curvature.pch import PCH, positive_curvature_mode
from secondorder.linalg.block_cg import block_cg
from secondorder.linalg.status import SolverStatus as S

DT = torch.float64
TOL = 1e-10


# ----------------------------------------------------------------------------- problems
def _mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _cnn():  # the seed's architecture in miniature
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )


def _cnn_patches():  # >= 64 input features per output: weight products by im2col matrices
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(3, stride=2, padding=1),  # overlapping windows
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.Conv2d(8, 4, 3, dilation=2, padding=2),
        nn.Identity(),
        nn.Mish(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _conv1d():
    return nn.Sequential(
        nn.Conv1d(16, 4, 4, padding=1),
        nn.ELU(),
        nn.MaxPool1d(2),
        nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 4))),  # nested Sequential
        nn.Conv1d(4, 2, 3, padding="same"),
        nn.GELU(approximate="tanh"),
        nn.Dropout(0.0),
        nn.Flatten(),
        nn.Linear(8, 3, bias=False),
    )


def _shared_activation():  # one module instance applied twice, as nn.Sequential does
    act = nn.Tanh()
    return nn.Sequential(
        nn.Linear(3, 4), act, nn.Dropout2d(0.5).eval(), nn.Linear(4, 4), act, nn.Linear(4, 3)
    )


def _relu_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 6),
        nn.LeakyReLU(0.1),
        nn.Linear(6, 3),
    )


CASES = {
    "mlp": (_mlp, (3,)),
    "cnn": (_cnn, (2, 8, 8)),
    "cnn_patches": (_cnn_patches, (2, 8, 8)),
    "conv1d": (_conv1d, (16, 9)),
    "relu_cnn": (_relu_cnn, (2, 8, 8)),
    "shared_activation": (_shared_activation, (3,)),
}


def _targets(loss_name, n, g):
    if loss_name == "ce":
        return torch.randint(0, 3, (n,), generator=g)
    if loss_name == "bce":
        return torch.rand(n, 3, generator=g, dtype=DT)
    return torch.randn(n, 3, generator=g, dtype=DT)


LOSSES = {
    "ce": lambda: nn.CrossEntropyLoss(),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "generic": lambda: lambda z, y: ((z - y) ** 4).mean() + (z.sum(0) ** 2).sum(),
}


def make(case, loss_name="ce", n=3, seed=0):
    builder, shape = CASES[case]
    torch.manual_seed(seed)
    model = builder().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    return model, LOSSES[loss_name](), X, _targets(loss_name, n, g)


def split_blocks(D, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(D[start : start + n, start : start + n])
        start += n
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_blocks_close(got, want, tol=TOL):
    for i, (a, b) in enumerate(zip(got, want)):
        scale = max(b.norm().item(), 1e-12)
        assert (a - b).norm().item() <= tol * scale, f"block {i}: {rel(a, b):.2e}"


# ------------------------------------------------------------------------ references
def full_hessian(model, loss_fn, X, y):
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    sizes = [v.numel() for v in values]
    theta = torch.cat([v.reshape(-1) for v in values])

    def f(th):
        parts = [t.view(v.shape) for t, v in zip(th.split(sizes), values)]
        return loss_fn(functional_call(model, dict(zip(names, parts)), (X,)), y)

    return hessian(f)(theta), sizes


def _leaf_layers(model):
    out = []
    for m in model._modules.values():  # repeated instances too, as nn.Sequential runs them
        out.extend(_leaf_layers(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _modify_symmetric(R, rule):
    if rule == "hessian":
        return R
    if rule == "ggn":
        return torch.zeros_like(R)
    diagonal = torch.diag(torch.diagonal(R))
    if torch.equal(R, diagonal):  # elementwise layers: modify the diagonal directly
        d = torch.diagonal(R)
        return torch.diag(d.clamp_min(0) if rule == "pch_clip" else d.abs())
    evals, Q = torch.linalg.eigh((R + R.T) / 2)
    evals = evals.clamp_min(0) if rule == "pch_clip" else evals.abs()
    return Q @ torch.diag(evals) @ Q.T


def backprop_reference(model, loss_fn, X, y, rule):
    """Diagonal blocks by explicit Hessian backpropagation with dense full-batch matrices.

    H_out of every layer is a dense (batch * features)^2 matrix; residual terms are the dense
    Hessians of delta . f(z) (torch.func), modified through their eigenvalues for the PCH.
    """
    layers = _leaf_layers(model)
    zs = [X]
    for layer in layers:
        zs.append(layer(zs[-1]))
    with torch.enable_grad():  # deltas[j] = dL / d(output of layer j)
        chain = [X.detach()]
        for layer in layers:
            chain.append(layer(chain[-1]))
        deltas = torch.autograd.grad(loss_fn(chain[-1], y), chain[1:])
    out = zs[-1].detach()
    H = hessian(lambda z: loss_fn(z, y))(out).reshape(out.numel(), out.numel())
    blocks = {}
    for j in reversed(range(len(layers))):
        layer, zin = layers[j], zs[j].detach()
        params = dict(layer.named_parameters(recurse=False))
        for name, p in params.items():

            def f(w, name=name, layer=layer, zin=zin, params=params):
                return functional_call(layer, {**params, name: w}, (zin,))

            J = jacrev(f)(p.detach()).reshape(-1, p.numel())
            blocks[(j, name)] = J.T @ H @ J
        if j == 0:
            break
        n_in = zin.numel()
        Jin = jacrev(layer)(zin).reshape(-1, n_in)
        delta = deltas[j].detach()
        R = hessian(lambda z, layer=layer, delta=delta: (delta * layer(z)).sum())(zin)
        H = Jin.T @ H @ Jin + _modify_symmetric(R.reshape(n_in, n_in), rule)
    order = [(j, name) for j, layer in enumerate(layers) for name, _ in layer.named_parameters()]
    return [blocks[k] for k in order]


# ------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("curvature", CURVATURES)
def test_blocks_equal_dense_backprop_reference(case, curvature):
    model, loss_fn, X, y = make(case)
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature)
    assert B.engine == "sequential"
    got = split_blocks(B.to_dense(), B.block_sizes)
    assert_blocks_close(got, backprop_reference(model, loss_fn, X, y, curvature))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_hessian_blocks_equal_true_hessian_blocks(case, loss_name):
    model, loss_fn, X, y = make(case, loss_name)
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian")
    H, sizes = full_hessian(model, loss_fn, X, y)
    assert B.block_sizes == sizes
    assert_blocks_close(split_blocks(B.to_dense(), sizes), split_blocks(H, sizes))
    assert not B.IS_PSD


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_name", ["ce", "mse_sum", "bce"])
def test_ggn_blocks_equal_ggn_operator_blocks(case, loss_name):
    model, loss_fn, X, y = make(case, loss_name)
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="ggn")
    ref = so.GGN(model, loss_fn, (X, y), engine="autograd").block_diagonal().to_dense()
    assert_blocks_close(split_blocks(B.to_dense(), B.block_sizes), split_blocks(ref, B.block_sizes))
    assert B.IS_PSD


def test_relu_network_curvatures_coincide():
    # piecewise-linear activations have no residual: GGN = Hessian = PCH blocks
    model, loss_fn, X, y = make("relu_cnn", n=4)
    dense = {
        c: BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=c).to_dense()
        for c in CURVATURES
    }
    for c in CURVATURES:
        assert rel(dense[c], dense["ggn"]) < TOL


def _positive_softplus_net(sign):
    """MSE on a Softplus net with positive weights; targets far below (sign=+1) or above.

    Every backpropagated gradient then has the sign of ``sign`` and softplus'' > 0, so every
    residual term is >= 0 (sign=+1) or <= 0 (sign=-1).
    """
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)
    ).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    X = torch.randn(5, 3, dtype=DT)
    y = torch.full((5, 2), -100.0 * sign, dtype=DT)
    return model, nn.MSELoss(), X, y


@pytest.mark.parametrize("engine", ["sequential", "autograd"])
def test_pch_equals_hessian_where_residuals_are_nonnegative(engine):
    model, loss_fn, X, y = _positive_softplus_net(+1)
    dense = {
        c: BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=c, engine=engine).to_dense()
        for c in CURVATURES
    }
    assert rel(dense["hessian"], dense["ggn"]) > 1e-3  # the residuals matter here
    assert rel(dense["pch_clip"], dense["hessian"]) < TOL
    assert rel(dense["pch_abs"], dense["hessian"]) < TOL


@pytest.mark.parametrize("engine", ["sequential", "autograd"])
def test_pch_where_residuals_are_nonpositive(engine):
    model, loss_fn, X, y = _positive_softplus_net(-1)
    dense = {
        c: BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=c, engine=engine).to_dense()
        for c in CURVATURES
    }
    assert rel(dense["hessian"], dense["ggn"]) > 1e-3
    assert rel(dense["pch_clip"], dense["ggn"]) < TOL  # clipped residuals vanish
    # |R| = -R: each backpropagated H_abs + H_hessian = 2 H_ggn
    assert rel(dense["pch_abs"], 2 * dense["ggn"] - dense["hessian"]) < TOL


@pytest.mark.parametrize("case", ["mlp", "cnn", "cnn_patches", "conv1d"])
@pytest.mark.parametrize("curvature", ["pch_clip", "pch_abs"])
def test_pch_blocks_are_psd_and_the_hessian_is_not(case, curvature):
    found_negative = False
    for seed in range(3):
        model, loss_fn, X, y = make(case, n=4, seed=seed)
        B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature)
        assert B.IS_PSD
        H = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian")
        for P, Hb in zip(
            split_blocks(B.to_dense(), B.block_sizes), split_blocks(H.to_dense(), B.block_sizes)
        ):
            assert torch.allclose(P, P.T, atol=1e-14 * P.abs().max().item())
            assert torch.linalg.eigvalsh(P).min() >= -1e-12 * max(P.abs().max().item(), 1e-30)
            found_negative |= bool(torch.linalg.eigvalsh(Hb).min() < -1e-8 * Hb.abs().max())
    assert found_negative  # the test has teeth: some Hessian block is indefinite


@pytest.mark.parametrize("curvature", CURVATURES)
def test_autograd_engine_matches_sequential_engine(curvature):
    model, loss_fn, X, y = make("cnn_patches", n=3)
    seq = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature, engine="sequential")
    auto = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature, engine="autograd")
    assert auto.engine == "autograd"
    assert rel(auto.to_dense(), seq.to_dense()) < TOL
    assert torch.allclose(auto.gradient(), seq.gradient(), rtol=1e-12, atol=1e-15)
    assert float(auto.loss) == pytest.approx(float(seq.loss), rel=1e-13)


class _Custom(nn.Module):
    """Not a Sequential: functional activations, a skip connection."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        h = h + F.silu(self.b(h)).tanh()
        return self.out(F.softplus(h, beta=2.0))


def test_any_architecture_through_the_autograd_engine():
    torch.manual_seed(0)
    model = _Custom().to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    H, sizes = full_hessian(model, loss_fn, X, y)
    Bh = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian")
    assert Bh.engine == "autograd"
    assert_blocks_close(split_blocks(Bh.to_dense(), sizes), split_blocks(H, sizes))
    for modify in ("clip", "abs"):
        P = PCH(model, loss_fn, (X, y), modify=modify).to_dense()
        for block in split_blocks(P, sizes):
            assert torch.linalg.eigvalsh(block).min() >= -1e-12 * block.abs().max()
    with pytest.raises(ValueError, match=r"_Custom.*supported layers"):
        BlockDiagonalCurvature(model, loss_fn, (X, y), engine="sequential")


def test_modified_double_backward_of_one_activation():
    a = torch.linspace(-3, 3, 7, dtype=DT, requires_grad=True)
    w = torch.linspace(-1, 1, 7, dtype=DT)  # delta of both signs
    d2 = torch.func.grad(torch.func.grad(lambda t: torch.tanh(t)))
    second = torch.stack([d2(t) for t in a.detach()])
    for modify, rule in (("clip", lambda r: r.clamp_min(0)), ("abs", torch.abs)):
        with positive_curvature_mode(modify):
            (g,) = torch.autograd.grad((w * torch.tanh(a)).sum(), a, create_graph=True)
        assert torch.allclose(g, w * (1 - torch.tanh(a.detach()) ** 2))  # exact gradient
        v = torch.randn(7, dtype=DT)
        (hv,) = torch.autograd.grad(g, a, v)
        assert torch.allclose(hv, rule(w * second) * v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("inplace", "plain"),
    [
        (lambda a: F.silu(a, inplace=True), F.silu),
        (lambda a: F.elu(a, 0.7, True), lambda a: F.elu(a, 0.7)),
        (lambda a: F.celu(a, alpha=0.5, inplace=True), lambda a: F.celu(a, alpha=0.5)),
        (lambda a: a.sigmoid_(), torch.sigmoid),
        (lambda a: torch.tanh_(a), torch.tanh),
        (lambda a: F.elu_(a, 0.7), lambda a: F.elu(a, 0.7)),
        (lambda a: torch.selu_(a), F.selu),
    ],
)
def test_positive_curvature_mode_takes_inplace_activations_out_of_place(inplace, plain):
    # the modified Hessian-vector product of an in-place activation is the out-of-place one
    torch.manual_seed(0)
    x = torch.randn(6, dtype=DT, requires_grad=True)
    w, v = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
    results = []
    for fn in (inplace, plain):
        with positive_curvature_mode("clip"):
            y = fn(x * 1.5)
            (g,) = torch.autograd.grad((w * y).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v)
        results.append((y.detach(), g.detach(), hv))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_positive_curvature_mode_refuses_bad_modify():
    with pytest.raises(ValueError, match="modify must be one of"):
        positive_curvature_mode("square")
    with pytest.raises(ValueError, match="modify must be one of"):
        PCH(nn.Linear(2, 2), nn.MSELoss(), (torch.randn(2, 2), torch.randn(2, 2)), modify="x")


def test_pch_class_is_the_pch_curvature():
    model, loss_fn, X, y = make("cnn")
    for modify in ("clip", "abs"):
        P = PCH(model, loss_fn, (X, y), modify=modify)
        B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=f"pch_{modify}")
        assert torch.equal(P.to_dense(), B.to_dense())


# -------------------------------------------------------------------- operator contract
def test_loss_gradient_and_operator_products():
    model, loss_fn, X, y = make("cnn", n=4)
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="pch_abs")
    out = loss_fn(model(X), y)
    grads = torch.autograd.grad(out, list(model.parameters()))
    assert float(B.loss) == pytest.approx(out.item(), rel=1e-14)
    assert torch.allclose(B.gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12)
    D = B.to_dense()
    g = torch.Generator().manual_seed(0)
    v = torch.randn(B.shape[0], generator=g, dtype=DT)
    V = torch.randn(B.shape[0], 3, generator=g, dtype=DT)
    assert torch.allclose(B @ v, D @ v, rtol=1e-12, atol=1e-15)
    assert torch.allclose(B @ V, D @ V, rtol=1e-12, atol=1e-15)
    assert torch.allclose(V.T @ B, V.T @ D, rtol=1e-12, atol=1e-15)
    # a subset of blocks, vectors and column blocks mixed, in any order
    sizes = B.block_sizes
    vs = [
        torch.randn(sizes[3], generator=g, dtype=DT),
        torch.randn(sizes[0], 2, generator=g, dtype=DT),
    ]
    r3, r0 = B.apply_blocks([3, 0], vs)
    blocks = split_blocks(D, sizes)
    assert torch.allclose(r3, blocks[3] @ vs[0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(r0, blocks[0] @ vs[1], rtol=1e-12, atol=1e-15)
    assert B.block(1).shape == (sizes[1], sizes[1])
    assert torch.allclose(B.block(1).to_dense(), blocks[1])


def test_several_batches_sum_to_the_full_batch():
    model, loss_fn, X, y = make("cnn", n=6)
    for curvature in ("ggn", "pch_clip"):
        full = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature)
        parts = BlockDiagonalCurvature(
            model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])], curvature=curvature
        )
        assert rel(parts.to_dense(), full.to_dense()) < TOL
        assert torch.allclose(parts.gradient(), full.gradient(), rtol=1e-12, atol=1e-15)
        assert float(parts.loss) == pytest.approx(float(full.loss), rel=1e-13)


def test_parameter_subset_and_frozen_parameters():
    model, loss_fn, X, y = make("cnn")
    params = list(model.parameters())
    model[3].weight.requires_grad_(False)  # frozen: used as a constant, no block
    chosen = [params[0], params[4], params[5]]
    full = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian", params=params)
    sub = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian", params=chosen)
    blocks = split_blocks(full.to_dense(), full.block_sizes)
    assert_blocks_close(
        split_blocks(sub.to_dense(), sub.block_sizes), [blocks[i] for i in (0, 4, 5)]
    )
    default = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="hessian")
    assert default.num_blocks == len(params) - 1


def test_float32_works():
    model, loss_fn, X, y = make("cnn")
    model = model.float()
    B = BlockDiagonalCurvature(model, loss_fn, (X.float(), y), curvature="pch_clip")
    v = torch.randn(B.shape[0])
    assert (B @ v).dtype == torch.float32


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.BatchNorm1d(5), r"layer '1' \(BatchNorm1d\) is not supported"),
        (nn.LayerNorm(5), r"layer '1' \(LayerNorm\)"),
        (nn.Softmax(dim=1), r"layer '1' \(Softmax\)"),
    ],
)
def test_unsupported_layer_is_named(layer, match):
    model = nn.Sequential(nn.Linear(3, 5), layer, nn.Linear(5, 2))
    data = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match=match):
        BlockDiagonalCurvature(model, nn.CrossEntropyLoss(), data, engine="sequential")
    with pytest.raises(ValueError, match="Supported layers: Linear, Conv1d"):
        sequential_blocks(model)
    # the automatic choice falls back to autograd and stays exact
    auto = BlockDiagonalCurvature(model, nn.CrossEntropyLoss(), data, curvature="ggn")
    assert auto.engine == "autograd"


def test_other_refusals():
    data = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    loss_fn = nn.CrossEntropyLoss()
    nested = nn.Sequential(
        nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Dropout(0.5)), nn.Linear(4, 2)
    )
    with pytest.raises(ValueError, match=r"layer '1.1' \(Dropout\).*training mode"):
        sequential_blocks(nested)
    nested.eval()
    assert len(sequential_blocks(nested)) == 4
    reflect = nn.Sequential(nn.Conv1d(3, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sequential_blocks(reflect)
    lin = nn.Linear(3, 3)
    tied = nn.Sequential(lin, nn.Tanh(), lin)
    tied_data = (torch.randn(4, 3), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="shared between layers"):
        BlockDiagonalCurvature(tied, loss_fn, tied_data, engine="sequential")
    assert BlockDiagonalCurvature(tied, loss_fn, tied_data).engine == "autograd"
    stray = nn.Sequential(nn.Linear(3, 2))
    stray.register_parameter("scale", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match=r"\['scale'\] are not the weight or bias"):
        BlockDiagonalCurvature(stray, loss_fn, data, engine="sequential")
    flat0 = nn.Sequential(nn.Flatten(0), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="dimension 0 mixes the samples"):
        BlockDiagonalCurvature(flat0, loss_fn, data, engine="sequential")
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="curvature must be one of"):
        BlockDiagonalCurvature(model, loss_fn, data, curvature="fisher")
    with pytest.raises(ValueError, match="engine must be one of"):
        BlockDiagonalCurvature(model, loss_fn, data, engine="fast")
    with pytest.raises(ValueError, match="one input tensor"):
        BlockDiagonalCurvature(model, loss_fn, ((data[0], data[0]), data[1]), engine="sequential")
    B = BlockDiagonalCurvature(model, loss_fn, data)
    with pytest.raises(ValueError, match="distinct"):
        B.apply_blocks([0, 0], [torch.zeros(6), torch.zeros(6)])
    with pytest.raises(ValueError, match=r"expected a vector of shape \(6,\)"):
        B.apply_blocks([0], [torch.zeros(5)])
    with pytest.raises(ValueError, match=r"block index must be in \[0, 2\)"):
        B.apply_blocks([2], [torch.zeros(2)])
    with pytest.raises(IndexError):
        B.block(5)


# ------------------------------------------------------------------------- lock-step CG
def _spd(n, g, cond=50.0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T


def test_block_cg_equals_cg_per_system():
    g = torch.Generator().manual_seed(0)
    sizes = [1, 7, 30, 12]
    A = [_spd(n, g) for n in sizes]
    b = [torch.randn(n, generator=g, dtype=DT) for n in sizes]
    shift, rtol, atol, maxiter = (
        [0.1, 0.0, 1.0, 0.5],
        [1e-3, 1e-8, 0.1, 0.0],
        [0.0, 0.0, 1e-6, 1e-2],
        [5, 50, 20, 3],
    )
    calls = []

    def apply(idx, vs):
        calls.append(list(idx))
        return [A[i] @ v for i, v in zip(idx, vs)]

    x, info = block_cg(apply, b, shift=shift, rtol=rtol, atol=atol, maxiter=maxiter)
    for i in range(len(sizes)):
        M = A[i] + shift[i] * torch.eye(sizes[i], dtype=DT)
        ref, ref_info = so.cg(M, b[i], rtol=rtol[i], atol=atol[i], maxiter=maxiter[i])
        assert info.iterations[i] == ref_info.iterations
        assert torch.allclose(x[i], ref, rtol=1e-10, atol=1e-12)
        assert info.residual_norms[i] == pytest.approx(ref_info.residual_norm, rel=1e-6, abs=1e-9)
        assert info.status[i] == (S.CONVERGED if ref_info.converged else S.MAXITER)
    assert info.sweeps == max(info.iterations) == len(calls)
    # systems leave the sweeps once they stop
    assert all(len(c) <= len(p) for p, c in itertools.pairwise(calls))


def test_block_cg_edge_cases():
    A = [torch.eye(3, dtype=DT) * 2, torch.diag(torch.tensor([1.0, -1.0], dtype=DT))]

    def apply(idx, vs):
        return [A[i] @ v for i, v in zip(idx, vs)]

    zero = [torch.zeros(3, dtype=DT), torch.zeros(2, dtype=DT)]
    x, info = block_cg(apply, zero)
    assert info.status == [S.CONVERGED, S.CONVERGED] and info.sweeps == 0
    b = [torch.ones(3, dtype=DT), torch.tensor([1.0, 2.0], dtype=DT)]
    x, info = block_cg(apply, b, maxiter=0)
    assert info.status == [S.MAXITER, S.MAXITER] and torch.equal(x[0], torch.zeros(3, dtype=DT))
    # indefinite system: p^T A p = 1 - 4 < 0 in the first iteration
    x, info = block_cg(apply, b, rtol=1e-12, negative_curvature="stop")
    assert info.status == [S.CONVERGED, S.NEGATIVE_CURVATURE]
    assert info.iterations[1] == 0 and torch.equal(x[1], torch.zeros(2, dtype=DT))
    x, info = block_cg(apply, b, rtol=1e-12, negative_curvature="continue")
    assert info.negative_curvature == [False, True]
    assert torch.allclose(x[1], torch.tensor([1.0, -2.0], dtype=DT))  # plain CG solves it here
    for kwargs, match in [
        (dict(rtol=-1.0), r"rtol must be >= 0 \(inf allowed\)"),
        (dict(atol=math.nan), r"atol must be >= 0 \(inf allowed\)"),
        (dict(maxiter=1.5), "maxiter must be an int"),
        (dict(shift=[1.0]), "one value per system"),
        (dict(negative_curvature="skip"), "negative_curvature must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            block_cg(apply, b, **kwargs)


def test_block_cg_solves_systems_of_different_dtypes():
    # no shared flat buffers: every system gets its own vectors
    g = torch.Generator().manual_seed(6)
    A = [_spd(6, g), _spd(4, g).float(), _spd(3, g)]
    b = [
        torch.randn(6, generator=g, dtype=DT),
        torch.randn(4, generator=g),
        torch.zeros(3, dtype=DT),
    ]

    def apply(idx, vs):
        return [A[i] @ v for i, v in zip(idx, vs)]

    x, info = block_cg(apply, b, shift=0.3, rtol=1e-6, maxiter=[20, 20, 5])
    assert [xi.dtype for xi in x] == [DT, torch.float32, DT]
    assert info.status == [S.CONVERGED] * 3 and info.iterations[2] == 0
    for i in range(2):
        M = A[i] + 0.3 * torch.eye(A[i].shape[0], dtype=A[i].dtype)
        ref, ref_info = so.cg(M, b[i], rtol=1e-6, maxiter=20)
        assert info.iterations[i] == ref_info.iterations
        torch.testing.assert_close(x[i], ref)
    assert torch.equal(x[2], torch.zeros(3, dtype=DT))  # x_0 = 0 for a system that never steps
    with pytest.raises(ValueError, match="b sharing one dtype and device"):
        block_cg(apply, b, out=torch.zeros(13, dtype=DT))


@pytest.mark.parametrize("mixed_dtypes", [False, True])
def test_block_cg_keeps_the_shapes_of_b(mixed_dtypes):
    # a system per parameter tensor, seen by `apply` in its own shape (a 2-D weight, a bias)
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (4,), (2, 1, 3)]
    A = [_spd(math.prod(sh), g) for sh in shapes]
    b = [torch.randn(sh, generator=g, dtype=DT) for sh in shapes]
    if mixed_dtypes:  # no shared flat buffers
        A[1], b[1] = A[1].float(), b[1].float()
    seen = []

    def apply(idx, vs):
        seen.extend(tuple(v.shape) for v in vs)
        return [(A[i] @ v.reshape(-1)).view(v.shape) for i, v in zip(idx, vs)]

    x, info = block_cg(apply, b, shift=0.2, rtol=1e-10, maxiter=50)
    assert set(seen) == set(shapes)
    for xi, Ai, bi in zip(x, A, b):
        assert xi.shape == bi.shape and xi.dtype == bi.dtype
        M = Ai + 0.2 * torch.eye(Ai.shape[0], dtype=Ai.dtype)
        tol = 1e-8 if bi.dtype == DT else 1e-4
        torch.testing.assert_close(
            xi.reshape(-1), torch.linalg.solve(M, bi.reshape(-1)), rtol=tol, atol=tol
        )
    assert info.status == [S.CONVERGED] * 3


def test_block_cg_on_one_flat_b_cut_by_sizes():
    g = torch.Generator().manual_seed(8)
    sizes = [5, 1, 8, 3]
    A = [_spd(k, g) for k in sizes]

    def apply(idx, vs):
        return [A[i] @ v for i, v in zip(idx, vs)]

    flat = torch.randn(sum(sizes), generator=g, dtype=DT)
    kw = dict(shift=[0.1, 0.0, 0.3, 1.0], rtol=1e-9, maxiter=[6, 0, 20, 20])
    x_ref, info_ref = block_cg(apply, [t.clone() for t in flat.split(sizes)], **kw)
    work = flat.clone()
    x, info = block_cg(apply, work, sizes=sizes, **kw)
    assert torch.equal(work, flat)  # b is left alone
    for xi, ri in zip(x, x_ref):
        torch.testing.assert_close(xi, ri, rtol=0, atol=0)
    assert info.residual_norms == info_ref.residual_norms and info.status == info_ref.status
    norms = [float(t.norm()) for t in flat.split(sizes)]
    assert info.rhs_norms == pytest.approx(norms, rel=1e-14)
    bad = flat.clone()
    bad[6] = math.nan  # in the third system
    _, info_bad = block_cg(apply, bad, sizes=sizes, **kw)
    assert math.isnan(info_bad.rhs_norms[2]) and info_bad.status[2] == S.NONFINITE
    assert info_bad.iterations[2] == 0 and info_bad.rhs_norms[0] == pytest.approx(norms[0])
    out = torch.full_like(flat, math.nan)
    x, info = block_cg(apply, work, sizes=sizes, out=out, **kw)
    torch.testing.assert_close(out, torch.cat(x_ref), rtol=0, atol=0)
    assert torch.equal(work, flat)
    for bad, match in [
        (dict(b=flat, sizes=None), "must be 1-D and come with `sizes`"),
        (dict(b=flat.view(1, -1), sizes=[17]), "must be 1-D and come with `sizes`"),
        (dict(b=flat, sizes=[5, 1, 8]), "summing to b.numel"),
        (dict(b=flat, sizes=[5, -1, 8, 5]), "must be 1-D and come with `sizes`"),
        (dict(b=list(flat.split(sizes)), sizes=sizes), "only for a flat b"),
    ]:
        with pytest.raises(ValueError, match=match):
            block_cg(apply, **bad)


def test_block_cg_on_curvature_blocks_equals_cg_on_block_operators():
    model, loss_fn, X, y = make("cnn", n=4)
    B = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature="pch_clip")
    grads = list(B.gradient().split(B.block_sizes))
    x, info = block_cg(B.apply_blocks, grads, shift=1e-2, rtol=1e-4, maxiter=15)
    for i, gi in enumerate(grads):
        A = B.block(i) + 1e-2 * so.Identity(gi.numel(), dtype=DT)
        ref, ref_info = so.cg(A, gi, rtol=1e-4, maxiter=15)
        assert info.iterations[i] == ref_info.iterations
        assert rel(x[i], ref) < 1e-8


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch_abs"])
def test_apply_blocks_with_a_shift_adds_it(kind, curvature):
    # (C_i + lambda_i I) v_i, fused into the weight products with one batch of weight 1, and
    # added after the sum with several batches; columns (k > 1) too
    model, loss_fn, X, y = make(kind, n=6)
    g = torch.Generator().manual_seed(5)
    for data in [(X, y), [(X[:2], y[:2]), (X[2:], y[2:])]]:
        B = BlockDiagonalCurvature(model, loss_fn, data, curvature=curvature)
        idx = list(range(B.num_blocks))[::-1]
        vs = [torch.randn(B.block_sizes[i], generator=g, dtype=DT) for i in idx]
        shifts = [0.1 * (i + 1) for i in idx]
        plain = B.apply_blocks(idx, vs)
        shifted = B.apply_blocks(idx, vs, shift=shifts)
        for v, s, a, b in zip(vs, shifts, plain, shifted):
            torch.testing.assert_close(b, a + s * v, rtol=1e-12, atol=1e-12)
        mats = [torch.randn(B.block_sizes[i], 3, generator=g, dtype=DT) for i in idx]
        plain = B.apply_blocks(idx, mats)
        shifted = B.apply_blocks(idx, mats, shift=0.7)
        for m, a, b in zip(mats, plain, shifted):
            torch.testing.assert_close(b, a + 0.7 * m, rtol=1e-12, atol=1e-12)
    # the autograd engine adds the shift after its block products
    A = BlockDiagonalCurvature(model, loss_fn, (X, y), curvature=curvature, engine="autograd")
    plain = A.apply_blocks(idx, vs)
    shifted = A.apply_blocks(idx, vs, shift=shifts)
    for v, s, a, b in zip(vs, shifts, plain, shifted):
        torch.testing.assert_close(b, a + s * v, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one value per index"):
        B.apply_blocks([0, 1], vs[:2], shift=[1.0])
    with pytest.raises(ValueError, match="finite floats"):
        B.apply_blocks([0], vs[:1], shift=math.nan)


def test_block_cg_writes_into_out():
    g = torch.Generator().manual_seed(3)
    sizes = [4, 9, 2]
    A = [_spd(n, g) for n in sizes]
    b = [torch.randn(n, generator=g, dtype=DT) for n in sizes]

    def apply(idx, vs):
        return [A[i] @ v for i, v in zip(idx, vs)]

    x_ref, _ = block_cg(apply, b, shift=0.5, rtol=1e-10)
    out = torch.full((sum(sizes),), math.nan, dtype=DT)  # overwritten, not read
    x, _ = block_cg(apply, b, shift=0.5, rtol=1e-10, out=out)
    for xi, ri in zip(x, x_ref):
        assert xi.data_ptr() >= out.data_ptr()
        torch.testing.assert_close(xi, ri, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.cat(x_ref), rtol=0, atol=0)
    # systems that never step (maxiter 0, a zero right-hand side) return x_0 = 0
    out.fill_(math.nan)
    b[1] = torch.zeros_like(b[1])
    x, info = block_cg(apply, b, rtol=1e-10, maxiter=[0, 5, 5], out=out)
    assert info.iterations[:2] == [0, 0] and info.iterations[2] > 0
    assert torch.equal(out[: sum(sizes[:2])], torch.zeros(sum(sizes[:2]), dtype=DT))
    assert torch.isfinite(out).all()
    for bad in [torch.zeros(3, dtype=DT), torch.zeros(sum(sizes)), [0.0] * sum(sizes)]:
        with pytest.raises(ValueError, match="out: expected a 1-D tensor"):
            block_cg(apply, b, out=bad)


def test_block_cg_leaves_b_alone():
    g = torch.Generator().manual_seed(4)
    sizes = [5, 8, 3]
    A = [_spd(n, g) for n in sizes]

    def apply(idx, vs):
        return [A[i] @ v for i, v in zip(idx, vs)]

    flat = torch.randn(sum(sizes), generator=g, dtype=DT)
    maxiter = [4, 0, 6]  # the second system takes no step
    x_ref, info_ref = block_cg(
        apply, [t.clone() for t in flat.split(sizes)], rtol=1e-10, maxiter=maxiter
    )
    work = flat.clone()
    b = list(work.split(sizes))  # consecutive views of one buffer
    x, info = block_cg(apply, b, rtol=1e-10, maxiter=maxiter)
    for xi, ri in zip(x, x_ref):
        torch.testing.assert_close(xi, ri, rtol=0, atol=0)
    assert info.residual_norms == info_ref.residual_norms
    assert torch.equal(work, flat)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_autograd_engine_is_passed_on_to_the_generic_operator(curvature):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    B = so.BlockDiagonalCurvature(
        model, nn.CrossEntropyLoss(), (X, y), curvature=curvature, engine="autograd"
    )
    assert B.engine == "autograd" and B._op.engine == "autograd"
    B = so.BlockDiagonalCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature=curvature)
    assert B.engine == "sequential"


def test_supported_layers_come_from_the_registry():
    """The engine takes a module iff the registry has a rule for it of a kind it implements."""
    from secondorder.curvature.blockwise_layers import LAYERS, _unsupported_reason
    from secondorder.curvature.layers import EXAMPLES, rule_for

    for example in EXAMPLES:
        module = example.build()
        rule = rule_for(module)[0]
        assert rule is not None
        assert (_unsupported_reason(module) is None) == (type(rule) in LAYERS), example.name
    refused = nn.Conv1d(2, 2, 2, padding="same")  # pads one side more: no rule
    why = rule_for(refused)[1]
    assert why is not None and _unsupported_reason(refused) == why
    with pytest.raises(ValueError, match="pads asymmetrically"):
        sequential_blocks(nn.Sequential(refused))
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="valid"), nn.Dropout1d(0.3).eval(), nn.Flatten(), nn.Linear(9, 2)
    ).to(DT)
    data = (torch.randn(4, 2, 5, dtype=DT), torch.randint(0, 2, (4,)))
    fast = BlockDiagonalCurvature(model, nn.CrossEntropyLoss(), data, engine="sequential")
    auto = BlockDiagonalCurvature(model, nn.CrossEntropyLoss(), data, engine="autograd")
    assert fast.engine == "sequential"
    torch.testing.assert_close(fast.to_dense(), auto.to_dense(), rtol=1e-10, atol=1e-12)
