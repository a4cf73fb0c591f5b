"""The one set of argument validators and message constants (curvature and optim import these).

Each validator raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the argument,
what was expected and what came, and returns nothing (or the normalised value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LIKELIHOOD_LOSSES",
    "check_choice",
    "check_chunk_size",
    "check_int",
    "check_positive",
    "finite_floats",
]

LIKELIHOOD_LOSSES = (
    "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss with reduction 'mean' or 'sum' "
    "and no weights"
)
"""The losses with a likelihood (a symmetric factor of their Hessian; MC and exact Fisher)."""


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


def check_int(name: str, value: Any, minimum: int = 1, note: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a bool) ``>= minimum``.

    Args:
        name: The argument's name, for the message.
        value: Its value.
        minimum: The smallest accepted value.
        note: Appended to the expectation in parentheses (e.g. what 0 means).

    Raises:
        ValueError: ``"<name> must be a positive int, got <value>"`` (``minimum=1``) or
            ``"<name> must be an int >= <minimum> (<note>), got <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        what += f" ({note})" if note else ""
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_chunk_size(chunk_size: Any) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is None or an int >= 1.

    Raises:
        ValueError: ``"chunk_size must be None or an int >= 1, got <value>"``.
    """
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
