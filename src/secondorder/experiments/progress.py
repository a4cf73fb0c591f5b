"""Progress of a study's loops: a ``tqdm`` bar on a terminal, periodic log lines elsewhere.

When stderr is not a terminal (a log file, a pipe, CI), a bar would print nothing readable, so
:func:`progress` writes one line when a loop starts, one every ``interval`` seconds and one when
it ends::

    Adam: 0/200
    Adam: 85/200 (42%), 15.0 s
    Adam: done, 200 items in 34.9 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

__all__ = ["log_progress", "progress"]

T = TypeVar("T")


def log_progress(
    iterable: Iterable[T],
    desc: str | None = None,
    *,
    total: int | None = None,
    interval: float = 15.0,
    file: IO[str] | None = None,
) -> Iterator[T]:
    """Yield the items of ``iterable``, writing a progress line at most every ``interval`` s.

    Args:
        iterable: The iterable to wrap.
        desc: Text in front of each line (default ``"progress"``).
        total: Number of items; default ``len(iterable)`` where it has one.
        interval: Seconds between two lines while the loop runs.
        file: Where the lines go (default: stderr).

    Yields:
        The items of ``iterable``.
    """
    out = sys.stderr if file is None else file
    name = desc or "progress"
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    of = f"/{total}" if total is not None else ""

    def write(text: str) -> None:
        print(f"{name}: {text}", file=out, flush=True)

    write(f"0{of}")
    start = last = time.perf_counter()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= interval:
            share = f" ({100 * count / total:.0f}%)" if total else ""
            write(f"{count}{of}{share}, {now - start:.1f} s")
            last = now
    write(f"done, {count} items in {time.perf_counter() - start:.1f} s")


def progress(
    iterable: Iterable[T],
    desc: str | None = None,
    *,
    enabled: bool | None = None,
    total: int | None = None,
) -> Iterator[T]:
    """Wrap an iterable in a progress display on stderr.

    Args:
        iterable: The iterable to wrap.
        desc: Text in front of the bar or the lines.
        enabled: ``False`` shows nothing; ``True`` or ``None`` a ``tqdm`` bar when stderr is a
            terminal and tqdm is installed, else periodic log lines (:func:`log_progress`).
        total: Number of items, when ``len(iterable)`` is not available.

    Returns:
        An iterator over the same items.
    """
    if enabled is False:
        return iter(iterable)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False))
    return log_progress(iterable, desc, total=total)
