"""engine="graph": the traced model node by node equals autograd and the dense references.

Two parts: the conformance matrix's models (every layer and situation of
``tests/conformance/models.py``, each loss and data split on the small models) with the graph
engine's GGN and Fisher kinds, checked by the matrix's own checks; and custom modules that
exercise the graph: a residual CNN with BatchNorm, an MLP written as a module, a module called
twice, a node without a rule, a model fx cannot trace, and in-place aliasing that a trace would
get wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the conformance package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_models import MLP, ResNet, randomize_batchnorm

import secondorder as so
from conformance import reference as ref
from conformance import test_matrix as tm
from conformance.losses import DEFAULT_LOSS, LOSSES
from conformance.models import MODELS, SMALL_MODEL
from conformance.operators import MC_SAMPLES, OPERATORS, OpSpec, _fisher, _ggn

DT = torch.float64

GRAPH_OPS = {
    "ggn.graph": OpSpec(_ggn("graph"), "ggn"),
    "fisher_exact.graph": OpSpec(_fisher("exact", "graph"), "ggn", likelihood=True),
    "fisher_empirical.graph": OpSpec(_fisher("empirical", "graph"), "ef", likelihood=True),
    "fisher_mc.graph": OpSpec(
        _fisher("mc", "graph", num_samples=MC_SAMPLES, generator=torch.Generator().manual_seed(1)),
        "ggn",
        checks=("mc",),
        likelihood=True,
        splits=("one",),
    ),
}


def _cases() -> list[tm.Case]:
    cases: dict[str, tm.Case] = {}
    with mock.patch.dict(OPERATORS, GRAPH_OPS):
        for name, model in MODELS.items():  # every layer and situation
            split = "unequal" if model.per_sample else "one"
            for op in GRAPH_OPS:
                case = tm.Case(op, name, DEFAULT_LOSS[model.out], split)
                cases.setdefault(case.id, case)
        for loss_name, loss in LOSSES.items():  # every loss and data split
            for split in tm.SPLITS:
                for op in GRAPH_OPS:
                    case = tm.Case(op, SMALL_MODEL[loss.out], loss_name, split)
                    cases.setdefault(case.id, case)
        return [c for c in cases.values() if tm._applies(c)]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_conformance_models(case: tm.Case) -> None:
    with mock.patch.dict(OPERATORS, GRAPH_OPS):
        tol = tm.MC_RTOL if OPERATORS[case.op].checks == ("mc",) else tm.RTOL
        bad = {check: err for check, err in tm.errors(case).items() if not err <= tol}
        assert not bad, f"{case.id}: relative errors {bad} > {tol:.0e}"
        op = tm.build(case)
    if op._states is not None:  # cached batches: every conformance model is traced
        lin = op._states[0][0].lin
        assert lin.path == "graph", lin.fallback_reason


# ------------------------------------------------------------------ custom modules
def _check(model: nn.Module, X: Tensor, y: Tensor, expect_path: str = "graph") -> list[str]:
    """GGN, Fisher kinds, gradient and loss of engine='graph' against references."""
    loss_fn = nn.CrossEntropyLoss()
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    G = so.GGN(model, loss_fn, data, engine="graph")
    lin = G._states[0][0].lin
    assert lin.path == expect_path, getattr(lin, "fallback_reason", None)
    R = ref.dense_ggn(model, loss_fn, (X,), y)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(R.shape[0], generator=gen, dtype=DT)
    V = torch.randn(R.shape[0], 3, generator=gen, dtype=DT)
    assert tm.relative_error(G @ v, R @ v) < 1e-10
    assert tm.relative_error(G @ V, R @ V) < 1e-10
    assert tm.relative_error(G.to_dense(), R) < 1e-10
    assert tm.relative_error(G.gradient(), ref.gradient(model, loss_fn, (X,), y)) < 1e-10
    assert tm.relative_error(G.loss, ref.loss_value(model, loss_fn, (X,), y)) < 1e-12
    Fe = so.Fisher(model, loss_fn, data, kind="empirical", engine="graph")
    EF = ref.dense_empirical_fisher(model, loss_fn, (X,), y)
    assert tm.relative_error(Fe.to_dense(), EF) < 1e-10
    Fx = so.Fisher(model, loss_fn, data, kind="exact", engine="graph")
    assert tm.relative_error(Fx @ V, R @ V) < 1e-10
    A = so.GGN(model, loss_fn, data, engine="autograd")
    assert tm.relative_error(G @ V, A @ V) < 1e-12
    return list(getattr(lin, "autograd_nodes", []))


def _data(*shape: int, n: int = 7, classes: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(
        0, classes, (n,), generator=g
    )


def test_residual_cnn_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet((2, 3)).to(DT))
    assert _check(model, *_data(1, 6, 6)) == []  # every node has a rule


def test_mlp_as_custom_module() -> None:
    torch.manual_seed(0)
    assert _check(MLP((5, 6, 4, 10)).to(DT), *_data(5)) == []


class Twice(nn.Module):
    """One Linear applied twice, its weight also read directly, and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        h2 = self.lin(h) * 0.5 - h
        h3 = (h2 @ self.lin.weight.T).view(x.shape[0], -1)
        return self.head(torch.cat([h2, h3], dim=1).flatten(1))


def test_module_called_twice() -> None:
    torch.manual_seed(0)
    nodes = _check(Twice().to(DT), *_data(4))
    assert nodes == []  # the matrix product of two active values has its op rule (bilinear.py)


class LinearOps(nn.Module):
    """Functions linear in one active input between layers, some with computed arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 10)
        self.c = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))  # (N, 6)
        n = h.size(0)
        p = h.view(n, 2, 3).permute(0, 2, 1).transpose(1, 2)  # (N, 2, 3)
        q = torch.narrow(p, 2, 0, p.size(2) - 1).mean(dim=1)  # (N, 2)
        r = h[:, 1:4].sum(1, keepdim=True).expand(n, 3)  # (N, 3)
        s = torch.cat([q, r], 1) - torch.nn.functional.avg_pool1d(h.unsqueeze(1), 2, 1).squeeze(1)
        t = s + (h @ self.c.weight.T)[:, :5].contiguous() / 3.0
        return self.b(torch.sigmoid(t) * 2.0 + t)


def test_linear_functions_between_layers() -> None:
    torch.manual_seed(0)
    assert _check(LinearOps().to(DT), *_data(4)) == []


class Unsupported(nn.Module):
    """A torch function without a rule between layers: differentiated by autograd alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.cumsum(torch.sin(self.a(x)), dim=1))


def test_node_without_rule_falls_back_alone() -> None:
    torch.manual_seed(0)
    assert _check(Unsupported().to(DT), *_data(4)) == ["sin", "cumsum"]


class DataDependent(nn.Module):
    """Control flow on a tensor value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return torch.tanh(h) if h.sum() > 0 else h


def test_untraceable_model_takes_the_whole_model_autograd_path() -> None:
    torch.manual_seed(0)
    model = DataDependent().to(DT)
    _check(model, *_data(4), expect_path="autograd")
    G = so.GGN(model, nn.CrossEntropyLoss(), _data(4), engine="graph")
    assert "torch.fx cannot trace" in G._states[0][0].lin.fallback_reason


class Aliased(nn.Module):
    """``h += ...`` on a tensor another name still reads: eager and a trace differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        identity = h
        h += torch.tanh(h)  # in place: identity changes too
        return self.b(h + identity)


class InPlaceView(nn.Module):
    """An in-place activation on a view of a value read again later."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        v = self.act(h.view(-1, 6))
        return self.b(v + h)


class NoGrad(nn.Module):
    """A branch computed under ``torch.no_grad()``: a trace would differentiate it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        with torch.no_grad():
            scale = torch.sigmoid(h)
        return self.b(h * scale)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(Aliased, "does not reproduce"), (InPlaceView, "in-place"), (NoGrad, "gradients disabled")],
)
def test_trace_mismatches_are_never_silently_wrong(cls: type[nn.Module], reason: str) -> None:
    """In-place aliasing, in-place views, no_grad blocks: whole-model autograd, exact.

    ``tests/reference.py`` evaluates in-place activations out of place, which changes these
    models; the reference here differentiates the eager model itself: :math:`J^\top H J` with
    ``J = jacrev(f)`` and ``H = jacrev(grad(loss))``.
    """
    torch.manual_seed(0)
    model = cls().to(DT)
    X, y = _data(4)
    loss_fn = nn.CrossEntropyLoss()
    G = so.GGN(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], engine="graph")
    lin = G._states[0][0].lin
    assert lin.path == "autograd" and reason in lin.fallback_reason
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    z = torch.func.functional_call(model, params, (X,))
    J = torch.cat([jac[n].reshape(z.numel(), -1) for n in params], 1)
    H = torch.func.jacrev(torch.func.grad(lambda zz: loss_fn(zz, y)))(z).reshape(z.numel(), -1)
    assert tm.relative_error(G.to_dense(), J.T @ H @ J) < 1e-10


class Scaled(nn.Module):
    """A plain attribute the trace bakes in as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 10)
        self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a(x)) * self.scale


def test_changed_attribute_is_retraced() -> None:
    torch.manual_seed(0)
    model = Scaled().to(DT)
    _check(model, *_data(4))
    model.scale = 3.0
    _check(model, *_data(4))


class GradHook(nn.Module):
    """A tensor hook in forward changes the gradient; the rules would not see it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h.register_hook(lambda g: 2 * g)
        return self.b(h)


def test_tensor_hooks_take_the_autograd_path() -> None:
    model = GradHook().to(DT)
    G = so.GGN(model, nn.CrossEntropyLoss(), _data(4), engine="graph")
    lin = G._states[0][0].lin
    assert lin.path == "autograd", lin.fallback_reason
    A = so.GGN(model, nn.CrossEntropyLoss(), _data(4), engine="autograd")
    torch.testing.assert_close(G.to_dense(), A.to_dense(), rtol=1e-12, atol=1e-14)


def test_parametrized_layers_go_to_autograd() -> None:
    torch.manual_seed(0)
    model = MLP((4, 5, 10)).to(DT)
    nn.utils.parametrizations.weight_norm(model.layers[0])
    nodes = _check(model, *_data(4))
    assert nodes == ["layers_0"]


def test_vjp_of_requested_parameters_and_columns() -> None:
    """vjp(indices) and batched products equal the full single-column ones."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet((2, 3)).to(DT))
    X, y = _data(1, 6, 6)
    lin = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine="graph")._states[0][0].lin
    U = torch.randn(2, *lin.z.shape, dtype=DT)
    full = [lin.vjp(U[k]) for k in range(2)]
    batched = lin.vjp(U, batched=True)
    for i in range(len(full[0])):
        for k in range(2):
            torch.testing.assert_close(batched[i][k], full[k][i], rtol=1e-12, atol=1e-14)
    for i in (0, 5, len(full[0]) - 1):
        (part,) = lin.vjp(U[0], indices=[i])
        torch.testing.assert_close(part, full[0][i], rtol=1e-12, atol=1e-14)
        buf = torch.zeros_like(part)
        lin.vjp_into(U[0], [buf], indices=[i])
        torch.testing.assert_close(buf, full[0][i], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["auto", "graph", "autograd"])
def test_tied_parameters_stay_the_models_parameters(engine: str) -> None:
    """torch.func.functional_call puts plain tensors in place of tied parameters (torch 2.13).

    The model must keep its own Parameter objects (an optimizer holds them), and a second
    operator must see the same trainable parameters.
    """
    tied = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), tied, nn.Tanh(), tied, nn.Linear(4, 2))
    model = model.to(DT)
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    X, y = _data(3, n=6, classes=2)
    G = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine=engine)
    G @ torch.ones(G.shape[0], dtype=DT)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p and p.requires_grad for n, p in before.items())
    again = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine=engine)
    assert again.shape == G.shape
    R = ref.dense_ggn(model, nn.CrossEntropyLoss(), (X,), y)
    assert tm.relative_error(again.to_dense(), R) < 1e-10


def test_residual_cnn_with_batchnorm_in_training_mode() -> None:
    """Batch statistics couple the samples: the BatchNorm rule, no node left to autograd."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet((2, 3)).to(DT)).train()
    X, y = _data(1, 6, 6)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    G = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine="graph")
    info = G.engine_info[0]
    assert info.path == "graph" and info.autograd_nodes == (), info
    # the running statistics move as after one plain forward pass
    built = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    with torch.no_grad():
        model(X)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(built[k], v, rtol=0, atol=0)
    model.load_state_dict(start)
    R = ref.dense_ggn(model, nn.CrossEntropyLoss(), (X,), y)
    assert tm.relative_error(G.to_dense(), R) < 1e-10
    A = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine="autograd")
    assert tm.relative_error(G.to_dense(), A.to_dense()) < 1e-12
