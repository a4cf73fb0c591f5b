"""LowRankGGN against dense GGNs and per-sample quantities built with torch.func (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cases import DT, LOSSES, BNNet, C, TiedAutoencoder, TwoInputs, _bn_eval, cnn, targets
from factor_models import MixesSamples, ResidualConv, ResidualMLP
from torch import nn
from torch.func import functional_call, hessian, jacrev

import secondorder as so
from reference import dense_ggn
from secondorder.curvature.lowrank import LowRankGGN

sys.path.insert(0, str(Path(__file__).resolve().parent / "engines"))
from graph_models import MLP, ResNet, randomize_batchnorm

N = 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class SpatialCE(nn.Module):
    """Outputs (N, C, L): cross-entropy rows are positions, several per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head = nn.Conv1d(4, C, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)))


def seed_mlp() -> nn.Module:  # seed 004: three Linear layers, no activations
    return nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 5), nn.Linear(5, C))


def relu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(7, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Linear(5, C)
    )


def unflatten_mlp() -> nn.Module:  # a Linear on 3-D inputs: per-sample rows, not Kronecker
    return nn.Sequential(
        nn.Linear(7, 6),
        nn.Unflatten(1, (2, 3)),
        nn.Linear(3, 3),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(6, C),
    )


def conv1d_net() -> nn.Module:  # strided, dilated, padded Conv1d; no bias on the second
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, bias=False),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8, C),
    )


MODELS = {
    "seed_mlp": (seed_mlp, lambda n: (torch.randn(n, 7),), "sequential"),
    "relu_mlp": (relu_mlp, lambda n: (torch.randn(n, 7),), "sequential"),
    "unflatten_mlp": (unflatten_mlp, lambda n: (torch.randn(n, 7),), "sequential"),
    "cnn": (cnn, lambda n: (torch.randn(n, 1, 12, 12),), "sequential"),
    "conv1d": (conv1d_net, lambda n: (torch.randn(n, 2, 9),), "sequential"),
    "bn_module": (lambda: _bn_eval(BNNet()), lambda n: (torch.randn(n, 4),), "sequential"),
    "tied_module": (TiedAutoencoder, lambda n: (torch.randn(n, 4),), "autograd"),
    "mixing_mlp": (MixesSamples, lambda n: (torch.randn(n, 4),), "autograd"),
    "custom_mlp": (lambda: MLP((7, 6, 5, C)), lambda n: (torch.randn(n, 7),), "sequential"),
    "residual_mlp": (ResidualMLP, lambda n: (torch.randn(n, 4),), "sequential"),
    "residual_conv": (ResidualConv, lambda n: (torch.randn(n, 1, 6, 6),), "sequential"),
    "resnet_bn": (
        lambda: randomize_batchnorm(ResNet((2, 3), C)),
        lambda n: (torch.randn(n, 1, 6, 6),),
        "sequential",
    ),
    "two_inputs": (TwoInputs, lambda n: (torch.randn(n, 3), torch.randn(n, 2)), "sequential"),
}


def make(name: str, loss_name: str, red: str, n: int = N, seed: int = 0):
    build, inputs, engine = MODELS[name]
    torch.manual_seed(seed)
    model = build().to(DT)
    x = tuple(t.to(DT) for t in inputs(n))
    return model, LOSSES[loss_name](red), x, targets(loss_name, n, seed + 1), engine


# ----------------------------------------------------------------- dense references
def flat_model(model, inputs):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    values = [p.detach() for _, p in model.named_parameters() if p.requires_grad]
    sizes, shapes = [v.numel() for v in values], [v.shape for v in values]

    def f(theta):
        parts = [t.view(s) for t, s in zip(theta.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), inputs)

    return f, torch.cat([v.reshape(-1) for v in values])


def per_sample_reference(model, loss_fn, inputs, y):
    """Per-sample g_n = N grad L_n and G_n (N e^T G_n e = lambda_nk), L = sum_n L_n."""
    f, theta = flat_model(model, inputs)
    unreduced = type(loss_fn)(reduction="none")
    n = y.shape[0]
    probe = unreduced(f(theta), y)
    scale = 1.0 / probe.numel() if loss_fn.reduction == "mean" else 1.0

    def per_sample_losses(z):
        return unreduced(z, y).reshape(n, -1).sum(1) * scale

    def losses_of_theta(th):
        return per_sample_losses(f(th))

    grads = jacrev(losses_of_theta)(theta) * n  # (N, P)
    z = f(theta)
    J = jacrev(f)(theta).reshape(n, -1, theta.numel())  # (N, O, P)
    G_n = []
    for i in range(n):

        def loss_i(zi, i=i):
            full = z.detach().clone().reshape(n, -1)
            full = torch.cat([full[:i], zi.reshape(1, -1), full[i + 1 :]])
            return per_sample_losses(full.reshape(z.shape))[i]

        H = hessian(loss_i)(z.detach().reshape(n, -1)[i])
        G_n.append(J[i].T @ H @ J[i])
    return grads, torch.stack(G_n)


def nonzero_eigenvalues(evals: torch.Tensor, rel: float = 1e-9) -> torch.Tensor:
    return evals[evals > rel * evals.abs().max()]


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", list(MODELS))
def test_gram_spectrum_and_dense(name, loss_name, red):
    model, loss_fn, x, y, engine = make(name, loss_name, red)
    lr = LowRankGGN(model, loss_fn, (x, y))
    assert lr.engine == engine
    dense = dense_ggn(model, loss_fn, x, y)
    assert rel_err(lr.to_dense(), dense) <= 1e-10
    assert rel_err(lr.gradient(), so.GGN(model, loss_fn, (x, y)).gradient()) <= 1e-10
    columns = N * (C - 1 if loss_name == "ce" else C)
    assert lr.num_columns == columns and lr.gram().shape == (columns, columns)
    ours = nonzero_eigenvalues(lr.eigvalsh())
    expected = nonzero_eigenvalues(torch.linalg.eigvalsh(dense))
    assert ours.shape == expected.shape
    assert rel_err(ours, expected) <= 1e-9


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", ["seed_mlp", "relu_mlp", "cnn", "conv1d", "two_inputs"])
def test_directions_and_directional_derivatives(name, loss_name, red):
    model, loss_fn, x, y, _ = make(name, loss_name, red)
    lr = LowRankGGN(model, loss_fn, (x, y))
    dense = dense_ggn(model, loss_fn, x, y)
    evals_dense, evecs_dense = torch.linalg.eigh(dense)
    evals = lr.eigvalsh()
    K = 4
    idx = list(range(lr.num_columns - K, lr.num_columns))
    E = lr.eigenvectors(idx)
    lam = evals[idx]
    # eigenpairs of the dense GGN, orthonormal, and equal to eigh's up to sign
    assert rel_err(dense @ E, E * lam) <= 1e-9
    assert rel_err(E.T @ E, torch.eye(K, dtype=DT)) <= 1e-9
    assert rel_err(lam, evals_dense[-K:]) <= 1e-9
    overlap = (E.T @ evecs_dense[:, -K:]).abs()
    assert rel_err(overlap.diagonal(), torch.ones(K, dtype=DT)) <= 1e-6
    # per-sample derivatives from dense per-sample gradients and GGNs
    grads, G_n = per_sample_reference(model, loss_fn, x, y)
    assert rel_err(G_n.sum(0), dense) <= 1e-10  # the decomposition is exact
    gammas, lambdas = lr.directional_derivatives(idx)
    assert rel_err(gammas, grads @ E) <= 1e-9
    expected = N * torch.einsum("pk,npq,qk->nk", E, G_n, E)
    assert rel_err(lambdas, expected) <= 1e-9
    # batch means: the gradient's projection and the eigenvalue
    gradient = lr.gradient()
    assert rel_err(gammas.mean(0), gradient @ E) <= 1e-9
    assert rel_err(lambdas.mean(0), lam) <= 1e-9


def test_mean_and_sum_reduction_differ_by_the_scale():
    model, ce_mean, x, y, _ = make("relu_mlp", "ce", "mean")
    mean = LowRankGGN(model, ce_mean, (x, y))
    total = LowRankGGN(model, nn.CrossEntropyLoss(reduction="sum"), (x, y))
    assert rel_err(total.eigvalsh(), N * mean.eigvalsh()) <= 1e-10
    idx = [mean.num_columns - 1]
    sign = torch.sign((mean.eigenvectors(idx) * total.eigenvectors(idx)).sum())
    g_mean, l_mean = mean.directional_derivatives(idx)
    g_sum, l_sum = total.directional_derivatives(idx)
    assert rel_err(g_sum, N * sign * g_mean) <= 1e-9  # g_n = N * grad(l_n) for "sum"
    assert rel_err(l_sum, N * l_mean) <= 1e-9
    # MSE "mean" divides by N*C: N L_n is the per-sample mean squared error
    model, mse_mean, x, y, _ = make("relu_mlp", "mse", "mean")
    mse_sum = LowRankGGN(model, nn.MSELoss(reduction="sum"), (x, y))
    assert (
        rel_err(mse_sum.eigvalsh(), N * C * LowRankGGN(model, mse_mean, (x, y)).eigvalsh()) <= 1e-10
    )


def test_spatial_cross_entropy_rows_per_sample():
    torch.manual_seed(0)
    model = SpatialCE().to(DT)
    x = torch.randn(N, 2, 5, dtype=DT)
    y = torch.randint(0, C, (N, 5))
    for red in ("mean", "sum"):
        loss_fn = nn.CrossEntropyLoss(reduction=red)
        lr = LowRankGGN(model, loss_fn, (x, y))
        assert lr.num_columns == N * 5 * (C - 1)
        assert (lr.column_sample == torch.arange(N).repeat_interleave(5 * (C - 1))).all()
        dense = dense_ggn(model, loss_fn, (x,), y)
        assert rel_err(lr.to_dense(), dense) <= 1e-10
        idx = [lr.num_columns - 2, lr.num_columns - 1]
        E = lr.eigenvectors(idx)
        grads, G_n = per_sample_reference(model, loss_fn, (x,), y)
        gammas, lambdas = lr.directional_derivatives(idx)
        assert rel_err(gammas, grads @ E) <= 1e-9
        assert rel_err(lambdas, N * torch.einsum("pk,npq,qk->nk", E, G_n, E)) <= 1e-9


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_kron_and_autograd_engines_agree(loss_name):
    model, loss_fn, x, y, _ = make("relu_mlp", loss_name, "mean")
    model[0].bias.requires_grad_(False)  # frozen parameter
    params = [p for p in model.parameters() if p.requires_grad][1:]  # and a subset
    kron = LowRankGGN(model, loss_fn, (x, y), params=params, engine="kron")
    auto = LowRankGGN(model, loss_fn, (x, y), params=params, engine="autograd")
    assert kron.engine == "sequential" and auto.engine == "autograd"
    assert rel_err(kron.gram(), auto.gram()) <= 1e-12
    assert rel_err(kron.factor(), auto.factor()) <= 1e-12
    assert rel_err(kron.gradient(), auto.gradient()) <= 1e-12
    idx = [kron.num_columns - 1, 0, kron.num_columns - 3]  # any order
    assert (
        rel_err(kron.directional_derivatives(idx)[1], auto.directional_derivatives(idx)[1]) <= 1e-9
    )


def test_reused_module_instance():
    torch.manual_seed(0)
    act = nn.Tanh()  # one instance applied twice
    model = nn.Sequential(nn.Linear(7, 5), act, nn.Linear(5, 5), act, nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 7, dtype=DT), torch.randn(N, C, dtype=DT)
    for engine in ("auto", "autograd"):
        lr = LowRankGGN(model, nn.MSELoss(), ((x,), y), engine=engine)
        assert rel_err(lr.to_dense(), dense_ggn(model, nn.MSELoss(), (x,), y)) <= 1e-10


def test_blocks_of_parameter_groups():
    model, loss_fn, x, y, _ = make("relu_mlp", "ce", "mean")
    params = list(model.parameters())
    dense = dense_ggn(model, loss_fn, x, y)
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    lr = LowRankGGN(model, loss_fn, (x, y))
    block = [params[3], params[0], params[5]]  # unordered, and a layer's weight without its bias
    flat = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in (3, 0, 5)])
    expected = dense[flat][:, flat]
    assert rel_err(lr.to_dense(block), expected) <= 1e-10
    ours = nonzero_eigenvalues(lr.eigvalsh(block))
    assert rel_err(ours, nonzero_eigenvalues(torch.linalg.eigvalsh(expected))) <= 1e-9
    idx = [lr.num_columns - 1]
    E = lr.eigenvectors(idx, block)
    assert rel_err(expected @ E, E * lr.eigvalsh(block)[idx]) <= 1e-9
    assert rel_err(lr.gradient(block), lr.gradient()[flat]) <= 1e-12
    gammas, _ = lr.directional_derivatives(idx, block)
    assert rel_err(gammas.mean(0), lr.gradient(block) @ E) <= 1e-9


def test_several_batches_equal_the_concatenated_batch():
    model, loss_fn, x, y, _ = make("relu_mlp", "ce", "mean", n=6)
    (X,) = x
    split = [((X[:2],), y[:2]), ((X[2:],), y[2:])]
    for engine in ("kron", "autograd"):
        parts = LowRankGGN(model, loss_fn, split, engine=engine)
        whole = LowRankGGN(model, loss_fn, (x, y), engine=engine)
        assert parts.num_samples == 6
        assert rel_err(parts.gram(), whole.gram()) <= 1e-12
        assert rel_err(parts.gradient(), whole.gradient()) <= 1e-12
        idx = [whole.num_columns - 1]
        assert (
            rel_err(parts.directional_derivatives(idx)[1], whole.directional_derivatives(idx)[1])
            <= 1e-9
        )
        assert torch.allclose(parts.loss, loss_fn(model(X), y))


def test_monte_carlo_factors_are_unbiased():
    for loss_name in LOSSES:
        model, loss_fn, x, y, _ = make("relu_mlp", loss_name, "mean", n=3)
        exact = LowRankGGN(model, loss_fn, (x, y)).to_dense()
        draws = torch.stack(
            [
                LowRankGGN(
                    model, loss_fn, (x, y), mc_samples=2, generator=torch.Generator().manual_seed(s)
                ).to_dense()
                for s in range(300)
            ]
        )
        mc = LowRankGGN(model, loss_fn, (x, y), mc_samples=2)
        assert mc.num_columns == 3 * 2 and mc.gram().shape == (6, 6)
        mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
        z = ((mean - exact).abs() / se.clamp_min(1e-12))[se > 1e-12 * exact.abs().max()]
        assert z.max() < 5.0, (loss_name, z.max())
        assert rel_err(mean, exact) < 0.15


def test_monte_carlo_is_reproducible_and_consistent():
    model, loss_fn, x, y, _ = make("relu_mlp", "ce", "mean")
    a = LowRankGGN(model, loss_fn, (x, y), mc_samples=3, generator=torch.Generator().manual_seed(4))
    b = LowRankGGN(
        model,
        loss_fn,
        (x, y),
        mc_samples=3,
        generator=torch.Generator().manual_seed(4),
        engine="autograd",
    )
    assert rel_err(a.gram(), b.gram()) <= 1e-12
    idx = [a.num_columns - 1]
    E = a.eigenvectors(idx)
    gammas, lambdas = a.directional_derivatives(idx)
    assert rel_err(a.to_dense() @ E, E * a.eigvalsh()[idx]) <= 1e-9
    assert rel_err(gammas.mean(0), a.gradient() @ E) <= 1e-9
    assert rel_err(lambdas.mean(0), a.eigvalsh()[idx]) <= 1e-9


def test_lapack_and_torch_eigensolvers_agree():
    model, loss_fn, x, y, _ = make("relu_mlp", "mse", "mean", n=6)
    fast = LowRankGGN(model, loss_fn, (x, y), eigensolver="lapack")
    assert "tridiagonal" in fast._spectrum(None)
    slow = LowRankGGN(model, loss_fn, (x, y))  # torch.linalg.eigh
    assert rel_err(fast.eigvalsh(), slow.eigvalsh()) <= 1e-12
    idx = [17, 3, 4, 5, 11, 12]  # several runs, unordered
    U, W = fast.gram_eigenvectors(idx), slow.gram_eigenvectors(idx)
    assert rel_err((U.T @ W).abs().diagonal(), torch.ones(len(idx), dtype=DT)) <= 1e-9
    assert rel_err(fast.gram() @ U, U * fast.eigvalsh()[idx]) <= 1e-10
    evals, evecs = fast.eigh()
    assert rel_err(evecs.T @ evecs, torch.eye(fast.num_columns, dtype=DT)) <= 1e-12
    assert rel_err(fast.gram() @ evecs, evecs * evals) <= 1e-10


def test_float32_close_to_float64():
    model, loss_fn, x, y, _ = make("relu_mlp", "ce", "mean", n=16)
    lr64 = LowRankGGN(model, loss_fn, (x, y))
    model32 = model.float()
    lr32 = LowRankGGN(model32, loss_fn, ((x[0].float(),), y))
    idx = list(range(lr64.num_columns - 5, lr64.num_columns))
    assert rel_err(lr32.eigvalsh()[idx].double(), lr64.eigvalsh()[idx]) <= 1e-5
    _, l32 = lr32.directional_derivatives(idx)
    assert rel_err(l32.double(), lr64.directional_derivatives(idx)[1]) <= 1e-4


def test_errors():
    model, loss_fn, x, y, _ = make("relu_mlp", "mse", "mean")
    with pytest.raises(ValueError, match="likelihood"):
        LowRankGGN(model, lambda z, t: ((z - t) ** 4).mean(), (x, y))
    with pytest.raises(ValueError, match="likelihood"):
        LowRankGGN(model, nn.CrossEntropyLoss(weight=torch.ones(C, dtype=DT)), (x, y))
    with pytest.raises(ValueError, match="mc_samples"):
        LowRankGGN(model, loss_fn, (x, y), mc_samples=-1)
    with pytest.raises(ValueError, match="engine"):
        LowRankGGN(model, loss_fn, (x, y), engine="fast")
    cnn_model, _, cx, cy, _ = make("cnn", "mse", "mean")
    cnn_model[0] = nn.Conv2d(1, 2, 3, groups=1, padding_mode="circular").to(DT)
    with pytest.raises(ValueError, match="kron"):
        LowRankGGN(cnn_model, loss_fn, (cx, cy), engine="kron")
    # a step that mixes the samples (a mean over the batch after a layer) refuses, naming it
    mix, _, mx, my, _ = make("mixing_mlp", "mse", "mean")
    with pytest.raises(ValueError, match=r"kron.*node mean"):
        LowRankGGN(mix, loss_fn, (mx, my), engine="kron")
    lr = LowRankGGN(model, loss_fn, (x, y))
    D = lr.num_columns
    with pytest.raises(IndexError, match=rf"\[0, {D}\)"):
        lr.eigenvectors([D])
    with pytest.raises(ValueError, match="not one of"):
        lr.gram([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="distinct"):
        lr.gram([model[0].weight, model[0].weight])
    with pytest.raises(ValueError, match=rf"expected shape \({D},\)"):
        lr.factor_matmul(torch.zeros(D + 1, dtype=DT))
    # more columns than parameters: zero eigenvalues have no GGN eigenvector
    tiny = nn.Linear(2, C, bias=False).to(DT)
    lr = LowRankGGN(tiny, loss_fn, ((torch.randn(N, 2, dtype=DT),), y))
    assert lr.num_columns == N * C and (lr.eigvalsh() > lr.tolerance()).sum() == 2 * C
    with pytest.raises(ValueError, match="numerically zero"):
        lr.directional_derivatives([0])
    bad = x[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        LowRankGGN(model, loss_fn, ((bad,), y)).eigvalsh()


def test_leading_eigenpairs_by_krylov_equal_the_full_decomposition():
    model, loss_fn, x, y, _ = make("relu_mlp", "mse", "mean", n=64)  # D = 192
    fast = LowRankGGN(model, loss_fn, (x, y))
    full = LowRankGGN(model, loss_fn, (x, y), eigensolver="torch")
    D = fast.num_columns
    evals, U = fast.leading_eigh(4)
    assert fast.eigensolver_used() == "krylov" and "evals" not in fast._entry(None)
    expected, W = full.eigh()
    assert full.eigensolver_used() == "eigh"
    assert rel_err(evals, expected[-4:]) <= 1e-12
    assert rel_err((U.T @ W[:, -4:]).abs().diagonal(), torch.ones(4, dtype=DT)) <= 1e-10
    assert rel_err(fast.gram() @ U, U * evals) <= 1e-12
    assert fast.tolerance() == pytest.approx(full.tolerance(), rel=1e-12)
    # position-based methods among the leading pairs reuse them, with the same signs
    idx = [D - 1, D - 3]
    assert torch.equal(fast.gram_eigenvectors(idx), U[:, [3, 1]])
    gammas, lambdas = fast.directional_derivatives(idx)
    g_full, l_full = full.directional_derivatives(idx)
    sign = torch.sign((U[:, [3, 1]] * full.gram_eigenvectors(idx)).sum(0))
    assert rel_err(gammas, g_full * sign) <= 1e-10 and rel_err(lambdas, l_full) <= 1e-10
    dense = dense_ggn(model, loss_fn, x, y)
    E = fast.eigenvectors(idx)
    assert rel_err(dense @ E, E * evals[[3, 1]]) <= 1e-10
    # the full spectrum is computed on request and serves from then on
    assert rel_err(fast.eigvalsh(), expected) <= 1e-12
    assert fast.eigensolver_used() == "eigh"
    assert rel_err(fast.leading_eigh(4)[0], evals) <= 1e-12
    # a request beyond the leading pairs, or many of them, decomposes fully
    other = LowRankGGN(model, loss_fn, (x, y))
    U_other = other.gram_eigenvectors([0, D - 1])
    assert other.eigensolver_used() == "eigh" and torch.equal(U_other, full.eigh()[1][:, [0, -1]])
    wide = LowRankGGN(model, loss_fn, (x, y))
    assert wide.leading_eigh(D // 2)[0].shape == (D // 2,) and wide.eigensolver_used() == "eigh"
    assert wide.leading_eigh(10 * D)[0].shape == (D,)
    with pytest.raises(ValueError, match="positive int"):
        wide.leading_eigh(0)


def test_eigensolver_choices():
    model, loss_fn, x, y, _ = make("relu_mlp", "mse", "mean", n=64)
    lapack = LowRankGGN(model, loss_fn, (x, y), eigensolver="lapack")
    torch_ = LowRankGGN(model, loss_fn, (x, y), eigensolver="torch")
    for lr in (lapack, torch_):
        evals, U = lr.leading_eigh(3)
        assert lr.eigensolver_used() in ("lapack", "eigh")
        assert rel_err(lr.gram() @ U, U * evals) <= 1e-10
    with pytest.raises(ValueError, match="eigensolver"):
        LowRankGGN(model, loss_fn, (x, y), eigensolver="arpack")


# ------------------------------------------------------------- convolutions (kron)
def conv_blocks(model: nn.Module) -> list[list[torch.Tensor]]:
    """Parameter groups: a conv weight alone, a bias alone, and a conv/Linear mixture."""
    convs = [m for m in model if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [
        [convs[1].weight],
        [convs[0].bias],
        [linears[-1].bias, convs[0].weight, convs[1].weight],
    ]


@pytest.mark.parametrize("mc", [0, 2])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", ["cnn", "conv1d"])
def test_conv_kron_equals_autograd_and_dense(name, loss_name, mc):
    model, loss_fn, x, y, _ = make(name, loss_name, "mean")
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kron = LowRankGGN(model, loss_fn, (x, y), mc_samples=mc, generator=gen(), engine="kron")
    auto = LowRankGGN(model, loss_fn, (x, y), mc_samples=mc, generator=gen(), engine="autograd")
    assert kron.engine == "sequential" and auto.engine == "autograd"
    assert torch.equal(kron.column_sample, auto.column_sample)
    params = list(model.parameters())
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    dense = auto.to_dense()
    if mc == 0:
        assert rel_err(dense, dense_ggn(model, loss_fn, x, y)) <= 1e-10
    for block in [None, *conv_blocks(model)]:
        assert rel_err(kron.gram(block), auto.gram(block)) <= 1e-12
        assert rel_err(kron.factor(block), auto.factor(block)) <= 1e-12
        assert rel_err(kron.gradient(block), auto.gradient(block)) <= 1e-12
        where = [next(i for i, q in enumerate(params) if q is p) for p in block or params]
        flat = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in where])
        expected = dense[flat][:, flat]
        ours = nonzero_eigenvalues(kron.eigvalsh(block))
        assert rel_err(ours, nonzero_eigenvalues(torch.linalg.eigvalsh(expected))) <= 1e-9
        idx = [kron.num_columns - 1, kron.num_columns - 2]
        E, E_auto = kron.eigenvectors(idx, block), auto.eigenvectors(idx, block)
        sign = torch.sign((E * E_auto).sum(0))
        assert rel_err(expected @ E, E * kron.eigvalsh(block)[idx]) <= 1e-9
        assert rel_err(E, E_auto * sign) <= 1e-8
        gammas, lambdas = kron.directional_derivatives(idx, block)
        g_auto, l_auto = auto.directional_derivatives(idx, block)
        assert rel_err(gammas, g_auto * sign) <= 1e-8 and rel_err(lambdas, l_auto) <= 1e-9


def test_conv_several_batches_equal_the_concatenated_batch():
    model, loss_fn, x, y, _ = make("cnn", "ce", "sum", n=6)
    (X,) = x
    split = [((X[:2],), y[:2]), ((X[2:],), y[2:])]
    parts = LowRankGGN(model, loss_fn, split, engine="kron")
    whole = LowRankGGN(model, loss_fn, (x, y), engine="autograd")
    assert parts.engine == "sequential" and parts.num_samples == 6
    assert rel_err(parts.gram(), whole.gram()) <= 1e-12
    assert rel_err(parts.gradient(), whole.gradient()) <= 1e-12
    assert rel_err(parts.factor(), whole.factor()) <= 1e-12
    idx = [whole.num_columns - 1]
    assert (
        rel_err(parts.directional_derivatives(idx)[1], whole.directional_derivatives(idx)[1])
        <= 1e-9
    )


def test_conv_patches_in_chunks_of_samples(monkeypatch):
    import secondorder.curvature.layers.conv as conv_rule

    model, loss_fn, x, y, _ = make("cnn", "mse", "mean", n=5)
    whole = LowRankGGN(model, loss_fn, (x, y), engine="kron")
    monkeypatch.setattr(conv_rule, "PATCH_ELEMENTS", 1)  # one sample per chunk
    chunked = LowRankGGN(model, loss_fn, (x, y), engine="kron")
    assert rel_err(chunked.gram(), whole.gram()) <= 1e-12
    assert rel_err(chunked.gradient(), whole.gradient()) <= 1e-12


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 4, 3, groups=2),
        lambda: nn.Conv2d(2, 3, 2, padding="same"),  # pads one side more: no rule
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv3d(2, 3, 1),
    ],
)
def test_unsupported_convolutions_fall_back(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), conv(), nn.Flatten(), nn.LazyLinear(C))
    x = torch.randn(N, 1, 6, 6)
    if isinstance(model[2], nn.Conv3d):
        model[2] = nn.Sequential(nn.Unflatten(1, (2, 1)), model[2], nn.Flatten(1, 2))
    model(x)
    model = model.to(DT)
    x, y = x.to(DT), torch.randn(N, C, dtype=DT)
    lr = LowRankGGN(model, nn.MSELoss(), (x, y))
    assert lr.engine == "autograd"
    assert rel_err(lr.to_dense(), dense_ggn(model, nn.MSELoss(), (x,), y)) <= 1e-10
    with pytest.raises(ValueError, match="kron"):
        LowRankGGN(model, nn.MSELoss(), (x, y), engine="kron")
    # frozen, a grouped convolution or Conv3d leaves the rest to the kron engine (an asymmetric
    # 'same' padding or another padding mode has no layer rule: its node goes to autograd)
    for p in model[2].parameters():
        p.requires_grad_(False)
    kron = LowRankGGN(model, nn.MSELoss(), (x, y))
    auto = LowRankGGN(model, nn.MSELoss(), (x, y), engine="autograd")
    conv = model[2][1] if isinstance(model[2], nn.Sequential) else model[2]
    assert kron.engine == (
        "sequential" if conv.padding_mode == "zeros" and conv.padding != "same" else "autograd"
    )
    assert rel_err(kron.gram(), auto.gram()) <= 1e-12


def test_conv_same_and_valid_padding_take_the_fast_engine():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same"),
        nn.Tanh(),
        nn.Conv2d(2, 3, (3, 1), dilation=(1, 2), padding="valid"),
        nn.Flatten(),
        nn.Linear(3 * 4 * 6, C),
    ).to(DT)
    x, y = torch.randn(N, 1, 6, 6, dtype=DT), torch.randn(N, C, dtype=DT)
    lr = LowRankGGN(model, nn.MSELoss(), (x, y))
    auto = LowRankGGN(model, nn.MSELoss(), (x, y), engine="autograd")
    assert lr.engine == "sequential"
    assert rel_err(lr.to_dense(), dense_ggn(model, nn.MSELoss(), (x,), y)) <= 1e-10
    assert rel_err(lr.gram(), auto.gram()) <= 1e-12
    assert rel_err(lr.gradient(), auto.gradient()) <= 1e-12


class FunctionalDropout(nn.Module):  # random, and no module tells: found on the traced graph
    def __init__(self, mix: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)
        self.mix = mix

    def forward(self, x):
        h = nn.functional.dropout(torch.tanh(self.a(x)), 0.4, training=True)
        if self.mix:  # mixes the samples: the fast engine refuses after its forward pass
            h = h - h.mean(0, keepdim=True)
        return self.b(h)


def test_refused_fast_engine_leaves_the_random_state_to_the_fallback():
    torch.manual_seed(0)
    model = FunctionalDropout().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randn(N, C, dtype=DT)
    torch.manual_seed(7)
    auto = LowRankGGN(model, nn.MSELoss(), (x, y))
    torch.manual_seed(7)
    ref = LowRankGGN(model, nn.MSELoss(), (x, y), engine="autograd")
    assert auto.engine == "autograd"
    assert rel_err(auto.to_dense(), ref.to_dense()) <= 1e-12
    # without the mixing, F.dropout has a rule (one fixed mask): the fast engine serves it
    model = FunctionalDropout(mix=False).to(DT)
    torch.manual_seed(7)
    fast = LowRankGGN(model, nn.MSELoss(), (x, y))
    torch.manual_seed(7)
    ref = LowRankGGN(model, nn.MSELoss(), (x, y), engine="autograd")
    assert fast.engine != "autograd"
    assert rel_err(fast.to_dense(), ref.to_dense()) <= 1e-12
