"""Validation of an optimizer's ``state_dict`` before ``load_state_dict`` applies it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["META_KEY", "settle_loaded_state", "validate_state_dict"]

META_KEY = "secondorder"  # the state_dict entry naming the optimizer class and shapes


# keys torch.optim.Optimizer adds to `defaults` itself (``__setstate__``, after a copy or an
# unpickling), which a state saved before the copy does not hold
_TORCH_KEYS = frozenset({"differentiable"})
# hyperparameters added to every optimizer later: a state saved before gets their defaults
_LATER_KEYS = frozenset({"weight_decay", "max_grad_norm", "momentum"})


def validate_state_dict(opt: Any, state_dict: Any) -> None:
    """Check that ``state_dict`` belongs to the optimizer ``opt``.

    Args:
        opt: A :class:`~secondorder.optim.base.CurvatureOptimizer`.
        state_dict: What ``load_state_dict`` received.

    Raises:
        ValueError: For a state of another optimizer class or model (parameter count or
            shapes), missing hyperparameters, invalid values or a warm start of another length.
    """
    name = type(opt).__name__
    keys = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else None
    if keys is None or not {"state", "param_groups"} <= set(keys):
        raise ValueError(
            f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (from "
            f"state_dict()), got {type(state_dict).__name__}"
            + (f" with keys {keys}" if keys is not None else "")
        )
    meta = state_dict.get(META_KEY)
    saved_groups = state_dict["param_groups"]
    if isinstance(meta, Mapping) and meta.get("optimizer") not in (None, name):
        raise ValueError(
            f"{name}.load_state_dict: the state is of a {meta['optimizer']}, not of a {name}"
        )
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state has {len(saved_groups)} param groups, this "
            f"optimizer {len(opt.param_groups)} (another model or parameter selection)"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{name}.load_state_dict: param group {i} of the state has "
                f"{len(saved['params'])} parameters, this optimizer's {len(group['params'])} "
                "(another model or parameter selection)"
            )
        missing = sorted(set(opt.defaults) - set(saved) - _TORCH_KEYS - _LATER_KEYS)
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: param group {i} of the state lacks {missing}: it is "
                f"not the state of a {name}"
            )
        try:
            opt._check_group({**saved, "params": group["params"]})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}.load_state_dict: param group {i}: {err}") from None
    if isinstance(meta, Mapping) and "param_shapes" in meta:
        for i, (shapes, group) in enumerate(zip(meta["param_shapes"], opt.param_groups)):
            for j, (shape, p) in enumerate(zip(shapes, group["params"])):
                if list(shape) != list(p.shape):
                    raise ValueError(
                        f"{name}.load_state_dict: parameter {j} of param group {i} has "
                        f"shape {tuple(shape)} in the state and {tuple(p.shape)} here "
                        "(another model)"
                    )
    dim = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)
    for entry in state_dict["state"].values():
        for key in opt._WARM_START_KEYS:
            value = entry.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.numel() != dim):
                got = value.numel() if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{name}.load_state_dict: the state's {key!r} has {got} entries, the "
                    f"trainable parameters {dim} (another model)"
                )


def settle_loaded_state(opt: Any, common_defaults: Mapping[str, Any]) -> None:
    """After torch's ``load_state_dict``: defaults, the global state's place, the generator.

    Hyperparameters added to every optimizer later (``common_defaults``) get the optimizer's
    defaults in a state saved before them; the global state moves to the first parameter of
    the first group where an older checkpoint kept it elsewhere; the random generator (if any)
    takes the saved state.
    """
    for group in opt.param_groups:
        for key in common_defaults:
            group.setdefault(key, opt.defaults[key])
    anchor = opt.param_groups[0]["params"][0]
    if "step" not in opt.state.get(anchor, {}):
        for p in [p for g in opt.param_groups for p in g["params"]]:
            if "step" in opt.state.get(p, {}):
                opt.state[anchor] = opt.state.pop(p)
                break
    gen_state = opt.global_state.get("generator_state")
    if opt.generator is not None and gen_state is not None:
        opt.generator.set_state(gen_state.to("cpu", torch.uint8))
