"""Hessian (and PCH-modified) products on the graph engine against dense references.

The conformance matrix runs ``Hessian(engine="graph")`` over its models, losses and splits
(``tests/conformance/operators.py``: ``hessian.graph``). Here: the custom modules of the graph
engine's tests (residual CNN with BatchNorm, module called twice, linear functions, a node
without a rule, an untraceable model) against ``jacrev(grad)``, parameter subsets, the path
``engine_info`` reports, and ``modify="clip"|"abs"`` against the double backward recorded under
``positive_curvature_mode`` and against the PCH's dense blocks.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the conformance package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_models import MLP, ResNet, randomize_batchnorm
from test_graph_engine import DataDependent, LinearOps, Twice, Unsupported

import secondorder as so
from conformance import reference as ref
from conformance import test_matrix as tm
from conformance.losses import DEFAULT_LOSS
from conformance.models import MODELS
from secondorder.curvature.engines.second_order import GraphHessian

DT = torch.float64
CE = nn.CrossEntropyLoss()


def _data(*shape: int, n: int = 7, classes: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(
        0, classes, (n,), generator=g
    )


class Gated(nn.Module):
    """Sigmoid, tanh and SiLU modules and functions, a product of two active values, a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.act = nn.SiLU()
        self.c = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.sigmoid(self.a(x)) * torch.tanh(self.b(x))
        return self.c(self.act(h) + F.softplus(h, beta=2.0))


class Softplussed(nn.Module):
    """Activations without an op rule (``expit``, ``logsigmoid``): autograd nodes around them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.c = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.c(torch.special.expit(torch.sin(h)) + F.logsigmoid(h) * torch.tanh(h))


CUSTOM = {
    "resnet": (lambda: randomize_batchnorm(ResNet((2, 3))), (1, 6, 6), ()),
    "mlp": (lambda: MLP((5, 6, 4, 10)), (5,), ()),
    "twice": (Twice, (4,), ()),
    "linear_ops": (LinearOps, (4,), ()),
    "unsupported": (Unsupported, (4,), ("sin", "cumsum")),
    "gated": (Gated, (4,), ()),
    "softplussed": (Softplussed, (4,), ("sin", "special_expit", "log_sigmoid")),
}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_modules_against_the_dense_hessian(name: str) -> None:
    build, shape, autograd_nodes = CUSTOM[name]
    torch.manual_seed(0)
    model = build().to(DT)
    X, y = _data(*shape)
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    H = so.Hessian(model, CE, data, engine="graph")
    info = H.engine_info[0]
    assert info.path == "graph", info.fallback_reason
    assert set(info.autograd_nodes) == set(autograd_nodes)
    R = ref.dense_hessian(model, CE, (X,), y)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(R.shape[0], generator=gen, dtype=DT)
    V = torch.randn(R.shape[0], 3, generator=gen, dtype=DT)
    assert tm.relative_error(H @ v, R @ v) < 1e-10
    assert tm.relative_error(H @ V, R @ V) < 1e-10
    assert tm.relative_error(H.to_dense(), R) < 1e-10
    assert tm.relative_error(H.gradient(), ref.gradient(model, CE, (X,), y)) < 1e-10
    assert tm.relative_error(H.loss, ref.loss_value(model, CE, (X,), y)) < 1e-12


@pytest.mark.parametrize("name", ["resnet", "twice", "unsupported"])
def test_parameter_subsets_and_blocks(name: str) -> None:
    build, shape, _ = CUSTOM[name]
    torch.manual_seed(0)
    model = build().to(DT)
    X, y = _data(*shape)
    params = [p for p in model.parameters() if p.requires_grad]
    subset = [params[0], params[-1]] if len(params) > 2 else params[:1]
    for ps in (subset, subset[::-1][:1]):
        H = so.Hessian(model, CE, (X, y), engine="graph", params=ps)
        A = so.Hessian(model, CE, (X, y), engine="autograd", params=ps)
        assert isinstance(H._states[0][0], GraphHessian)
        assert tm.relative_error(H.to_dense(), A.to_dense()) < 1e-10
    H = so.Hessian(model, CE, (X, y), engine="graph")
    A = so.Hessian(model, CE, (X, y), engine="autograd")
    for i in (0, len(params) - 1):
        assert tm.relative_error(H.block(i).to_dense(), A.block(i).to_dense()) < 1e-10


def test_streamed_batches() -> None:
    torch.manual_seed(0)
    model = Twice().to(DT)
    X, y = _data(4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    H = so.Hessian(model, CE, loader, engine="graph", cache=False)
    assert tm.relative_error(H.to_dense(), ref.dense_hessian(model, CE, (X,), y)) < 1e-10


# ------------------------------------------------------------------ engine_info
@pytest.mark.parametrize("name", list(MODELS))
def test_every_conformance_model_takes_the_graph_path(name: str) -> None:
    """The matrix checks hessian.graph's values; here every model is traced, none falls back."""
    case = tm.Case("hessian.graph", name, DEFAULT_LOSS[MODELS[name].out], "one")
    op = tm.build(case)
    info = op.engine_info[0]
    assert info.path == "graph", info.fallback_reason


def test_engine_info_names_the_path() -> None:
    torch.manual_seed(0)
    X, y = _data(4)
    model = Twice().to(DT)
    assert so.Hessian(model, CE, (X, y)).engine_info[0].path == "graph"
    assert so.Hessian(model, CE, (X, y), engine="graph").engine_info[0].path == "graph"
    info = so.Hessian(model, CE, (X, y), engine="autograd").engine_info[0]
    assert info.path == "autograd" and info.fallback_reason is None
    seq = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 10)).to(DT)
    assert so.Hessian(seq, CE, (X, y)).engine_info[0].path == "graph"
    assert so.Hessian(seq, CE, (X, y), engine="sequential").engine_info[0].path == "graph"
    assert so.Hessian(seq, CE, (X, y), engine="graph").engine_info[0].path == "graph"
    assert so.Hessian(seq, CE, (X, y), modify="abs").engine_info[0].path == "graph"
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 10)).to(DT)
    assert so.Hessian(conv, CE, (X[:, None], y)).engine_info[0].path == "graph"
    # an untraceable model: the whole-model double backward, with the graph engine's reason
    model = DataDependent().to(DT)
    H = so.Hessian(model, CE, (X, y))
    info = H.engine_info[0]
    assert info.path == "autograd" and info.fallback_reason
    assert tm.relative_error(H.to_dense(), ref.dense_hessian(model, CE, (X,), y)) < 1e-10


def test_tuple_output_falls_back_with_a_reason() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.lin(x), x

    torch.manual_seed(0)
    model = TupleOut().to(DT)
    X, y = _data(4, classes=3)

    def loss_fn(out: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        return CE(out[0], target) + (out[0] * out[1][:, :3]).square().mean()

    H = so.Hessian(model, loss_fn, (X, y))
    info = H.engine_info[0]
    assert info.path == "autograd" and info.fallback_reason


# ------------------------------------------------------------------ PCH modification
PCH_MODELS = {
    "mlp_sigmoid": (
        lambda: nn.Sequential(
            nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 10)
        ),
        (4,),
    ),
    "gated": (Gated, (4,)),
    "softplussed": (Softplussed, (4,)),
    "resnet": (lambda: randomize_batchnorm(ResNet((2, 3))), (1, 6, 6)),
}


@pytest.mark.parametrize("modify", ["clip", "abs"])
@pytest.mark.parametrize("name", list(PCH_MODELS))
def test_modified_products_equal_the_torch_function_mode(name: str, modify: str) -> None:
    build, shape = PCH_MODELS[name]
    torch.manual_seed(0)
    model = build().to(DT)
    X, y = _data(*shape)
    P = so.Hessian(model, CE, (X, y), engine="graph", modify=modify)
    assert P.engine_info[0].path == "graph"
    with so.curvature.pch.positive_curvature_mode(modify):
        M = so.Hessian(model, CE, (X, y), engine="autograd")
    Q = so.Hessian(model, CE, (X, y), engine="autograd", modify=modify)
    want = M.to_dense()
    assert tm.relative_error(P.to_dense(), want) < 1e-10
    assert tm.relative_error(Q.to_dense(), want) < 1e-12
    V = torch.randn(want.shape[0], 3, dtype=DT)
    assert tm.relative_error(P @ V, want @ V) < 1e-10
    exact = so.Hessian(model, CE, (X, y), engine="graph").to_dense()
    if name != "resnet":  # ReLU only: the modification changes nothing
        assert tm.relative_error(P.to_dense(), exact) > 1e-6


@pytest.mark.parametrize("modify", ["clip", "abs"])
def test_modified_diagonal_blocks_are_the_pch_blocks(modify: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 10)
    )
    model = model.to(DT)
    X, y = _data(4)
    P = so.Hessian(model, CE, (X, y), engine="graph", modify=modify)
    want = ref.pch_blocks(model, CE, (X,), y, curvature=f"pch_{modify}")
    sizes = [p.numel() for p in model.parameters()]
    assert tm.relative_error(ref.block_diagonal(P.to_dense(), sizes), want) < 1e-10


def test_modify_is_checked() -> None:
    X, y = _data(4)
    with pytest.raises(ValueError, match="modify"):
        so.Hessian(Twice().to(DT), CE, (X, y), modify="square")


def test_batchnorm_in_training_mode_is_exact_and_moves_the_statistics_once() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet((2, 3))).to(DT).train()
    X, y = _data(1, 6, 6)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(X)  # building moves the statistics as one forward pass does, products never
    stats = {k: v.clone() for k, v in twin.state_dict().items() if "running" in k}
    H = so.Hessian(model, CE, (X, y), engine="graph")
    info = H.engine_info[0]
    assert info.path == "graph" and not info.autograd_nodes, info
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    Hv = H @ v
    H @ torch.randn(H.shape[0], 2, dtype=DT)
    for k, before in stats.items():
        assert torch.equal(model.state_dict()[k], before), k
    R = ref.dense_hessian(copy.deepcopy(model), CE, (X,), y)
    assert tm.relative_error(Hv, R @ v) < 1e-10
