"""Every activation of the table and BatchNorm (eval) through every curvature engine.

Generated matrix: {every activation class of :data:`ACTIVATIONS`} x {default arguments,
non-default arguments, in place} x {every engine}, BatchNorm cases (first layer, above a
frozen Linear, in the middle, BatchNorm1d/2d in small CNNs) x {every engine}, and layers the
hand-written engines must refuse x {every engine}. Each product, ``to_dense`` and block is
compared with a dense float64 reference built independently (:mod:`layer_cases`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from layer_cases import (
    ACT_CASES,
    ACT_IDS,
    BN_CASES,
    DT,
    NONDEFAULT,
    REFUSED,
    RTOL,
    C,
    Case,
    N,
    activation_arguments,
    blocks_of,
    bn_case,
    make_case,
    reference,
    refused_case,
)
from torch import nn

import secondorder as so
from secondorder.curvature.activations import ACTIVATIONS, activation_function
from secondorder.curvature.blockwise import BlockDiagonalCurvature
from secondorder.curvature.lowrank import LowRankGGN


def test_every_argument_of_every_table_activation_has_a_test_value():
    # adding an activation (or torch adding an argument) must add its non-default test values
    for cls in ACTIVATIONS:
        assert set(activation_arguments(cls)) <= set(NONDEFAULT), cls.__name__


@pytest.mark.parametrize(("cls", "kind", "kwargs"), ACT_CASES, ids=ACT_IDS)
def test_table_function_is_the_modules_out_of_place_forward(cls, kind, kwargs):
    torch.manual_seed(0)
    module = cls(**kwargs)
    a = 2 * torch.randn(7, 5, dtype=DT)
    before = a.clone()
    out = activation_function(module)(a)
    assert torch.equal(a, before)  # never in place
    assert torch.equal(out, module(a.clone()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_operator(op: Any, expected: torch.Tensor) -> None:
    """``to_dense``, a matrix-vector and a matrix-matrix product against ``expected``."""
    assert rel_err(op.to_dense(), expected) <= RTOL
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.shape[0], dtype=DT, generator=g)
    V = torch.randn(op.shape[0], 3, dtype=DT, generator=g)
    assert rel_err(op @ v, expected @ v) <= RTOL
    assert rel_err(op @ V, expected @ V) <= RTOL


# ---------------------------------------------------------------------------- engines
def _ggn(case: Case, ref: dict[str, Any], data: Any) -> None:
    op = so.GGN(case.model, nn.CrossEntropyLoss(), data)
    linearization = op._states[0][0].lin
    # nn.Sequential is a chain of the graph engine; a model it cannot trace falls back whole
    assert linearization.path == "graph" if case.sequential else linearization.path != "factored"
    check_operator(op, ref["ggn"])
    assert rel_err(op.gradient(), ref["gradient"]) <= RTOL
    assert float(op.loss) == pytest.approx(float(ref["loss"]), rel=1e-12)
    sizes = ref["sizes"]
    for i, block in enumerate(blocks_of(ref["ggn"], sizes)):  # blocks of the full operator
        assert rel_err(op.block(i).to_dense(), block) <= RTOL


def _ggn_jacobian_factors(case: Case, ref: dict[str, Any], data: Any) -> None:
    try:
        op = so.GGN(case.model, nn.CrossEntropyLoss(), data, jacobian_factors=True)
    except ValueError as error:  # refused (BatchNorm above the lowest trainable layer)
        assert not case.mlp and "jacobian_factors=True" in str(error)
        return
    check_operator(op, ref["ggn"])


def _fisher(case: Case, ref: dict[str, Any], data: Any) -> None:
    check_operator(so.Fisher(case.model, nn.CrossEntropyLoss(), data, kind="exact"), ref["ggn"])
    empirical = so.Fisher(case.model, nn.CrossEntropyLoss(), data, kind="empirical")
    check_operator(empirical, ref["ef"])


def _hessian(case: Case, ref: dict[str, Any], data: Any) -> None:
    op = so.Hessian(case.model, nn.CrossEntropyLoss(), data)
    if case.mlp:  # the graph engine's R-operator serves every table activation
        assert op.engine_info[0].path == "graph", op.engine_info[0].fallback_reason
    check_operator(op, ref["hessian"])
    assert rel_err(op.gradient(), ref["gradient"]) <= RTOL


def _block(curvature: str) -> Callable[[Case, dict[str, Any], Any], None]:
    def run(case: Case, ref: dict[str, Any], data: Any) -> None:
        if curvature in ("ggn", "hessian"):
            expected = ref[f"block_{curvature}"]
        elif case.mlp:
            expected = ref[f"bp_{curvature}"]
        else:
            pytest.skip("no dense PCH reference for this model")
        op = BlockDiagonalCurvature(case.model, nn.CrossEntropyLoss(), data, curvature=curvature)
        if case.mlp:
            assert op.engine == "sequential"
            # the dense Hessian backpropagation agrees with the Hessian and GGN blocks
            assert rel_err(ref["bp_hessian"], ref["block_hessian"]) <= RTOL
            assert rel_err(ref["bp_ggn"], ref["block_ggn"]) <= RTOL
        check_operator(op, expected)
        for i, block in enumerate(blocks_of(expected, ref["sizes"])):
            assert rel_err(op.block(i).to_dense(), block) <= RTOL

    return run


def _pch(modify: str, engine: str) -> Callable[[Case, dict[str, Any], Any], None]:
    def run(case: Case, ref: dict[str, Any], data: Any) -> None:
        if not case.mlp:
            pytest.skip("no dense PCH reference for this model")
        if engine == "autograd" and any(type(m) is nn.Hardsigmoid for m in case.model):
            pytest.skip("torch has no double backward of hardsigmoid")
        op = so.PCH(case.model, nn.CrossEntropyLoss(), data, modify=modify, engine=engine)
        assert op.engine == engine
        check_operator(op, ref[f"bp_pch_{modify}"])

    return run


def _lowrank(case: Case, ref: dict[str, Any], data: Any) -> None:
    op = LowRankGGN(case.model, nn.CrossEntropyLoss(), data)
    if case.mlp or case.kron:
        assert op.engine == "sequential"
    assert rel_err(op.to_dense(), ref["ggn"]) <= RTOL


def _autograd(kind: str) -> Callable[[Case, dict[str, Any], Any], None]:
    """The model as written, through autograd (the engines' fallback)."""

    def run(case: Case, ref: dict[str, Any], data: Any) -> None:
        if any(type(m) is nn.Hardsigmoid for m in case.model):
            pytest.skip("torch has no double backward of hardsigmoid")
        if kind == "ggn":
            op: Any = so.GGN(case.model, nn.CrossEntropyLoss(), data, engine="autograd")
        else:
            op = so.Hessian(case.model, nn.CrossEntropyLoss(), data, engine="autograd")
        if any(getattr(m, "inplace", False) for m in case.model):
            # torch's in-place kernels differentiate from the output (CELU: y / alpha + 1,
            # which cancels where y is near -alpha): agreement to 1e-7 only
            assert rel_err(op.to_dense(), ref[kind]) <= 1e-7
            return
        check_operator(op, ref[kind])

    return run


def _diagonals(case: Case, ref: dict[str, Any], data: Any) -> None:
    diag, info = so.ggn_diagonal(case.model, nn.CrossEntropyLoss(), data, return_info=True)
    if case.mlp or case.kron:  # the per-sample layer fast path is taken
        assert info.paths == ["kronecker"]
    assert rel_err(diag, ref["ggn"].diagonal()) <= RTOL
    diag = so.empirical_fisher_diagonal(case.model, nn.CrossEntropyLoss(), data)
    assert rel_err(diag, ref["ef"].diagonal()) <= RTOL


ENGINES: dict[str, Callable[[Case, dict[str, Any], Any], None]] = {
    "ggn": _ggn,
    "ggn_jacobian_factors": _ggn_jacobian_factors,
    "fisher": _fisher,
    "hessian": _hessian,
    "block_ggn": _block("ggn"),
    "block_hessian": _block("hessian"),
    "block_pch_clip": _block("pch_clip"),
    "block_pch_abs": _block("pch_abs"),
    "pch_clip": _pch("clip", "sequential"),
    "pch_abs": _pch("abs", "sequential"),
    # positive_curvature_mode: the modified double backward through the recorded graph
    "pch_clip_autograd": _pch("clip", "autograd"),
    "pch_abs_autograd": _pch("abs", "autograd"),
    "lowrank_ggn": _lowrank,
    "ggn_autograd": _autograd("ggn"),
    "hessian_autograd": _autograd("hessian"),
    "diagonals": _diagonals,
}


def run_engine(key: tuple, engine: str) -> None:
    ref = reference(key)
    case = make_case(key)
    x = case.x.clone()
    ENGINES[engine](case, ref, (x, ref["y"]))
    assert torch.equal(x, case.x)  # the user's inputs are left as they were


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize(("cls", "kind", "kwargs"), ACT_CASES, ids=ACT_IDS)
def test_activation_through_every_engine(cls, kind, kwargs, engine):
    run_engine(("act", cls, tuple(sorted(kwargs.items()))), engine)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("name", list(BN_CASES))
def test_batchnorm_through_every_engine(name, engine):
    run_engine(("bn", name), engine)


@pytest.mark.parametrize("name", list(BN_CASES))
def test_batchnorm_gradient_and_products_of_parameter_subsets(name):
    # a product with one block of the sequential engine (vjp stops at the lowest one)
    case = bn_case(name)
    ref = reference(("bn", name))
    op = so.GGN(case.model, nn.CrossEntropyLoss(), (case.x, ref["y"]), engine="sequential")
    e = torch.zeros(op.shape[0], dtype=DT)
    for i in range(op.shape[0]):
        e.zero_()[i] = 1
        assert rel_err(op @ e, ref["ggn"][:, i]) <= RTOL


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_layers_raise_with_the_sequential_engine(name):
    case = refused_case(name)
    data = (case.x, torch.arange(N) % C)
    # GGN's engine="sequential" is an alias of the graph engine, which serves every model
    info = so.GGN(case.model, nn.CrossEntropyLoss(), data, engine="sequential").engine_info
    assert info[0].path in ("graph", "autograd")
    with pytest.raises(ValueError, match="not supported by the block-diagonal"):
        BlockDiagonalCurvature(case.model, nn.CrossEntropyLoss(), data, engine="sequential")
    assert BlockDiagonalCurvature(case.model, nn.CrossEntropyLoss(), data).engine == "autograd"
    assert so.Hessian(case.model, nn.CrossEntropyLoss(), data).engine_info[0].path in (
        "graph",
        "autograd",
    )


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_layers_fall_back_to_autograd_and_are_right(name, engine):
    run_engine(("refused", name), engine)


@pytest.mark.parametrize("name", list(BN_CASES))
def test_gauss_newton_step_with_batchnorm_matches_the_autograd_engine(name):
    # the optimizers' steps go through the same products (were 1-69% off with BatchNorm)
    steps = []
    for engine in ("sequential", "autograd"):
        case = bn_case(name)
        params = [p for p in case.model.parameters() if p.requires_grad]
        before = torch.cat([p.detach().flatten() for p in params])
        opt = so.GaussNewton(
            case.model, nn.CrossEntropyLoss(), cg_maxiter=200, cg_rtol=1e-12, engine=engine
        )
        opt.step(case.x, torch.arange(N) % C)
        steps.append(torch.cat([p.detach().flatten() for p in params]) - before)
    assert rel_err(steps[0], steps[1]) <= 1e-9
