"""One vocabulary: engine names, their old alias, and the curvature names every family accepts."""

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.curvature import vocabulary as voc
from secondorder.curvature.blockwise import CURVATURES as BLOCK
from secondorder.curvature.lowrank import LowRankGGN
from secondorder.optim.base import CURVATURES as OPTIM


def test_engine_names_and_alias():
    assert voc.ENGINES == ("auto", "sequential", "autograd", "graph")
    assert [voc.canonical_engine(e) for e in voc.ENGINES] == list(voc.ENGINES)
    assert voc.canonical_engine("kron") == "sequential"
    for bad in ("fast", None, 1, ["auto"]):
        with pytest.raises(ValueError, match="engine must be one of"):
            voc.canonical_engine(bad)
    with pytest.raises(ValueError, match="engine must be one of"):
        voc.canonical_engine("graph", voc.NON_GRAPH_ENGINES)  # no graph engine there


def test_families_take_their_names_from_the_vocabulary():
    assert set(BLOCK) <= set(voc.CURVATURES) and set(OPTIM) <= set(voc.CURVATURES)
    assert set(BLOCK) | set(OPTIM) == set(voc.CURVATURES)


@pytest.mark.parametrize("engine", ["sequential", "kron"])
def test_lowrank_reports_the_one_engine_name(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    lr = LowRankGGN(model, nn.CrossEntropyLoss(), (x, y), engine=engine)
    assert lr.engine == "sequential"
    dense = so.GGN(model, nn.CrossEntropyLoss(), (x, y), engine="autograd").to_dense()
    assert torch.allclose(lr.to_dense(), dense, atol=1e-12)


@pytest.mark.parametrize("op", [so.GGN, so.Hessian])
def test_operators_reject_unknown_engines(op):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"engine must be one of \('auto', 'sequential'"):
        op(model, nn.MSELoss(), (torch.randn(3, 2), torch.randn(3, 1)), engine="fast")
