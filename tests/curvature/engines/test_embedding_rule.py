"""The Embedding rule with ``padding_idx`` and its refusals.

``torch.func.jvp`` of ``F.embedding`` ignores ``padding_idx`` while its reverse mode gives the
padding row no gradient; the rule follows the reverse mode in both products, so the reference
here is the Jacobian by ``jacrev`` (reverse mode), and ``J`` and ``J^T`` must be transposes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev
from torch.nn import functional as F

from secondorder.curvature.layers import rule_for

DT = torch.float64


@pytest.mark.parametrize("pad", [0, 3, -1])
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_padding_products_are_the_reverse_mode_jacobian(pad, shape):
    torch.manual_seed(0)
    module = nn.Embedding(5, 3, padding_idx=pad).to(DT)
    rule, why = rule_for(module)
    assert rule is not None, why
    idx = torch.randint(0, 5, shape)
    idx.view(-1)[0] = module.padding_idx  # at least one padding position
    w = module.weight.detach()
    out, ctx = rule.forward(module, idx, {"weight": w})
    torch.testing.assert_close(out, module(idx))
    J = jacrev(lambda w_: F.embedding(idx, w_, module.padding_idx))(w).reshape(out.numel(), -1)
    dw = torch.randn(3, *w.shape, dtype=DT)
    for k in range(3):
        jv = rule.jvp(module, ctx, None, {"weight": dw[k]}, False)
        torch.testing.assert_close(jv.reshape(-1), J @ dw[k].reshape(-1))
    batched = rule.jvp(module, ctx, None, {"weight": dw}, True)
    torch.testing.assert_close(batched.reshape(3, -1), dw.reshape(3, -1) @ J.T)
    U = torch.randn(3, *out.shape, dtype=DT)
    g = torch.zeros(3, *w.shape, dtype=DT)
    assert rule.vjp(module, ctx, U, True, {"weight": g}, True) is None
    torch.testing.assert_close(g.reshape(3, -1), U.reshape(3, -1) @ J)
    assert g[:, module.padding_idx].abs().max() == 0


def test_graph_engine_serves_embeddings_and_refuses_options():
    import secondorder as so

    for kwargs, path_node in [({}, None), ({"max_norm": 1.0}, "emb"), ({"sparse": True}, "emb")]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(6, 3, **kwargs), nn.Flatten(), nn.Linear(6, 2)).to(DT)
        X, y = torch.randint(0, 6, (4, 2)), torch.randint(0, 2, (4,))
        if kwargs.get("sparse"):
            model[0].sparse = True
        try:
            info = so.GGN(model, nn.CrossEntropyLoss(), (X, y)).engine_info[0]
        except (RuntimeError, ValueError, TypeError) as err:  # a clear refusal is acceptable
            assert kwargs, err
            continue
        if path_node is None:
            assert info.path == "graph" and not info.autograd_nodes
        else:  # not the rule: autograd on that node, or the whole model
            assert info.autograd_nodes or info.path == "autograd"
