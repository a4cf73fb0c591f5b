"""How data and parameters are passed (issue 13, items 9, 10, 18, 20).

- ``params`` in another order than the model's: the flat vector follows the given order, on
  every engine (Sequential, Jacobian factors, hand-written MLP Hessian, block-diagonal,
  Kronecker low-rank and diagonals, autograd), against dense references in that order;
- one batch whose inputs are a dict, or whose targets are a tuple, is one batch;
- an empty batch is refused with a ValueError naming the batch, by every operator;
- a model returning a tuple or a dict gets a clear TypeError from the Hessian as from the GGN.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models_inputs_cases import DT, ref_empirical_fisher_ce, ref_ggn, ref_gradient, ref_hessian
from torch import nn

import secondorder as so
from secondorder.curvature import Batch, as_batches
from secondorder.curvature.blockwise import BlockDiagonalCurvature
from secondorder.curvature.diagonal import per_sample_gradient_diagonal
from secondorder.curvature.lowrank import LowRankGGN

RTOL = 1e-9
N = 5
CE = nn.CrossEntropyLoss()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3)
    ).double()


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()


def bn_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.double().eval()


MODELS = {
    "mlp": (mlp, lambda: torch.randn(N, 3, dtype=DT)),
    "cnn": (cnn, lambda: torch.randn(N, 1, 5, 5, dtype=DT)),
    "bn_mlp": (bn_mlp, lambda: torch.randn(N, 3, dtype=DT)),
}


def _orders(model):
    ps = list(model.parameters())
    return {
        "reversed": ps[::-1],
        "subset": [ps[-2], ps[0], ps[-1]],  # later layer first, one layer left out
    }


OPS = {
    "ggn": lambda m, d, p: so.GGN(m, CE, d, params=p).to_dense(),
    "ggn_factors": lambda m, d, p: so.GGN(m, CE, d, params=p, jacobian_factors=True).to_dense(),
    "ggn_autograd": lambda m, d, p: so.GGN(m, CE, d, params=p, engine="autograd").to_dense(),
    "hessian": lambda m, d, p: so.Hessian(m, CE, d, params=p).to_dense(),
    "hessian_autograd": lambda m, d, p: so.Hessian(
        m, CE, d, params=p, engine="autograd"
    ).to_dense(),
    "fisher_emp": lambda m, d, p: so.Fisher(m, CE, d, params=p, kind="empirical").to_dense(),
    "block_ggn": lambda m, d, p: BlockDiagonalCurvature(m, CE, d, params=p).to_dense(),
    "block_hessian": lambda m, d, p: BlockDiagonalCurvature(
        m, CE, d, params=p, curvature="hessian"
    ).to_dense(),
    "lowrank": lambda m, d, p: LowRankGGN(m, CE, d, params=p).to_dense(),
    "lowrank_reordered_block": lambda m, d, p: LowRankGGN(m, CE, d, params=p).to_dense(p),
    "ggn_diagonal": lambda m, d, p: so.ggn_diagonal(m, CE, d, params=p),
    "ef_diagonal": lambda m, d, p: so.empirical_fisher_diagonal(m, CE, d, params=p),
    "ps_diagonal": lambda m, d, p: per_sample_gradient_diagonal(m, CE, d, params=p),
}


def _reference(op_name, model, X, y, params):
    if op_name.startswith("hessian") or op_name == "block_hessian":
        dense = ref_hessian(model, CE, (X,), y, params)
    elif op_name in ("fisher_emp", "ef_diagonal", "ps_diagonal"):
        dense = ref_empirical_fisher_ce(model, (X,), y, params)
    else:
        dense = ref_ggn(model, CE, (X,), y, params)
    if op_name.startswith("block"):
        mask = torch.block_diag(*[torch.ones(p.numel(), p.numel()) for p in params])
        dense = dense * mask
    if op_name.endswith("diagonal"):
        dense = dense.diagonal()
    return dense


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("order", ["reversed", "subset"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_operators_follow_the_given_params_order(model_name, order, op_name):
    if op_name == "ggn_factors" and model_name != "mlp":
        pytest.skip("Jacobian factors serve MLPs only")
    torch.manual_seed(0)
    make, inputs = MODELS[model_name]
    model, X = make(), inputs()
    y = torch.randint(0, 3, (N,))
    params = _orders(model)[order]
    got = OPS[op_name](model, (X, y), params)
    assert rel_err(got, _reference(op_name, model, X, y, params)) < RTOL


@pytest.mark.parametrize("model_name", list(MODELS))
def test_gradient_and_unflatten_follow_the_given_order(model_name):
    torch.manual_seed(0)
    make, inputs = MODELS[model_name]
    model, X = make(), inputs()
    y = torch.randint(0, 3, (N,))
    params = _orders(model)["reversed"]
    G = so.GGN(model, CE, (X, y), params=params)
    assert rel_err(G.gradient(), ref_gradient(model, CE, (X,), y, params)) < RTOL
    assert [t.shape for t in G.fmodel.unflatten(G.gradient())] == [p.shape for p in params]
    assert all(a is b for a, b in zip(G.fmodel.params, params))


def test_repeated_params_refused():
    model = mlp()
    w = model[0].weight
    with pytest.raises(ValueError, match="repeat an earlier entry"):
        so.GGN(
            model,
            CE,
            (torch.randn(N, 3, dtype=DT), torch.zeros(N, dtype=torch.long)),
            params=[w, model[2].weight, w],
        )


def test_gauss_newton_step_with_permuted_params():
    """The same step whatever the order of ``params``; equal to the dense solve in that order."""
    torch.manual_seed(0)
    model = mlp()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, 3, (N,))
    twin = copy.deepcopy(model)
    params = _orders(model)["reversed"]
    damping = 0.1
    A = ref_ggn(model, CE, (X,), y, params)
    g = ref_gradient(model, CE, (X,), y, params)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    expected = theta - torch.linalg.solve(A + damping * torch.eye(len(g), dtype=DT), g)
    kw = dict(lr=1.0, damping=damping, cg_rtol=1e-13, cg_maxiter=1000)
    so.GaussNewton(model, CE, params=params, **kw).step(X, y)
    so.GaussNewton(twin, CE, **kw).step(X, y)
    got = torch.cat([p.detach().reshape(-1) for p in params])
    assert rel_err(got, expected) < 1e-8
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- batches
class DictModel(nn.Module):
    """Hugging-Face style: one dict argument with named inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs):
        h = self.emb(inputs["input_ids"]) * inputs["attention_mask"].unsqueeze(-1)
        return self.head(h.sum(1) / inputs["attention_mask"].sum(1, keepdim=True))


def _dict_batch():
    ids = torch.randint(0, 7, (N, 4))
    mask = torch.ones(N, 4, dtype=DT)
    mask[0, 3] = mask[2, 1:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (N,))


def test_dict_inputs_are_one_batch_passed_as_one_argument():
    torch.manual_seed(0)
    model = DictModel().double()
    inputs, y = _dict_batch()
    (batch,) = as_batches((inputs, y))
    assert batch.inputs == (inputs,) and batch.size == N
    one = so.GGN(model, CE, (inputs, y)).to_dense()
    listed = so.GGN(model, CE, [(inputs, y)]).to_dense()
    ref = ref_ggn(model, CE, (inputs,), y)
    assert rel_err(one, ref) < RTOL and rel_err(listed, ref) < RTOL
    H = so.Hessian(model, CE, (inputs, y)).to_dense()
    assert rel_err(H, ref_hessian(model, CE, (inputs,), y)) < RTOL
    # per-sample paths slice the dict's tensors sample by sample
    d, info = so.ggn_diagonal(model, CE, (inputs, y), return_info=True)
    assert info.paths == ["vmap"]
    assert rel_err(d, ref.diagonal()) < RTOL


def test_tuple_targets_are_one_batch():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X = torch.randn(N, 3, dtype=DT)
    t = (torch.randn(N, dtype=DT), torch.randn(N, dtype=DT))

    def loss_fn(out, targets):
        return ((out[:, 0] - targets[0]) ** 2).mean() + (out[:, 1] * targets[1]).tanh().mean()

    (batch,) = as_batches((X, t))
    assert batch.targets is t and batch.size == N
    for op, ref in ((so.Hessian, ref_hessian), (so.GGN, ref_ggn)):
        assert rel_err(op(model, loss_fn, (X, t)).to_dense(), ref(model, loss_fn, (X,), t)) < RTOL
    # tuple inputs and a tensor target, list inputs: one batch too
    assert len(as_batches(((X, X), t[0]))) == 1
    assert len(as_batches([[X, X, X], t])) == 1


def test_pair_of_pairs_is_two_batches_and_batch_marks_one():
    X1, X2 = torch.randn(2, 3), torch.randn(3, 3)
    y1, y2 = torch.randn(2), torch.randn(3)
    two = as_batches([(X1, y1), (X2, y2)])
    assert [b.size for b in two] == [2, 3]
    one = as_batches(Batch((X1, y1), (X2, y2)))
    assert len(one) == 1 and one[0].inputs == (X1, y1)
    assert len(as_batches([((X1, y1), (X2, y2))])) == 1


EMPTY_OPS = {
    "ggn": lambda m, d: so.GGN(m, CE, d),
    "hessian": lambda m, d: so.Hessian(m, CE, d),
    "fisher": lambda m, d: so.Fisher(m, CE, d, kind="empirical"),
    "block": lambda m, d: BlockDiagonalCurvature(m, CE, d),
    "lowrank": lambda m, d: LowRankGGN(m, CE, d),
    "ggn_diagonal": lambda m, d: so.ggn_diagonal(m, CE, d),
    "ps_diagonal": lambda m, d: per_sample_gradient_diagonal(m, CE, d),
    "pch": lambda m, d: so.PCH(m, CE, d),
}


@pytest.mark.parametrize("op", list(EMPTY_OPS))
def test_empty_batch_refused(op):
    model = mlp()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, 3, (N,))
    empty = (X[:0], y[:0])
    with pytest.raises(ValueError, match=r"data: the batch has no samples.*\(0, 3\)"):
        EMPTY_OPS[op](model, empty)
    with pytest.raises(ValueError, match=r"data: batch 1: the batch has no samples"):
        EMPTY_OPS[op](model, [(X, y), empty])
    with pytest.raises(ValueError, match=r"data: batch 0: the batch has no samples"):
        EMPTY_OPS[op](model, (b for b in [empty, (X, y)]))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x


class DictOut(TupleOut):
    def forward(self, x):
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("model_cls", [TupleOut, DictOut])
@pytest.mark.parametrize("op", [so.GGN, so.Hessian])
def test_non_tensor_output_clear_error(model_cls, op):
    model = model_cls().double()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, 2, (N,))
    with pytest.raises(TypeError, match=r"the model must return a tensor, got (tuple|dict)"):
        op(model, CE, (X, y))


def test_hessian_of_tuple_output_with_a_loss_that_takes_it():
    torch.manual_seed(0)
    model = TupleOut().double()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, 2, (N,))

    def loss_fn(out, target):
        return CE(out[0], target) + (out[0] * out[1][:, :2]).square().mean()

    H = so.Hessian(model, loss_fn, (X, y)).to_dense()
    assert rel_err(H, ref_hessian(model, loss_fn, (X,), y)) < RTOL
