"""The graph engine's memory savings on ``nn.Sequential`` models keep its products exact.

Covers the rewrites of ``curvature/engines/memory.py``: activations moved behind max-pooling,
applied in place where their operand is fresh and unshared, and the column-blocked
``Linear, activation, Linear`` at a product's bottom; and what the linearisation keeps (the layer
inputs, ReLU, sigmoid and tanh derivatives from their kept outputs). Each product is compared
with the autograd engine in float64, for ``engine="graph"`` and ``"sequential"``, its alias (the
name of the former hand-written ``nn.Sequential`` engine, whose savings these are).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature.engines import memory

DT = torch.float64
RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _mlp(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3))


MODELS = {
    "relu_mlp": (lambda: _mlp(nn.ReLU), (7, 4)),
    "sigmoid_mlp": (lambda: _mlp(nn.Sigmoid), (7, 4)),
    "tanh_mlp": (lambda: _mlp(nn.Tanh), (7, 4)),
    "silu_mlp": (lambda: _mlp(nn.SiLU), (7, 4)),
    "leaky_mlp": (lambda: _mlp(lambda: nn.LeakyReLU(0.1)), (7, 4)),
    "sigmoid_cnn_pool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(2, 3, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(3, 4),
            nn.Tanh(),
            nn.Linear(4, 3),
        ),
        (5, 1, 12, 12),
    ),
    "overlapping_pool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        ),
        (4, 1, 7, 7),
    ),
    "silu_then_pool": (  # derivative not a function of the output: gathered at the indices
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.SiLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(27, 3)
        ),
        (4, 2, 20),
    ),
    "act_pool_pool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.Sigmoid(),
            nn.MaxPool2d(2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (4, 1, 10, 10),
    ),
    "output_not_kept": (  # tanh -> BatchNorm (stores x-hat) and a final sigmoid
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.Sigmoid()
        ).eval(),
        (6, 4),
    ),
    "relu_then_sigmoid": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sigmoid(), nn.Linear(5, 3)),
        (6, 4),
    ),
    "inplace_relu": (
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
        ),
        (6, 4),
    ),
    "dropout_between": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).eval(),
        (6, 4),
    ),
}


def _build(name: str, seed: int = 0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DT)
    X = torch.randn(*shape, dtype=DT)
    y = torch.randint(0, 3, (shape[0],))
    return model, nn.CrossEntropyLoss(), X, y


@pytest.fixture(params=[False, True], ids=["unblocked", "blocked"])
def blocking(request, monkeypatch):
    """Run with the default block threshold and with every hidden layer split in two."""
    if request.param:
        monkeypatch.setattr(memory, "MIN_BLOCK", 1)
    return request.param


ENGINES = pytest.mark.parametrize("engine", ["sequential", "graph"])


@ENGINES
@pytest.mark.parametrize("name", list(MODELS))
def test_products_match_autograd(name, blocking, engine):
    model, loss_fn, X, y = _build(name)
    G = so.GGN(model, loss_fn, (X, y), engine=engine)
    ref = so.GGN(model, loss_fn, (X, y), engine="autograd")
    n = G.shape[0]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=gen, dtype=DT)
    V = torch.randn(n, 3, generator=gen, dtype=DT)
    assert rel_err(G @ v, ref @ v) <= RTOL
    assert rel_err(G @ V, ref @ V) <= RTOL  # batched tangents
    assert rel_err(G.to_dense(), ref.to_dense()) <= RTOL
    grad, ref_grad = G.gradient(), ref.gradient()
    assert rel_err(grad, ref_grad) <= RTOL


@ENGINES
@pytest.mark.parametrize("name", ["relu_mlp", "tanh_mlp", "silu_mlp"])
def test_partial_parameters_and_blocks(name, blocking, engine):
    """Products restricted to parameter subsets stop inside (or below) the blocked triple."""
    model, loss_fn, X, y = _build(name)
    for frozen in (["0.weight"], ["0.bias"], ["0.weight", "0.bias"], ["2.weight"]):
        for pname, p in model.named_parameters():
            p.requires_grad_(pname not in frozen)
        G = so.GGN(model, loss_fn, (X, y), engine=engine)
        ref = so.GGN(model, loss_fn, (X, y), engine="autograd")
        assert rel_err(G.to_dense(), ref.to_dense()) <= RTOL


@ENGINES
def test_block_diagonal_blocks_match(blocking, engine):
    """Per-parameter diagonal blocks (vjp into one requested parameter) stay exact."""
    model, loss_fn, X, y = _build("relu_mlp")
    G = so.GGN(model, loss_fn, (X, y), engine=engine)
    dense = so.GGN(model, loss_fn, (X, y), engine="autograd").to_dense()
    start = 0
    for i, p in enumerate(model.parameters()):
        block = G.block(i).to_dense()
        end = start + p.numel()
        assert rel_err(block, dense[start:end, start:end]) <= RTOL
        start = end


# ------------------------------------------------------------ the graph engine's rewrites
def _graph_steps(name: str):
    model, loss_fn, X, y = _build(name)
    return so.GGN(model, loss_fn, (X, y), engine="graph")._states[0][0].lin


def test_graph_moves_activation_behind_pooling():
    lin = _graph_steps("sigmoid_cnn_pool")
    pooled = [s for _, s in lin.steps if isinstance(s, memory.PooledActivationStep)]
    assert len(pooled) == 2  # sigmoid and ReLU, each behind its max-pooling
    assert all(set(s.act.ctx) == {"s"} for s in pooled)
    (step,) = [s for _, s in _graph_steps("silu_then_pool").steps if hasattr(s, "pool")]
    assert step.act.ctx["d"].shape == (4, 3, 9)  # only the pooled entries


def test_graph_applies_activations_in_place():
    kinds = [type(s).__name__ for _, s in _graph_steps("relu_mlp").steps]
    assert kinds.count("InPlaceActivationStep") == 2
    steps = [s for _, s in _graph_steps("relu_mlp").steps if hasattr(s, "jvp_in_place")]
    assert all(s.jvp_in_place and s.vjp_in_place for s in steps)


def test_graph_blocks_the_bottom_triple(blocking):
    lin = _graph_steps("relu_mlp")
    assert len(lin._triples) == (2 if blocking else 0)


class _Shared(nn.Module):
    """Activation inputs and outputs read twice: nothing may be overwritten in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(4, 6),
            nn.Linear(6, 6),
            nn.Linear(6, 6),
            nn.Linear(6, 3),
        )

    def forward(self, x):
        h = self.a(x)
        s = torch.relu(h)  # h is also read by the sum below
        t = torch.tanh(self.b(s))
        return self.d(self.c(t) + t + h)  # t read by c and the sum


def test_graph_in_place_only_where_unshared(blocking):
    torch.manual_seed(0)
    model = _Shared().to(DT)
    X, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    G = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine="graph")
    lin = G._states[0][0].lin
    flags = {
        n.name: (s.jvp_in_place, s.vjp_in_place) for n, s in lin.steps if hasattr(s, "jvp_in_place")
    }
    # relu: its input h is also summed (no jvp in place); its output feeds one Linear (vjp)
    # tanh: its input is a Linear's alone (jvp); its output is read twice (no vjp in place)
    assert flags == {"relu": (False, True), "tanh": (True, False)}
    ref = so.GGN(model, nn.CrossEntropyLoss(), (X, y), engine="autograd")
    assert rel_err(G.to_dense(), ref.to_dense()) <= RTOL


def test_relu_sigmoid_tanh_keep_their_output_and_others_the_derivative():
    """ReLU, sigmoid and tanh keep their output (the next Linear's stored input), SiLU sigma'."""
    for name in ("relu_mlp", "sigmoid_mlp", "tanh_mlp"):
        acts = [s for _, s in _graph_steps(name).steps if hasattr(s, "act")]
        assert len(acts) == 2 and all(set(s.act.ctx) == {"s"} for s in acts)
    acts = [s for _, s in _graph_steps("silu_mlp").steps if hasattr(s, "act")]
    assert len(acts) == 2 and all(set(s.act.ctx) == {"d"} for s in acts)


def test_held_memory_of_relu_mlp_is_the_layer_inputs():
    """The operator's stored tensors for a ReLU MLP are its layer inputs and nothing else."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    X, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    lin = so.GGN(model, nn.CrossEntropyLoss(), (X, y))._states[0][0].lin
    assert lin.path == "graph"
    ctxs = [getattr(s, "act", s).ctx for _, s in lin.steps]
    storages = {
        v.untyped_storage().data_ptr()
        for ctx in ctxs
        for key, v in ctx.items()
        if isinstance(v, torch.Tensor) and key != "w"
    }
    inputs = {ctx["x"].untyped_storage().data_ptr() for ctx in ctxs if "x" in ctx}
    assert storages == inputs
