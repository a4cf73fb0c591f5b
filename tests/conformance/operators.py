"""Registry of the library's curvature engines, as the conformance matrix builds and checks them.

Each :class:`OpSpec` builds one operator (or computes one diagonal) from (model, loss, data),
names the dense reference it must equal and the checks that apply to it, and says by
:meth:`OpSpec.applies` on which models and losses it is meaningful. Adding an entry adds its
tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import secondorder as so
from secondorder.curvature.lowrank import LowRankGGN

from .losses import LossSpec
from .models import ModelSpec

OPERATOR_CHECKS = ("matvec", "matmat", "dense", "gradient", "loss")
MC_SAMPLES = 3000
# references that differentiate the model's backward pass again
SECOND_ORDER = ("hessian", "hessian_blocks", "pch_clip", "pch_abs")


@dataclass(frozen=True)
class OpSpec:
    """One engine of the library.

    Attributes:
        build: ``build(model, loss_fn, data, streamed)`` returns the operator or the diagonal.
        reference: Which dense reference it equals (a key of ``test_matrix.REFERENCES``).
        checks: The checks that apply (``OPERATOR_CHECKS``, ``"eigvalsh"``, ``"diag"`` or
            ``"mc"``).
        needs: Model flags that must hold (``"seq"``, ``"block"``, ``"mlp"``, ``"chain"``).
        likelihood: Needs a likelihood loss.
        splits: The data splits it is checked on (None: all).
        refusal: Building may instead raise a ``ValueError`` whose message contains this
            (an accepted, clear refusal); None: it must not raise.
    """

    build: Callable[[nn.Module, Any, Any, bool], Any]
    reference: str
    checks: tuple[str, ...] = OPERATOR_CHECKS
    needs: tuple[str, ...] = ()
    likelihood: bool = False
    splits: tuple[str, ...] | None = None
    refusal: str | None = None

    def applies(self, model: ModelSpec, loss: LossSpec, split: str) -> bool:
        """Whether the operator is meaningful on (model, loss, split)."""
        if loss.out != model.out:
            return False
        if not model.per_sample and split != "one":  # batch statistics: one batch only
            return False
        if self.splits is not None and split not in self.splits:
            return False
        if self.likelihood and not loss.likelihood:
            return False
        if self.reference in SECOND_ORDER and not model.second_order:  # no reference exists
            return False
        return all(getattr(model, flag) for flag in self.needs)


def _cache(streamed: bool) -> dict[str, Any]:
    return {"cache": False} if streamed else {}


def _ggn(engine: str, **kw: Any) -> Callable[..., Any]:
    return lambda m, lf, d, s: so.GGN(m, lf, d, engine=engine, **kw, **_cache(s))


def _hessian(engine: str) -> Callable[..., Any]:
    return lambda m, lf, d, s: so.Hessian(m, lf, d, engine=engine, **_cache(s))


def _fisher(kind: str, engine: str, **kw: Any) -> Callable[..., Any]:
    return lambda m, lf, d, s: so.Fisher(m, lf, d, kind=kind, engine=engine, **kw, **_cache(s))


def _blocks(curvature: str, engine: str) -> Callable[..., Any]:
    return lambda m, lf, d, s: so.BlockDiagonalCurvature(
        m, lf, d, curvature=curvature, engine=engine
    )


def _pch(engine: str) -> Callable[..., Any]:
    return lambda m, lf, d, s: so.PCH(m, lf, d, engine=engine)


def _ggn_reversed(m: nn.Module, lf: Any, d: Any, s: bool) -> Any:
    params = [p for p in m.parameters() if p.requires_grad][::-1]
    return so.GGN(m, lf, d, engine="autograd", params=params, **_cache(s))


OPERATORS: dict[str, OpSpec] = {
    "ggn.sequential": OpSpec(_ggn("sequential"), "ggn", needs=("seq",)),
    "ggn.autograd": OpSpec(_ggn("autograd"), "ggn"),
    "ggn.factors": OpSpec(_ggn("auto", jacobian_factors=True), "ggn", needs=("seq", "mlp")),
    # params= in another order than the model's: the flat vector follows the given order, or a
    # clear refusal (issue 13 item 20)
    "ggn.params_reversed": OpSpec(_ggn_reversed, "ggn_reversed", refusal="order"),
    "ggn.block_diagonal": OpSpec(
        lambda m, lf, d, s: _ggn("autograd")(m, lf, d, s).block_diagonal(),
        "ggn_blocks",
        checks=("matvec", "matmat", "dense"),
    ),
    "hessian.block_diagonal": OpSpec(
        lambda m, lf, d, s: _hessian("autograd")(m, lf, d, s).block_diagonal(),
        "hessian_blocks",
        checks=("matvec", "matmat", "dense"),
    ),
    "hessian.mlp": OpSpec(_hessian("auto"), "hessian", needs=("mlp",)),
    "hessian.autograd": OpSpec(_hessian("autograd"), "hessian"),
    "hessian.graph": OpSpec(_hessian("graph"), "hessian"),
    "fisher_exact.sequential": OpSpec(
        _fisher("exact", "sequential"), "ggn", needs=("seq",), likelihood=True
    ),
    "fisher_exact.autograd": OpSpec(_fisher("exact", "autograd"), "ggn", likelihood=True),
    "fisher_empirical.sequential": OpSpec(
        _fisher("empirical", "sequential"), "ef", needs=("seq",), likelihood=True
    ),
    "fisher_empirical.autograd": OpSpec(_fisher("empirical", "autograd"), "ef", likelihood=True),
    "fisher_mc.autograd": OpSpec(
        _fisher(
            "mc", "autograd", num_samples=MC_SAMPLES, generator=torch.Generator().manual_seed(1)
        ),
        "ggn",
        checks=("mc",),
        likelihood=True,
        splits=("one",),
    ),
    "block_ggn.sequential": OpSpec(_blocks("ggn", "sequential"), "ggn_blocks", needs=("block",)),
    "block_ggn.autograd": OpSpec(_blocks("ggn", "autograd"), "ggn_blocks"),
    "block_hessian.sequential": OpSpec(
        _blocks("hessian", "sequential"), "hessian_blocks", needs=("block",)
    ),
    "block_hessian.autograd": OpSpec(_blocks("hessian", "autograd"), "hessian_blocks"),
    "block_pch_abs.sequential": OpSpec(
        _blocks("pch_abs", "sequential"), "pch_abs", needs=("block", "chain")
    ),
    "pch.sequential": OpSpec(_pch("sequential"), "pch_clip", needs=("block", "chain")),
    "pch.autograd": OpSpec(_pch("autograd"), "pch_clip", needs=("chain",)),
    "lowrank.kron": OpSpec(
        lambda m, lf, d, s: LowRankGGN(m, lf, d, engine="kron"),
        "ggn",
        checks=("dense", "gradient", "eigvalsh"),
        needs=("seq", "mlp"),
        likelihood=True,
    ),
    "lowrank.auto": OpSpec(  # the per-sample layer engine wherever it applies
        lambda m, lf, d, s: LowRankGGN(m, lf, d),
        "ggn",
        checks=("dense", "gradient", "eigvalsh"),
        likelihood=True,
    ),
    "lowrank.autograd": OpSpec(
        lambda m, lf, d, s: LowRankGGN(m, lf, d, engine="autograd"),
        "ggn",
        checks=("dense", "gradient", "eigvalsh"),
        likelihood=True,
    ),
    "ggn_diagonal": OpSpec(
        lambda m, lf, d, s: so.ggn_diagonal(m, lf, d), "ggn", checks=("diag",), likelihood=True
    ),
    "ef_diagonal": OpSpec(
        lambda m, lf, d, s: so.empirical_fisher_diagonal(m, lf, d),
        "ef",
        checks=("diag",),
        likelihood=True,
    ),
}
