"""How curvature products are computed: engines over the model's computation.

:mod:`.dispatch` is the one place an engine is chosen (:func:`select`). :mod:`.graph` follows the
model as a traced graph of nodes (``nn.Sequential`` is a chain), each with a layer rule
(:mod:`..layers`), an op rule (:mod:`.ops`) or autograd for that node alone (:mod:`.steps`);
:mod:`.memory` holds its memory-saving rewrites.
"""

from .dispatch import select
from .graph import GraphLinearization, graph_linearization, trace

__all__ = ["GraphLinearization", "graph_linearization", "select", "trace"]
