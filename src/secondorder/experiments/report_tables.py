"""Markdown tables of experiment results (:func:`markdown_table`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["markdown_table"]


def _format_cell(value: Any, spec: str) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = format(value, spec) if math.isfinite(value) else str(value)
    elif isinstance(value, int) and spec and spec[-1] in "eEfFgG%":
        text = format(value, spec)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    floatfmt: str = ".4g",
    formats: Mapping[str, str] | None = None,
) -> str:
    """Format a list of dicts as a GitHub-flavoured markdown table.

    Floats are formatted with ``floatfmt`` (or the column's entry of ``formats``), missing
    values and ``None`` are left empty, booleans print as yes/no, and ``|`` is escaped.
    Columns whose values are all numbers are right-aligned.

    Args:
        rows: One mapping per row.
        columns: Column keys, in order; default: every key, in order of first appearance.
        floatfmt: Format spec for floats, e.g. ``".4g"`` or ``".2e"``.
        formats: Per-column format specs overriding ``floatfmt`` (also applied to ints).

    Returns:
        The table, ending with a newline.

    Raises:
        ValueError: If there are no columns to show.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("markdown_table needs at least one column, got none")
    formats = formats or {}
    body = [
        [_format_cell(row.get(col), formats.get(col, floatfmt)) for col in columns] for row in rows
    ]

    def numeric(col: str) -> bool:
        values = [row.get(col) for row in rows if row.get(col) is not None]
        return bool(values) and all(
            isinstance(v, (int, float, np.number, Tensor)) and not isinstance(v, bool)
            for v in values
        )

    header = "| " + " | ".join(_format_cell(c, "") for c in columns) + " |"
    rule = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    lines = [header, rule] + ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
