"""The names the library accepts, listed once: engines, curvature matrices, Fisher kinds.

Every constructor validates against these tuples (:func:`~secondorder._checks.check_choice`),
so a name is added or renamed here and nowhere else.

Engines say HOW products are computed: ``"graph"`` the model traced as a graph of nodes with one
rule per layer (:mod:`~secondorder.curvature.engines.graph`; ``nn.Sequential`` is a chain),
``"autograd"`` the generic path through ``torch.func`` and double backward for any module,
``"auto"`` the best that applies (:func:`~secondorder.curvature.engines.dispatch.select` for
:class:`~.GGN` and the Fisher kinds). ``"sequential"`` is, for :class:`~.GGN` and the Fisher
kinds, an alias of ``"graph"`` (the name of the former hand-written ``nn.Sequential`` engine);
for the block-diagonal operators, :class:`~.lowrank.LowRankGGN` (its Kronecker-factored
columns) and the Hessian it still names their hand-written module-wise paths.
"""

from __future__ import annotations

from typing import Literal, get_args

from .._checks import check_choice

__all__ = [
    "BLOCK_CURVATURES",
    "CURVATURES",
    "EIGENSOLVERS",
    "ENGINES",
    "ENGINE_PATHS",
    "NON_GRAPH_ENGINES",
    "FISHER_KINDS",
    "OPTIMIZER_CURVATURES",
    "PCH_MODIFICATIONS",
    "Curvature",
    "Eigensolver",
    "Engine",
    "EnginePath",
    "FisherKind",
    "canonical_engine",
]

Engine = Literal["auto", "sequential", "autograd", "graph"]
ENGINES: tuple[str, ...] = get_args(Engine)
# the operators that have no graph engine (block-diagonal, low-rank) take these
NON_GRAPH_ENGINES = ("auto", "sequential", "autograd")
ENGINE_ALIASES = {"kron": "sequential"}  # LowRankGGN's former name of its hand-written path
#: the paths that compute products, as :func:`~.engines.dispatch.select` chooses them and
#: :class:`~.linearization.EngineInfo` reports them
EnginePath = Literal["graph", "factored", "autograd", "mlp_hessian"]
ENGINE_PATHS: tuple[str, ...] = get_args(EnginePath)

Curvature = Literal[
    "ggn", "hessian", "fisher", "fisher_mc", "empirical_fisher", "pch_clip", "pch_abs"
]
CURVATURES: tuple[str, ...] = get_args(Curvature)
# the matrices each family of methods offers
OPTIMIZER_CURVATURES = ("ggn", "hessian", "fisher", "fisher_mc", "empirical_fisher")
BLOCK_CURVATURES = ("ggn", "hessian", "pch_abs", "pch_clip")

FisherKind = Literal["exact", "mc", "empirical"]
FISHER_KINDS: tuple[str, ...] = get_args(FisherKind)

PCHModification = Literal["clip", "abs"]
PCH_MODIFICATIONS: tuple[str, ...] = get_args(PCHModification)

Eigensolver = Literal["auto", "torch", "lapack"]
EIGENSOLVERS: tuple[str, ...] = get_args(Eigensolver)


def canonical_engine(engine: object, allowed: tuple[str, ...] = ENGINES) -> str:
    """``engine`` validated against ``allowed`` (old aliases mapped to their name).

    Args:
        engine: The engine argument.
        allowed: The engines the caller offers (default :data:`ENGINES`).

    Returns:
        The engine's name.

    Raises:
        ValueError: ``"engine must be one of ('auto', 'sequential', 'autograd', 'graph'), ..."``.
    """
    if isinstance(engine, str):
        engine = ENGINE_ALIASES.get(engine, engine)
    check_choice("engine", engine, allowed)
    assert isinstance(engine, str)
    return engine
