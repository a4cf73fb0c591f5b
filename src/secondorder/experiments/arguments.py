"""Argument types for the command line: each refuses what the studies cannot use.

Each function parses one option's text for ``argparse`` (``type=...``) and raises
``argparse.ArgumentTypeError`` with the expected range, which argparse prints as
``secondorder <study>: error: argument --x: ...`` with exit code 2 (a usage error), before
any data is read or any training starts.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "seed",
]

_SEED_MAX = 2**63 - 1


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ``>= 1``.

    Args:
        text: The option's text.

    Returns:
        The value.
    """
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer ``>= 0``.

    Args:
        text: The option's text.

    Returns:
        The value.
    """
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed, an integer in ``[0, 2**63 - 1]`` (what torch and NumPy both accept).

    Args:
        text: The option's text.

    Returns:
        The value.
    """
    value = _int(text, "an integer seed")
    if not 0 <= value <= _SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1], got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number ``> 0``.

    Args:
        text: The option's text.

    Returns:
        The value.
    """
    value = _float(text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number ``>= 0``.

    Args:
        text: The option's text.

    Returns:
        The value.
    """
    value = _float(text, "a non-negative number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value:g}")
    return value
