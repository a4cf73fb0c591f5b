"""Products through an MLP's output-Jacobian factors equal the usual products (float64).

The reference is the same operator without factors, itself tested against dense autograd
references elsewhere; here every path of the factored products (single and batched J v and
J^T u, blocks, head and top layers, stored factors, missing tangents) is compared with it, and
the fast path is checked to be taken for ``jacobian_factors=True`` only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature.engines.graph import GraphLinearization
from secondorder.curvature.factored import FactoredLinearization

DT = torch.float64


def _mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers).to(DT).eval()


def _models() -> dict[str, tuple[nn.Sequential, tuple[int, ...]]]:
    torch.manual_seed(0)
    tied = nn.Linear(6, 6)
    return {
        "silu-tanh": (
            _mlp(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)),
            (3,),
        ),
        "deep-relu": (
            _mlp(
                nn.Linear(3, 7),
                nn.ReLU(),
                nn.Linear(7, 6),
                nn.Sigmoid(),
                nn.Linear(6, 5),
                nn.GELU(),
                nn.Linear(5, 4),
            ),
            (3,),
        ),
        "final-activation": (
            _mlp(
                nn.Linear(3, 6),
                nn.Tanh(),
                nn.Linear(6, 5),
                nn.LeakyReLU(0.1),
                nn.Linear(5, 4),
                nn.Sigmoid(),
            ),
            (3,),
        ),
        "identities": (
            _mlp(
                nn.Flatten(),
                nn.Linear(12, 6, bias=False),
                nn.Tanh(),
                nn.Dropout(0.3),
                nn.Identity(),
                nn.Linear(6, 5),
                nn.ELU(),
                nn.Linear(5, 4, bias=False),
            ),
            (3, 4),
        ),
        "tied": (
            _mlp(nn.Linear(3, 6), nn.Tanh(), tied, nn.Tanh(), tied, nn.SiLU(), nn.Linear(6, 4)),
            (3,),
        ),
        "two-layers": (_mlp(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)), (3,)),
    }


MODELS = _models()


def _data(shape: tuple[int, ...], n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, dtype=DT, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _pair(name: str, loss: nn.Module | None = None, **kw):
    model, shape = MODELS[name]
    X, y = _data(shape)
    loss = loss if loss is not None else nn.CrossEntropyLoss()
    if isinstance(loss, nn.MSELoss):
        y = torch.randn(X.shape[0], 4, dtype=DT)
    plain = so.GGN(model, loss, (X, y), **kw)
    factored = so.GGN(model, loss, (X, y), jacobian_factors=True, **kw)
    return plain, factored


def _lin(op):
    return op._states[0][0].lin


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_products_equal_the_plain_engine(name, loss):
    plain, factored = _pair(name, loss)
    n = plain.shape[0]
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(n, dtype=DT, generator=gen)
    V = torch.randn(n, 3, dtype=DT, generator=gen)
    expected_v, expected_V = plain @ v, plain @ V
    got_v, got_V = factored @ v, factored @ V
    assert _lin(factored).factors is not None and _lin(factored).factors.B is not None
    torch.testing.assert_close(got_v, expected_v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_V, expected_V, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(factored.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["silu-tanh", "deep-relu", "identities", "tied"])
def test_jvp_and_vjp_with_missing_tangents_and_subsets(name):
    """Every subset of tangents (None blocks) and of requested cotangent blocks, both ways."""
    plain, factored = _pair(name)
    factored @ torch.zeros(factored.shape[0], dtype=DT)  # builds the factors
    a, b = _lin(plain), _lin(factored)
    assert b.factors.B is not None
    leaves = a.leaves
    gen = torch.Generator().manual_seed(3)
    u = torch.randn_like(a.z)
    U = torch.randn(2, *a.z.shape, dtype=DT, generator=gen)
    for i in range(len(leaves)):
        tangents = [None] * len(leaves)
        tangents[i] = torch.randn(leaves[i].shape, dtype=DT, generator=gen)
        torch.testing.assert_close(b.jvp(tangents), a.jvp(tangents), rtol=1e-12, atol=1e-13)
        batched = [None] * len(leaves)
        batched[i] = torch.randn(2, *leaves[i].shape, dtype=DT, generator=gen)
        torch.testing.assert_close(
            b.jvp(batched, batched=True), a.jvp(batched, batched=True), rtol=1e-12, atol=1e-13
        )
        for got, want in zip(b.vjp(u, [i]), a.vjp(u, [i])):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        for got, want in zip(b.vjp(U, [i], batched=True), a.vjp(U, [i], batched=True)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["silu-tanh", "deep-relu"])
def test_blocks_fisher_and_several_batches(name):
    model, shape = MODELS[name]
    X, y = _data(shape, n=12)
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    for make in (
        lambda **kw: so.GGN(model, nn.CrossEntropyLoss(), batches, **kw),
        lambda **kw: so.Fisher(model, nn.CrossEntropyLoss(), batches, kind="exact", **kw),
        lambda **kw: so.Fisher(
            model,
            nn.CrossEntropyLoss(),
            batches,
            kind="mc",
            generator=torch.Generator().manual_seed(4),
            **kw,
        ),
    ):
        plain, factored = make(), make(jacobian_factors=True)
        torch.testing.assert_close(factored.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-13)
        for i in range(len(plain.fmodel.params)):
            torch.testing.assert_close(
                factored.block(i).to_dense(), plain.block(i).to_dense(), rtol=1e-12, atol=1e-13
            )


def test_frozen_layers_and_parameter_subsets():
    model, shape = MODELS["deep-relu"]
    X, y = _data(shape)
    params = [model[2].weight, model[4].bias, model[6].weight]  # a frozen head's bias etc.
    plain = so.GGN(model, nn.CrossEntropyLoss(), (X, y), params=params)
    factored = so.GGN(model, nn.CrossEntropyLoss(), (X, y), params=params, jacobian_factors=True)
    torch.testing.assert_close(factored.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-13)
    # the lowest trainable layer is model[2]: the first Linear may be anything below it
    frozen_top = [model[0].weight, model[2].weight]
    plain = so.GGN(model, nn.CrossEntropyLoss(), (X, y), params=frozen_top)
    factored = so.GGN(
        model, nn.CrossEntropyLoss(), (X, y), params=frozen_top, jacobian_factors=True
    )
    torch.testing.assert_close(factored.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-13)


def test_true_selects_the_fast_path_and_auto_the_reference():
    """The fast path is chosen by ``jacobian_factors=True`` only; the retired "auto" is False."""
    model, shape = MODELS["deep-relu"]
    X, y = _data(shape)
    for option, factored in ((True, True), (False, False), ("auto", False)):
        G = so.GGN(model, nn.CrossEntropyLoss(), (X, y), jacobian_factors=option)
        G @ torch.ones(G.shape[0], dtype=DT)
        assert isinstance(_lin(G), FactoredLinearization) is factored, option
    assert _lin(G).__class__ is GraphLinearization


def test_bad_options_and_unsupported_models_raise():
    model, shape = MODELS["silu-tanh"]
    X, y = _data(shape)
    with pytest.raises(ValueError, match="jacobian_factors must be True or False"):
        so.GGN(model, nn.CrossEntropyLoss(), (X, y), jacobian_factors="yes")
    with pytest.raises(ValueError, match=r"jacobian_factors=True needs an nn\.Sequential MLP"):
        so.GGN(model, nn.CrossEntropyLoss(), (X, y), jacobian_factors=True, engine="autograd")
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    images = torch.randn(5, 1, 4, 4, dtype=DT)
    with pytest.raises(ValueError, match="trainable layers are Linear layers"):
        so.GGN(
            cnn, nn.CrossEntropyLoss(), (images, torch.randint(0, 3, (5,))), jacobian_factors=True
        )
    # "auto" (retired: False) keeps the usual products for such models
    G = so.GGN(
        cnn, nn.CrossEntropyLoss(), (images, torch.randint(0, 3, (5,))), jacobian_factors="auto"
    )
    assert not isinstance(_lin(G), FactoredLinearization)
    with pytest.raises(ValueError, match="not the Hessian"):
        so.NewtonCG(model, nn.CrossEntropyLoss(), curvature="hessian", jacobian_factors=True)
    with pytest.raises(ValueError, match="jacobian_factors must be"):
        so.HessianFree(model, nn.CrossEntropyLoss(), jacobian_factors=1)


@pytest.mark.parametrize("cls", [so.GaussNewton, so.NaturalGradient, so.HessianFree])
def test_optimizer_steps_do_not_depend_on_the_factors(cls):
    model, shape = MODELS["deep-relu"]
    X, y = _data(shape)
    results = []
    for option in (False, True, "auto"):
        m = copy.deepcopy(model)
        # strong damping and a fixed iteration count: the steps are well conditioned, so the
        # comparison sees the products, not rounding amplified by CG's stopping test
        kw = {"damping": 0.5, "cg_maxiter": 8}
        kw |= {"cg_rtol": 0.0} if cls is not so.HessianFree else {"martens_stop": False}
        opt = cls(m, nn.CrossEntropyLoss(), jacobian_factors=option, **kw)
        for _ in range(2):
            opt.step(X, y)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(results[2], results[0], rtol=1e-9, atol=1e-11)
