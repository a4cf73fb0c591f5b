"""Cases of the conformance matrix that fail on the current code, by cause (issue 13 items).

A key is a pattern of test ids ``{op}-{model}-{loss}-{split}``: four fields separated
by ``-``, each ``*`` (any value) or alternatives separated by ``|``. Every matching test runs as
``pytest.mark.xfail(strict=True)``, so when a fix lands its tests XPASS and fail: then delete
the entry (or the fixed alternatives). A test gets the reason of the most specific matching
entry (fewest ``*``). Each reason names the issue item, the cause, and the
relative error measured against the dense reference (or what the library raises). A test that
fails for two causes is listed under the first one checked.
"""

from __future__ import annotations

KNOWN_FAILURES: dict[str, str] = {
    # ---- issue 13 item 1 (10 cases):
    # the Sequential engine drops BatchNorm's own tangent when none arrives from below
    "block_ggn.autograd-bn2d|bn_middle-ce-unequal": (
        "issue 13 item 1: the Sequential engine drops BatchNorm's own tangent when none "
        "arrives from below; rel. err. 0.17-0.38"
    ),
    (
        "block_ggn.autograd|fisher_empirical.sequential|fisher_exact.sequential|"
        "ggn.sequential-bn_above_frozen|bn_first-ce-unequal"
    ): (
        "issue 13 item 1: the Sequential engine drops BatchNorm's own tangent when none "
        "arrives from below; rel. err. 0.098-2"
    ),
    # ---- issue 13 item 2 (5 cases):
    # in-place activation: derivative taken from the overwritten input
    (
        "block_ggn.autograd|fisher_empirical.sequential|fisher_exact.sequential|ggn.factors|"
        "ggn.sequential-act_silu_inplace-ce-unequal"
    ): (
        "issue 13 item 2: in-place activation: derivative taken from the overwritten input; "
        "rel. err. 0.074-0.16"
    ),
    # ---- issue 13 item 3 (5 cases):
    # Softplus(beta, threshold): the linear region above the threshold is ignored
    (
        "block_ggn.autograd|fisher_empirical.sequential|fisher_exact.sequential|ggn.factors|"
        "ggn.sequential-act_softplus-ce-unequal"
    ): (
        "issue 13 item 3: Softplus(beta, threshold): the linear region above the threshold is"
        " ignored; rel. err. 0.15-0.25"
    ),
    # ---- issue 13 item 4 (192 cases):
    # batches weighted by N_b/N, not by the loss's own normalisation
    (
        "block_ggn.autograd|block_ggn.sequential|block_hessian.autograd|"
        "block_hessian.sequential|block_pch_abs.sequential|ef_diagonal|"
        "fisher_empirical.autograd|fisher_empirical.sequential|fisher_exact.autograd|"
        "fisher_exact.sequential|ggn.autograd|ggn.block_diagonal|ggn.factors|ggn.sequential|"
        "ggn_diagonal|hessian.autograd|hessian.block_diagonal|hessian.mlp|lowrank.autograd|"
        "lowrank.kron|pch.autograd|pch.sequential-act_tanh-ce_ignore|ce_ignore_batch-"
        "generator|loader|unequal"
    ): (
        "issue 13 item 4: batches weighted by N_b/N, not by the loss's own normalisation; "
        "rel. err. 0.082-0.72, NaN"
    ),
    (
        "block_ggn.autograd|block_ggn.sequential|block_hessian.autograd|"
        "block_hessian.sequential|block_pch_abs.sequential|ggn.autograd|ggn.block_diagonal|"
        "ggn.factors|ggn.sequential|hessian.autograd|hessian.block_diagonal|hessian.mlp|"
        "pch.autograd|pch.sequential-act_tanh-ce_weight-generator|loader|unequal"
    ): (
        "issue 13 item 4: batches weighted by N_b/N, not by the loss's own normalisation; "
        "rel. err. 0.035-0.099"
    ),
    (
        "block_ggn.autograd|block_hessian.autograd|ggn.autograd|hessian.autograd|"
        "hessian.block_diagonal|pch.autograd-mlp_logsoftmax-kldiv_batchmean-generator|loader|"
        "unequal"
    ): (
        "issue 13 item 4: batches weighted by N_b/N, not by the loss's own normalisation; "
        "rel. err. 1.6-2.1"
    ),
    # ---- issue 13 item 5 (44 cases): a subclass with its own forward gets the parent's closed form
    (
        "block_ggn.autograd|block_ggn.sequential|block_hessian.autograd|"
        "block_hessian.sequential|block_pch_abs.sequential|ggn.autograd|ggn.block_diagonal|"
        "ggn.factors|ggn.sequential|hessian.mlp|pch.sequential-act_tanh-ce_subclass-*"
    ): (
        "issue 13 item 5: a subclass with its own forward gets the parent's closed form; rel."
        " err. 0.5-0.5"
    ),
    # ---- issue 13 item 7 (24 cases): the default CPU attention kernel has no double backward
    (
        "block_ggn.autograd|block_hessian.autograd|fisher_empirical.autograd|"
        "fisher_exact.autograd|ggn.autograd|ggn.block_diagonal|ggn.params_reversed|"
        "hessian.autograd|hessian.block_diagonal-attention|transformer-ce-unequal"
    ): (
        "issue 13 item 7: the default CPU attention kernel has no double backward; raises "
        "RuntimeError"
    ),
    "ggn.autograd-attention|transformer-ce-generator|loader|one": (
        "issue 13 item 7: the default CPU attention kernel has no double backward; raises "
        "RuntimeError"
    ),
    # ---- issue 13 item 8 (4 cases): GRU/LSTM: the per-sample (vmap) path crashes
    "ef_diagonal|ggn_diagonal-gru|lstm-ce-unequal": (
        "issue 13 item 8: GRU/LSTM: the per-sample (vmap) path crashes; raises RuntimeError"
    ),
    # ---- issue 13 item 8 (4 cases):
    # GroupNorm: the batched double backward (is_grads_batched) crashes
    (
        "block_hessian.autograd|hessian.autograd|hessian.block_diagonal|pch.autograd-"
        "groupnorm-ce-unequal"
    ): (
        "issue 13 item 8: GroupNorm: the batched double backward (is_grads_batched) crashes; "
        "raises RuntimeError"
    ),
    # ---- issue 13 item 8 (2 cases):
    # train-mode BatchNorm: in-place running-statistics update under vmap
    "ef_diagonal|ggn_diagonal-bn_train-ce-one": (
        "issue 13 item 8: train-mode BatchNorm: in-place running-statistics update under "
        "vmap; raises RuntimeError"
    ),
    # ---- issue 13 item 9 (25 cases):
    # in-place activation in the block-diagonal engine ('leaf Variable ... in-place')
    (
        "block_ggn.sequential|block_hessian.sequential|block_pch_abs.sequential|"
        "pch.sequential-act_celu_inplace|act_elu_inplace|act_hardswish_inplace|"
        "act_hardtanh_inplace|act_mish_inplace|act_selu_inplace-ce-unequal"
    ): (
        "issue 13 item 9: in-place activation in the block-diagonal engine ('leaf Variable "
        "... in-place'); raises RuntimeError"
    ),
    "block_ggn.sequential-act_hardsigmoid_inplace-ce-unequal": (
        "issue 13 item 9: in-place activation in the block-diagonal engine ('leaf Variable "
        "... in-place'); raises RuntimeError"
    ),
    # ---- issue 13 item 9 (6 cases): the PCH's autograd engine refuses in-place activations
    (
        "pch.autograd-act_celu_inplace|act_elu_inplace|act_hardswish_inplace|act_mish_inplace"
        "|act_selu_inplace|act_silu_inplace-ce-unequal"
    ): (
        "issue 13 item 9: the PCH's autograd engine refuses in-place activations; raises ValueError"
    ),
    # ---- issue 13 item 18 (1 cases): one batch of dict inputs is taken for a list of batches
    "ggn.autograd-dict_input-ce-one": (
        "issue 13 item 18: one batch of dict inputs is taken for a list of batches; raises "
        "ValueError"
    ),
    # ---- issue 13 item 19 (12 cases):
    # empirical Fisher rows are samples, not positions, for MSE/BCE
    "ef_diagonal|fisher_empirical.autograd|fisher_empirical.sequential-conv1d-mse_seq-*": (
        "issue 13 item 19: empirical Fisher rows are samples, not positions, for MSE/BCE; "
        "rel. err. 0.18-1"
    ),
    # ---- issue 13 item 20 (125 cases):
    # params= in another order is silently reordered to the model's order
    "ggn.params_reversed-*-ce-unequal": (
        "issue 13 item 20: params= in another order is silently reordered to the model's "
        "order; rel. err. 1.4-6.7"
    ),
    "ggn.params_reversed-act_tanh-*-*": (
        "issue 13 item 20: params= in another order is silently reordered to the model's "
        "order; rel. err. 1.1-1.7"
    ),
    "ggn.params_reversed-bn_train-ce-one": (
        "issue 13 item 20: params= in another order is silently reordered to the model's "
        "order; rel. err. 1.4"
    ),
    "ggn.params_reversed-conv1d-ce_seq|ce_seq_ignore_sum|mse_seq-*": (
        "issue 13 item 20: params= in another order is silently reordered to the model's "
        "order; rel. err. 1.4-1.9"
    ),
    "ggn.params_reversed-mlp_logsoftmax-kldiv_batchmean|nll-*": (
        "issue 13 item 20: params= in another order is silently reordered to the model's "
        "order; rel. err. 1.5-2.9"
    ),
    # ---- new (18 cases):
    # Hardsigmoid: autograd GGN/Fisher products differentiate hardsigmoid_backward (torch cannot)
    (
        "block_ggn.autograd|fisher_empirical.autograd|fisher_exact.autograd|ggn.autograd|"
        "ggn.block_diagonal|ggn.params_reversed-act_hardsigmoid|act_hardsigmoid_inplace-ce-"
        "unequal"
    ): (
        "new: Hardsigmoid: autograd GGN/Fisher products differentiate hardsigmoid_backward "
        "(torch cannot); raises RuntimeError"
    ),
    "ggn.autograd-act_hardsigmoid|act_hardsigmoid_inplace-ce-generator|loader|one": (
        "new: Hardsigmoid: autograd GGN/Fisher products differentiate hardsigmoid_backward "
        "(torch cannot); raises RuntimeError"
    ),
    # ---- new (8 cases):
    # the block-diagonal engine refuses ReLU6, which its docstring lists as supported
    (
        "block_ggn.sequential|block_hessian.sequential|block_pch_abs.sequential|"
        "pch.sequential-act_relu6|act_relu6_inplace-ce-unequal"
    ): (
        "new: the block-diagonal engine refuses ReLU6, which its docstring lists as "
        "supported; raises ValueError"
    ),
    # ---- new (2 cases): the per-sample (vmap) diagonals do not split dict inputs
    "ef_diagonal|ggn_diagonal-dict_input-ce-unequal": (
        "new: the per-sample (vmap) diagonals do not split dict inputs; raises RuntimeError"
    ),
}


def matches(pattern: str, test_id: str) -> bool:
    """Whether ``test_id`` matches ``pattern`` (module docstring)."""
    fields, values = pattern.split("-"), test_id.split("-")
    assert len(fields) == len(values) == 4, (pattern, test_id)
    return all(f == "*" or v in f.split("|") for f, v in zip(fields, values))


def known_failure(test_id: str) -> str | None:
    """The reason of the most specific entry (fewest ``*``) matching ``test_id``, or None."""
    found = [(pat.count("*"), why) for pat, why in KNOWN_FAILURES.items() if matches(pat, test_id)]
    return min(found, key=lambda x: x[0])[1] if found else None
