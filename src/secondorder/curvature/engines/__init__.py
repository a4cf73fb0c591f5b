"""How curvature products are computed: engines over the model's computation.

:mod:`.graph` follows the model as a traced graph of nodes, each with a layer rule
(:mod:`..layers`), an op rule (:mod:`.ops`) or autograd for that node alone (:mod:`.steps`).
"""

from .graph import GraphLinearization, graph_linearization, trace

__all__ = ["GraphLinearization", "graph_linearization", "trace"]
