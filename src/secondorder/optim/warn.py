"""Warnings that point at the caller's line, however deep in the library they are raised."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_at_caller"]

_INSIDE = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the secondorder package
    os.path.dirname(os.path.abspath(torch.optim.__file__)),  # torch.optim's step wrappers
)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the first frame outside secondorder and torch.optim as location."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
