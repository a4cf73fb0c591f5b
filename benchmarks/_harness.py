"""Timing, peak-memory and table utilities shared by the benchmark scripts.

Timing: ``time_interleaved`` measures several callables round-robin (one sample of each
per round, the starting callable rotating from round to round) so that machine noise,
frequency changes and cache state hit all of them alike. Each sample times ``number``
back-to-back calls with ``time.perf_counter`` while the garbage collector is off, and is
stored per call; ``number`` is calibrated per callable so that one sample lasts at least
``min_sample_s``. Statistics are the median and the interquartile range over the samples.

Memory: ``peak_memory`` runs a callable once under ``torch.profiler`` with
``profile_memory=True`` and replays the allocation events that torch's CPU allocator
reports (every tensor allocation and free, with its size in bytes) in time order. The
running sum is the number of tensor bytes alive on top of those alive before the call;
its maximum is the peak and its final value what the call left alive (its result and
anything it cached). Only memory owned by torch tensors is counted: no Python objects,
no allocator slack, no freed-but-not-returned heap (which an RSS high-water mark would
mix in). ``check_peak_memory`` verifies the method against known allocation sizes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = [
    "MemoryUsage",
    "Ratio",
    "Timing",
    "check_peak_memory",
    "ensure_environment",
    "ensure_omp_wait_policy",
    "format_bytes",
    "markdown_table",
    "operator_memory",
    "peak_memory",
    "ratio",
    "set_threads",
    "time_fn",
    "time_interleaved",
]


def set_threads(n: int = 2) -> None:
    """Fix torch's intra-op and inter-op thread counts for reproducible timings."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or parallel work has already started
        pass


def ensure_omp_wait_policy(policy: str, script: str, argv: Sequence[str]) -> None:
    """Re-run ``script argv`` with ``OMP_WAIT_POLICY=policy`` unless it is already set so.

    OpenMP reads the variable once, when torch loads it, hence the re-exec. ``PASSIVE``
    makes idle worker threads sleep instead of spin: on a shared 2-core machine with
    other processes running, spinning threads made a 2-thread gradient 30-100x slower.
    """
    policy = policy.upper()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == policy:
        return
    os.environ["OMP_WAIT_POLICY"] = policy
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, script, *argv])


def ensure_environment(updates: Mapping[str, str], script: str, argv: Sequence[str]) -> None:
    """Re-run ``script argv`` with the variables ``updates`` set, unless they already are.

    Like :func:`ensure_omp_wait_policy`, for any set of variables that a library reads once,
    when it loads. ``OPENBLAS_NUM_THREADS=1``: scipy's and numpy's bundled OpenBLAS (used by
    ``scipy.sparse.linalg.eigsh`` and ``scipy.linalg.lapack``) otherwise starts a pool of its
    own threads beside torch's OpenMP pool; on the shared 2-core machine a step that called a
    scipy LAPACK routine then took 3-6 s instead of 20-100 ms.
    """
    changed = {k: v for k, v in updates.items() if os.environ.get(k, "").upper() != v.upper()}
    if not changed:
        return
    os.environ.update(changed)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, script, *argv])


# Timing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Per-call times in seconds of one callable, one entry per sample."""

    name: str
    samples: tuple[float, ...]
    number: int

    def quantile(self, q: float) -> float:
        """Quantile ``q`` in [0, 1] of the per-call times (linear interpolation)."""
        xs = sorted(self.samples)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        """Median time per call in seconds."""
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        """First quartile in seconds."""
        return self.quantile(0.25)

    @property
    def q3(self) -> float:
        """Third quartile in seconds."""
        return self.quantile(0.75)

    @property
    def min(self) -> float:
        """Fastest per-call time in seconds."""
        return min(self.samples)

    @property
    def max(self) -> float:
        """Slowest per-call time in seconds."""
        return max(self.samples)

    def __str__(self) -> str:
        return (
            f"{self.name}: median {self.median * 1e3:.3f} ms "
            f"(IQR {self.q1 * 1e3:.3f}-{self.q3 * 1e3:.3f}, "
            f"min {self.min * 1e3:.3f}, max {self.max * 1e3:.3f}; "
            f"{len(self.samples)} samples x {self.number} calls)"
        )


def _time_calls(fn: Callable[[], Any], number: int) -> float:
    """Seconds per call of ``number`` back-to-back calls, garbage collector off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / number


def _calibrate(fn: Callable[[], Any], min_sample_s: float, max_number: int = 1000) -> int:
    """Smallest power of two of calls whose total time reaches ``min_sample_s``."""
    number = 1
    while number < max_number and _time_calls(fn, number) * number < min_sample_s:
        number *= 2
    return number


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 30,
    warmup: int = 3,
    min_sample_s: float = 0.002,
) -> dict[str, Timing]:
    """Time several callables round-robin; returns one ``Timing`` per name.

    Every callable is called ``warmup`` times first (in round-robin order too), then
    ``repeats`` rounds each take one sample of every callable. The callable that goes
    first rotates from round to round, so none always follows the same neighbour.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    numbers = {name: _calibrate(fns[name], min_sample_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_time_calls(fns[name], numbers[name]))
        gc.collect()
    return {n: Timing(n, tuple(samples[n]), numbers[n]) for n in names}


def time_fn(
    fn: Callable[[], Any], repeats: int = 30, warmup: int = 3, min_sample_s: float = 0.002
) -> Timing:
    """Time one callable: median and spread over ``repeats`` samples, in seconds."""
    return time_interleaved({"fn": fn}, repeats, warmup, min_sample_s)["fn"]


@dataclass(frozen=True)
class Ratio:
    """A timing divided by a reference median: median and IQR as multiples."""

    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.q1:.2f}–{self.q3:.2f})"


def ratio(t: Timing, reference: Timing) -> Ratio:
    """``t`` in multiples of ``reference.median`` (e.g. of one gradient)."""
    ref = reference.median
    return Ratio(t.median / ref, t.q1 / ref, t.q3 / ref)


# Memory -----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null inside the block (C++ logging included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class MemoryUsage:
    """Tensor bytes of one call, relative to what was alive before it."""

    peak: int
    retained: int


def peak_memory(fn: Callable[[], Any]) -> tuple[MemoryUsage, Any]:
    """Run ``fn`` once and return its tensor-memory peak and retained bytes, and its result.

    The result is kept alive until returned, so ``retained`` counts it (e.g. the
    gradient, or an operator's cache).
    """
    from torch._C._profiler import _EventType

    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a line to fd 2 at each start and stop
        prof.start()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            if fields.device.type == "cpu":
                events.append((event.start_time_ns, int(fields.alloc_size)))
    events.sort(key=lambda e: e[0])
    alive = peak = 0
    for _, size in events:
        alive += size
        peak = max(peak, alive)
    return MemoryUsage(peak=peak, retained=alive), result


def operator_memory(
    build: Callable[[], Any], apply: Callable[[Any], Any]
) -> tuple[MemoryUsage, MemoryUsage]:
    """Memory of building an operator and of one product with it.

    Returns ``(build_usage, apply_usage)``. The footprint of a product is
    ``build_usage.retained + apply_usage.peak``: what the operator holds plus the
    product's own peak.
    """
    build_usage, op = peak_memory(build)
    apply_usage, _ = peak_memory(lambda: apply(op))
    return build_usage, apply_usage


def check_peak_memory() -> None:
    """Check ``peak_memory`` against allocations of known size; raises if it is off."""

    def known() -> torch.Tensor:
        a = torch.empty(10_000_000)  # 40 MB
        b = torch.empty(5_000_000)  # +20 MB -> 60 MB alive: the peak
        del a
        c = torch.empty(2_500_000)  # 30 MB alive
        del b
        return c  # 10 MB left alive

    usage, _ = peak_memory(known)
    if (usage.peak, usage.retained) != (60_000_000, 10_000_000):
        raise RuntimeError(f"peak_memory measured {usage}, expected 60 MB peak, 10 MB retained")

    def matmul() -> torch.Tensor:
        x = torch.ones(1000, 2000)  # 8 MB
        return x @ x.T  # +4 MB result, then x is freed

    usage, _ = peak_memory(matmul)
    if (usage.peak, usage.retained) != (12_000_000, 4_000_000):
        raise RuntimeError(f"peak_memory measured {usage}, expected 12 MB peak, 4 MB retained")


def format_bytes(n: float) -> str:
    """Human-readable size: ``1.5 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# Tables -----------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return "\n".join([line(cells[0]), "| " + " | ".join(sep) + " |"] + [line(r) for r in cells[1:]])


if __name__ == "__main__":
    check_peak_memory()
    print("peak_memory: known allocations measured exactly")
    x = torch.randn(512, 512)
    print(time_fn(lambda: x @ x))
