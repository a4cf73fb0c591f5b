r"""One registry of layer rules: module type -> :class:`~.base.Rule` (one file per family).

:func:`rule_for` returns the rule that computes a module exactly, or the reason there is none
(the type is not registered, the module has hooks or an instance-level ``forward``, or the rule
does not honour one of its options). Engines send a module without a rule to autograd. A new
layer is one file here plus its line in :data:`RULES`; the registry-wide contract test
(``tests/curvature/engines/test_layer_rules.py``) checks every rule on its file's ``EXAMPLES``
against ``torch.func.jvp``/``vjp`` of the single module.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..activations import ACTIVATIONS
from . import batchnorm, conv, elementwise, embedding, linear, norm, pooling, reshape
from .base import Example, Rule

__all__ = ["EXAMPLES", "RULES", "Example", "Rule", "rule_for"]

_ACT = elementwise.ElementwiseRule()
_CONV = conv.ConvRule()
_BN = batchnorm.BatchNormRule()  # by the statistics the module uses (eval or batch)
_RESHAPE = reshape.ReshapeRule()
_DROPOUT = reshape.DropoutRule()  # one fixed mask per forward pass in training mode
_MAX = pooling.MaxPoolRule()
_AVG = pooling.AveragePoolRule()

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear.LinearRule(),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.BatchNorm1d: _BN,
    nn.BatchNorm2d: _BN,
    nn.BatchNorm3d: _BN,
    nn.LayerNorm: norm.LayerNormRule(),
    nn.GroupNorm: norm.GroupNormRule(),
    nn.Flatten: _RESHAPE,
    nn.Unflatten: _RESHAPE,
    nn.Identity: _RESHAPE,
    nn.Dropout: _DROPOUT,
    nn.Dropout1d: _DROPOUT,
    nn.Dropout2d: _DROPOUT,
    nn.Dropout3d: _DROPOUT,
    nn.MaxPool1d: _MAX,
    nn.MaxPool2d: _MAX,
    nn.MaxPool3d: _MAX,
    nn.AvgPool1d: _AVG,
    nn.AvgPool2d: _AVG,
    nn.AvgPool3d: _AVG,
    nn.AdaptiveAvgPool1d: _AVG,
    nn.AdaptiveAvgPool2d: _AVG,
    nn.AdaptiveAvgPool3d: _AVG,
    **dict.fromkeys(ACTIVATIONS, _ACT),
    # sequence layers (issue 15)
    nn.Embedding: embedding.EmbeddingRule(),
    nn.RMSNorm: norm.RMSNormRule(),
    # attention: the output projection of nn.MultiheadAttention (a Linear)
    nn.modules.linear.NonDynamicallyQuantizableLinear: linear.LinearRule(),
}

#: modules and input shapes of the contract test, from every family's file
EXAMPLES: list[Example] = [
    *linear.EXAMPLES,
    *conv.EXAMPLES,
    *norm.EXAMPLES,
    *batchnorm.EXAMPLES,
    *elementwise.EXAMPLES,
    *reshape.EXAMPLES,
    *pooling.EXAMPLES,
    *embedding.EXAMPLES,
    # attention
    Example(
        lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3), (2, 3, 4), "mha_out_proj"
    ),
]


def rule_for(module: nn.Module) -> tuple[Rule | None, str | None]:
    """The rule computing ``module`` exactly, or ``(None, reason)``.

    Args:
        module: Any module.

    Returns:
        ``(rule, None)``, or ``(None, why)`` when the exact type has no registered rule (a
        subclass may change ``forward``), the module has hooks, an instance-level ``forward``
        or parametrized parameters, or the rule refuses one of its options.
    """
    rule = RULES.get(type(module))
    if rule is None:
        return None, f"{type(module).__name__} has no layer rule"
    if "forward" in vars(module):
        return None, "it has an instance-level forward"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return None, "it has hooks"
    if parametrize.is_parametrized(module):
        return None, "its parameters are parametrized"
    why = rule.unsupported(module)
    return (None, why) if why is not None else (rule, None)
