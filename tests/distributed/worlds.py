"""Run a function on N gloo processes on localhost (a file store: no ports needed)."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, store_file, out_dir, fn, args, timeout_s):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report everything back to the parent
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    # Skip the interpreter's shutdown: on this machine gloo's threads occasionally abort there
    # ("terminate called without an active exception", SIGABRT) after the result was written,
    # which the parent would report as a failed rank.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(fn, world_size, *args, timeout_s=30.0, join_timeout=120.0):
    """Run ``fn(rank, world_size, *args)`` on every rank; return per-rank ("ok"|"error", value)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _entry,
            args=(world_size, store, tmp, fn, args, timeout_s),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + join_timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"world of {world_size} did not finish in {join_timeout} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
