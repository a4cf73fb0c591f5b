"""Operators say which engine computed each batch's products (``engine_info``)."""

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature import EngineInfo

DT = torch.float64
CE = nn.CrossEntropyLoss()


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h + self.b(h).sin())  # sin has no rule: autograd for that node alone


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.tanh(h)
        return self.out(h)


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def data(n=6):
    return torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))


@pytest.mark.parametrize(
    ("make", "kwargs", "path"),
    [
        (mlp, {}, "graph"),
        (mlp, {"engine": "sequential"}, "graph"),
        (mlp, {"jacobian_factors": True}, "factored"),
        (mlp, {"engine": "autograd"}, "autograd"),
        (mlp, {"engine": "graph"}, "graph"),
        (lambda: Residual().to(DT), {}, "graph"),
        (lambda: Branchy().to(DT), {}, "autograd"),
    ],
    ids=[
        "sequential",
        "sequential_alias",
        "factored",
        "autograd",
        "graph",
        "residual",
        "untraceable",
    ],
)
def test_ggn_reports_its_engine_per_batch(make, kwargs, path):
    model = make()
    G = so.GGN(model, CE, [data(), data(3)], **kwargs)
    info = G.engine_info
    assert [i.path for i in info] == [path, path]
    assert all(isinstance(i, EngineInfo) for i in info)


def test_graph_engine_names_its_fallbacks():
    info = so.GGN(Residual().to(DT), CE, data()).engine_info[0]
    assert info.path == "graph" and info.fallback_reason is None
    assert any("sin" in node for node in info.autograd_nodes)
    info = so.Fisher(Branchy().to(DT), CE, data(), kind="empirical").engine_info[0]
    assert info.path == "autograd" and info.fallback_reason


def test_hessian_reports_its_engine():
    assert so.Hessian(mlp(), CE, data()).engine_info[0].path == "graph"
    assert so.Hessian(mlp(), CE, data(), engine="autograd").engine_info[0].path == "autograd"


def test_streamed_data_keeps_no_engine_info():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data(8)), batch_size=4)
    assert so.GGN(mlp(), CE, loader, cache=False).engine_info == []


# ----------------------------------------------------------- the one dispatch site
class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("make", "engine", "factors", "path"),
    [
        (mlp, "auto", False, "graph"),
        (mlp, "sequential", False, "graph"),  # the former Sequential engine's name: an alias
        (mlp, "graph", False, "graph"),
        (mlp, "autograd", False, "autograd"),
        (mlp, "auto", True, "factored"),
        (mlp, "sequential", True, "factored"),
        (mlp, "graph", True, "graph"),  # the graph engine ignores the fast-path option
        (lambda: Residual().to(DT), "auto", False, "graph"),
        (lambda: Residual().to(DT), "sequential", False, "graph"),
    ],
)
def test_select_chooses_every_engine(make, engine, factors, path):
    from secondorder.curvature.engines.dispatch import select
    from secondorder.curvature.model import FunctionalModel

    fmodel = FunctionalModel(make())
    X, _ = data()
    assert select(fmodel, (X,), engine, factors) == path
    G = so.GGN(fmodel.model, CE, data(), engine=engine, jacobian_factors=factors)
    assert G.engine_info[0].path == path  # linearize follows select


def test_select_refuses_and_defers_to_autograd_under_a_function_mode():
    from secondorder.curvature.engines.dispatch import select
    from secondorder.curvature.model import FunctionalModel

    X, _ = data()
    with pytest.raises(ValueError, match=r"jacobian_factors=True needs an nn\.Sequential MLP"):
        select(FunctionalModel(mlp()), (X,), "autograd", True)
    with pytest.raises(ValueError, match=r"jacobian_factors=True needs an nn\.Sequential MLP"):
        select(FunctionalModel(Residual().to(DT)), (X,), "auto", True)
    with pytest.raises(ValueError, match="engine must be one of"):
        select(FunctionalModel(mlp()), (X,), "kfac")
    with _Mode():  # a torch-function mode may change what autograd records: it must see all
        assert select(FunctionalModel(mlp()), (X,), "auto") == "autograd"
        assert select(FunctionalModel(mlp()), (X,), "graph") == "graph"
