"""The one set of argument validators and message constants (curvature and optim import these).

Each validator raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the argument,
what was expected and what came, and returns nothing (or the normalised value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_choice",
    "check_positive",
    "finite_floats",
]


def check_positive(
    name: str, value: Any, *, allow_zero: bool = False, integer: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite positive (or non-negative) number.

    Args:
        name: The argument's name, for the message.
        value: Its value.
        allow_zero: Accept 0.
        integer: Require an ``int``.

    Raises:
        ValueError: If the value is invalid.
    """
    kind = "int" if integer else "number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name} value: {value!r} (expected a finite {kind} {bound})")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Args:
        name: The argument's name, for the message.
        value: Its value.
        choices: The accepted values.

    Raises:
        ValueError: ``"<name> must be one of <choices>, got <value>"``.
    """
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        ok = False  # True == 1: a bool is not an int choice
    else:
        try:
            ok = value in choices
        except TypeError:  # unhashable or incomparable
            ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def finite_floats(name: str, value: float | Sequence[float], n: int) -> list[float]:
    """One finite float per item from a float or a sequence of ``n``.

    Args:
        name: The argument's name, for the message.
        value: A number (used ``n`` times) or a list or tuple of ``n`` numbers.
        n: How many are needed.

    Returns:
        The ``n`` floats.

    Raises:
        ValueError: For a sequence of another length, or values that are not finite floats.
    """
    values: list[Any] = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: expected one value per index ({n}), got {len(values)}")
    try:
        floats = [float(s) for s in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected floats, got {value!r}") from None
    if not all(math.isfinite(s) for s in floats):
        raise ValueError(f"{name}: expected finite floats, got {floats}")
    return floats
