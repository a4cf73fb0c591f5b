r"""Conformance matrix: every engine x layer x loss x data split against dense float64 references.

The cases are GENERATED from the registries (``models.py``, ``losses.py``,
``operators.py``, :data:`SPLITS`); adding an entry to one adds its tests. The full four-way
product would be large, so it is pruned into three blocks whose union covers every registry
entry with every engine:

- **layers x engines**: every model with every operator, on the model's default loss
  (cross-entropy; NLL for log-probability outputs) and unequal batches 3 + 4 + 1 (one batch for
  train-mode BatchNorm, whose outputs depend on the batch);
- **losses x splits x engines**: every loss with every data split (one batch, unequal batches,
  a one-shot generator, a ``DataLoader`` streamed with ``cache=False``) and every operator, on
  one small model per output kind (``models.SMALL_MODEL``);
- **layers x splits**: every model with every data split, through ``GGN(engine="autograd")``.

A case is generated only where :meth:`OpSpec.applies` says it is meaningful (a likelihood-based
Fisher needs a likelihood loss; ``engine="sequential"`` needs a model it supports; ...). Each
case (one test id) checks ``G @ v``, ``G @ V`` (three columns), ``to_dense()``, ``gradient()``
and ``loss`` (or the diagonal, the low-rank spectrum, or the Monte-Carlo mean) against the dense
reference of ``tests/reference.py`` on the concatenated data, to a relative Frobenius error of
``RTOL`` (the Monte-Carlo Fisher with ``MC_SAMPLES`` samples to ``MC_RTOL``). Cases failing on
the current code are listed, by cause, in ``known_failures.py`` and run as strict xfails.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from . import reference as ref
from .known_failures import known_failure
from .losses import DEFAULT_LOSS, LOSSES
from .models import MODELS, SMALL_MODEL
from .operators import OPERATORS

# float64; torch's own backward of in-place CELU (derivative from its output) is off by 5e-9
RTOL = 1e-8
MC_RTOL = 0.15
N = 8
SIZES = (3, 4, 1)
SPLITS = ("one", "unequal", "generator", "loader")


@dataclass(frozen=True)
class Case:
    op: str
    model: str
    loss: str
    split: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.model}-{self.loss}-{self.split}"


def _applies(case: Case) -> bool:
    return OPERATORS[case.op].applies(MODELS[case.model], LOSSES[case.loss], case.split)


def generate() -> list[Case]:
    """The pruned product (module docstring), deduplicated, filtered by ``applies``."""
    cases: dict[str, Case] = {}
    for model_name, model in MODELS.items():  # layers x engines
        split = "unequal" if model.per_sample else "one"
        for op in OPERATORS:
            case = Case(op, model_name, DEFAULT_LOSS[model.out], split)
            cases.setdefault(case.id, case)
    for loss_name, loss in LOSSES.items():  # losses x splits x engines
        for split in SPLITS:
            for op in OPERATORS:
                case = Case(op, SMALL_MODEL[loss.out], loss_name, split)
                cases.setdefault(case.id, case)
    for model_name, model in MODELS.items():  # layers x splits, one engine
        for split in SPLITS:
            case = Case("ggn.autograd", model_name, DEFAULT_LOSS[model.out], split)
            cases.setdefault(case.id, case)
    return [c for c in cases.values() if _applies(c)]


# ------------------------------------------------------------------------------ data
def _take(inputs: Any, idx: slice | int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@functools.cache
def _data(model: str, loss: str) -> tuple[Any, Tensor]:
    g = torch.Generator().manual_seed(1234)
    return MODELS[model].inputs(N, g), LOSSES[loss].targets(N, g)


def _batches(model: str, loss: str) -> list[tuple[Any, Tensor]]:
    X, y = _data(model, loss)
    out, start = [], 0
    for n in SIZES:
        out.append((_take(X, slice(start, start + n)), y[start : start + n]))
        start += n
    return out


def _split(model: str, loss: str, split: str) -> Any:
    X, y = _data(model, loss)
    if split == "one":
        return (X, y)
    batches = _batches(model, loss)
    if split == "unequal":
        return batches
    if split == "generator":
        return (b for b in batches)

    samples = [(_take(X, i), y[i]) for i in range(N)]
    return DataLoader(samples, batch_size=3)  # type: ignore[arg-type]  # 3 + 3 + 2, re-iterated


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name].build()


# ------------------------------------------------------------------------- references
@functools.cache
def _reference(model_name: str, loss_name: str, kind: str) -> Tensor:
    model, loss_fn = _model(model_name), LOSSES[loss_name].make()
    X, y = _data(model_name, loss_name)
    inputs = (X,)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    if kind == "loss":
        return ref.loss_value(model, loss_fn, inputs, y)
    if kind == "gradient":
        return ref.gradient(model, loss_fn, inputs, y)
    if kind == "ggn":
        return ref.dense_ggn(model, loss_fn, inputs, y)
    if kind == "hessian":
        return ref.dense_hessian(model, loss_fn, inputs, y)
    if kind == "ef":
        return ref.dense_empirical_fisher(model, loss_fn, inputs, y)
    if kind in ("ggn_blocks", "hessian_blocks"):
        return ref.block_diagonal(_reference(model_name, loss_name, kind[:-7]), sizes)
    if kind.startswith("pch"):
        return ref.pch_blocks(model, loss_fn, inputs, y, kind)
    if kind in ("ggn_reversed", "gradient_reversed"):
        perm = _reversed_order(sizes)
        base = _reference(model_name, loss_name, kind.split("_")[0])
        return base[perm][:, perm] if base.ndim == 2 else base[perm]
    raise KeyError(kind)


def _reversed_order(sizes: list[int]) -> Tensor:
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in reversed(range(len(sizes)))])


# ----------------------------------------------------------------------------- checks
def build(case: Case) -> Any:
    """The library's operator (or diagonal) of ``case``; None for an accepted refusal."""
    spec = OPERATORS[case.op]
    data = _split(case.model, case.loss, case.split)
    try:
        return spec.build(
            _model(case.model), LOSSES[case.loss].make(), data, case.split == "loader"
        )
    except ValueError as e:
        if spec.refusal is not None and spec.refusal in str(e):
            return None
        raise


def relative_error(got: Tensor, want: Tensor) -> float:
    """``||got - want|| / ||want||`` (Frobenius; the absolute error where ``want`` is 0)."""
    got = torch.as_tensor(got).detach().to(want.dtype)
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = want.norm().item()
    err = (got - want).norm().item()
    return err / scale if scale > 0 else err


def measure(case: Case, check: str, op: Any) -> float:
    """The relative error of one check of ``op`` (raises what the library raises)."""
    spec = OPERATORS[case.op]
    R = _reference(case.model, case.loss, spec.reference)
    gen = torch.Generator().manual_seed(7)
    P = R.shape[0]
    if check == "matvec":
        v = torch.randn(P, generator=gen, dtype=R.dtype)
        return relative_error(op @ v, R @ v)
    if check == "matmat":
        V = torch.randn(P, 3, generator=gen, dtype=R.dtype)
        return relative_error(op @ V, R @ V)
    if check in ("dense", "mc"):
        return relative_error(op.to_dense(), R)
    if check == "diag":
        return relative_error(op, R.diagonal())
    if check == "eigvalsh":  # the low-rank factor's nonzero spectrum is the GGN's top one
        got = op.eigvalsh().flip(0)
        m = min(got.numel(), P)
        return relative_error(got[:m], torch.linalg.eigvalsh(R).flip(0)[:m])
    grad_kind = "gradient_reversed" if spec.reference == "ggn_reversed" else "gradient"
    if check == "gradient":
        return relative_error(op.gradient(), _reference(case.model, case.loss, grad_kind))
    if check == "loss":
        return relative_error(op.loss, _reference(case.model, case.loss, "loss"))
    raise KeyError(check)


def errors(case: Case) -> dict[str, float]:
    """Every check's relative error (0 for an accepted refusal)."""
    spec = OPERATORS[case.op]
    _reference(case.model, case.loss, spec.reference)  # first: its errors are not the op's
    op = build(case)
    if op is None:
        return dict.fromkeys(spec.checks, 0.0)
    return {check: measure(case, check, op) for check in spec.checks}


def _params() -> Iterator[Any]:
    for case in generate():
        reason = known_failure(case.id)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_conformance(case: Case) -> None:
    tol = MC_RTOL if OPERATORS[case.op].checks == ("mc",) else RTOL
    bad = {check: err for check, err in errors(case).items() if not err <= tol}  # NaN fails
    assert not bad, f"{case.id}: relative errors {bad} > {tol:.0e}"
