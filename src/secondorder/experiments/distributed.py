"""Data-parallel runs of the studies under ``torchrun``.

``torchrun --nproc-per-node N -m secondorder <study>`` starts ``N`` copies of the command; each
finds its rank in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, set by torchrun).
:func:`init_distributed` joins them into one process group (gloo on CPU, NCCL on CUDA) with a
timeout on every collective, and returns a :class:`DistContext`: the rank, the world size,
the group, and the few collective helpers a study needs beside the optimizers' own
``process_group`` support:

* :func:`shard` / :meth:`DistContext.shard` -- this rank's contiguous slice of a batch;
* :meth:`DistContext.sync_gradients` -- for first-order baselines (SGD, Adam): turn each rank's
  gradient of its shard's loss into the gradient of the global batch's loss;
* :meth:`DistContext.weighted_sum` -- global losses and counts from per-rank parts.

A study run on one process gets ``args.dist = None``; :meth:`DistContext.single` is the
context of such a run, whose helpers do nothing, so a study can write one code path.

**Failure.** A rank that raises must not leave the others waiting forever in a collective.
The CLI catches the exception, prints ``rank r: <error>`` and ends the process at once
(:func:`abort`, ``os._exit``): its sockets close, the peers' pending collective fails
(or, if a rank hangs instead, times out after ``--dist-timeout`` seconds), they report and
exit the same way, and torchrun stops whatever is left and exits non-zero.

Fault injection, for the tests only: the environment variable ``SECONDORDER_DIST_FAULT`` set
to ``"RANK:STEP"`` makes rank ``RANK`` raise after its ``STEP``-th optimizer step (every
``torch.optim`` optimizer counts), and ``"RANK:STEP:hang"`` makes it hang there instead.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "FAULT_ENV",
    "DistContext",
    "DistributedError",
    "abort",
    "exit_now",
    "finish",
    "init_distributed",
    "launched_by_torchrun",
    "shard",
]

DEFAULT_TIMEOUT_S = 120.0
"""Default timeout of every collective (seconds), the CLI's ``--dist-timeout``."""

FAULT_ENV = "SECONDORDER_DIST_FAULT"
"""Test hook: ``"RANK:STEP"`` or ``"RANK:STEP:hang"`` (see the module docstring)."""

_TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """The process group could not be set up (bad environment, backend or rendezvous)."""


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the process was started by ``torchrun`` (or a launcher setting the same variables).

    Args:
        environ: The environment to inspect (default: ``os.environ``).

    Returns:
        True if ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` are all set.
    """
    env = os.environ if environ is None else environ
    return all(key in env for key in _TORCHRUN_ENV)


def shard(tensor: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of ``tensor`` along its first dimension.

    The slices of all ranks, in rank order, concatenate to ``tensor``; their sizes differ by
    at most one (the first ``len % world_size`` ranks hold one more), and a rank may hold an
    empty slice when ``world_size`` exceeds the length.

    Args:
        tensor: The full batch (inputs or targets).
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks.

    Returns:
        A view of ``tensor``.

    Raises:
        ValueError: If ``rank`` is outside ``[0, world_size)`` or ``tensor`` is 0-dimensional.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if tensor.ndim == 0:
        raise ValueError("shard: expected a tensor with a batch dimension, got a 0-dim tensor")
    return tensor.tensor_split(world_size)[rank]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: This process's rank (0 is the main rank, which writes the outputs).
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU with NCCL).
        group: The ``torch.distributed`` process group, or None for a single process; pass it
            as ``process_group=`` to the curvature operators and optimizers.
        backend: ``"gloo"`` or ``"nccl"`` (None for a single process).
        timeout_s: Timeout of every collective, in seconds (None for a single process).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    group: Any = None
    backend: str | None = None
    timeout_s: float | None = None

    @classmethod
    def single(cls) -> DistContext:
        """The context of a single-process run: rank 0 of 1, no group, helpers do nothing.

        Returns:
            ``DistContext(rank=0, world_size=1)``.
        """
        return cls(rank=0, world_size=1)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, which shows progress bars and writes the outputs."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """The run's layout for ``results.json``.

        Returns:
            ``{"world_size", "backend", "timeout_s"}``.
        """
        return {"world_size": self.world_size, "backend": self.backend, "timeout_s": self.timeout_s}

    def shard(self, tensor: Tensor) -> Tensor:
        """This rank's contiguous slice of a batch (the batch itself on one process).

        Args:
            tensor: The full batch.

        Returns:
            See :func:`shard`.
        """
        return tensor if self.group is None else shard(tensor, self.rank, self.world_size)

    def weighted_sum(self, value: float | Tensor, weight: float = 1.0) -> float:
        r"""Sum ``weight * value`` over the ranks, in float64.

        With ``value`` a rank's mean loss over its shard and ``weight`` its share of the
        batch, :math:`n_r / N`, this is the mean loss over the whole batch; with ``weight=1``
        it adds up counts.

        Args:
            value: This rank's value (a number or a one-element tensor).
            weight: Its weight.

        Returns:
            The sum over all ranks (``weight * value`` on one process).
        """
        number = _as_float(value) * weight
        if self.group is None:
            return number
        buf = torch.tensor([number], dtype=torch.float64, device=self._comm_device(None))
        torch.distributed.all_reduce(buf, group=self.group)
        return float(buf.item())

    def accuracy(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        """Classification accuracy of ``model`` on ``(x, y)``, each rank counting its shard.

        Args:
            model: A classifier returning scores ``(N, C)``.
            x: Inputs of the whole set.
            y: Its labels.

        Returns:
            The fraction of correct predictions over the whole set (identical on every rank).
        """
        xs, ys = self.shard(x), self.shard(y)
        with torch.no_grad():
            correct = (model(xs).argmax(1) == ys).sum()
        return self.weighted_sum(correct) / len(y)

    def sync_gradients(
        self, params: Iterable[Tensor], loss: Tensor | float, weight: float
    ) -> float:
        r"""Replace every rank's gradients by those of the global batch's loss (in place).

        Each rank has called ``loss.backward()`` on the loss of its shard. With ``weight`` the
        rank's share :math:`n_r / N` of the batch for a mean-reduced loss (1 for a sum), the
        weighted sum over ranks of the shard gradients is the gradient of the whole batch's
        loss, uneven shards included. Gradients and loss travel in one flat all-reduce; then
        every rank holds the same gradient and a ``torch.optim`` optimizer stays in step.

        Args:
            params: The parameters (those without a gradient are skipped, on every rank alike).
            loss: This rank's loss on its shard (its value is only reported).
            weight: This rank's weight.

        Returns:
            The loss of the whole batch (this rank's ``loss`` on one process).
        """
        if self.group is None:
            return _as_float(loss)
        grads = [p.grad for p in params if p.grad is not None]
        device = self._comm_device(grads[0] if grads else None)
        value = torch.tensor([_as_float(loss)], dtype=torch.float64)
        flat = torch.cat(
            [g.detach().reshape(-1).to(device, torch.float64) for g in grads] + [value.to(device)]
        ).mul_(weight)
        torch.distributed.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-1].item())

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank (in place).

        Models built from the same seed are already identical; this makes sure of it, as
        ``DistributedDataParallel`` does when it wraps a model.

        Args:
            module: The model, with the same architecture on every rank.
        """
        if self.group is None:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if not isinstance(tensor, Tensor):
                    continue
                buf = tensor.to(self._comm_device(tensor))
                torch.distributed.broadcast(buf, src=0, group=self.group)
                if buf is not tensor:
                    tensor.copy_(buf)

    def _comm_device(self, like: Tensor | None) -> torch.device:
        if self.backend == "nccl":
            return like.device if like is not None else torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def _as_float(value: float | Tensor) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def init_distributed(
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> DistContext | None:
    """Join the process group of a ``torchrun`` launch; do nothing when not launched so.

    Uses gloo for ``device="cpu"`` and NCCL for ``"cuda"`` (each rank on GPU ``LOCAL_RANK``),
    with ``timeout_s`` on every collective, so a rank whose peer died or hangs raises instead
    of waiting forever. A group is created even for ``WORLD_SIZE=1``, so ``torchrun
    --nproc-per-node 1`` runs the data-parallel code path. Installs the fault-injection hook
    when ``SECONDORDER_DIST_FAULT`` asks for it (tests only).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        timeout_s: Timeout of every collective, in seconds.
        environ: The environment (default: ``os.environ``).

    Returns:
        The context, or None when the process was not started by torchrun.

    Raises:
        DistributedError: If the environment is malformed, the timeout is not positive, or
            the group cannot be initialised.
    """
    env = os.environ if environ is None else environ
    if not launched_by_torchrun(env):
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of torch")
    if not timeout_s > 0:
        raise DistributedError(f"--dist-timeout must be positive, got {timeout_s}")
    try:
        world_size, rank, local_rank = (int(env[key]) for key in _TORCHRUN_ENV)
    except ValueError:
        values = ", ".join(f"{key}={env[key]!r}" for key in _TORCHRUN_ENV)
        raise DistributedError(f"malformed torchrun environment: {values}") from None
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    _parse_fault(env.get(FAULT_ENV))  # a malformed test hook fails before the rendezvous
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        except Exception as err:  # a rendezvous or backend failure, reported in one line
            raise DistributedError(
                f"rank {rank}: cannot initialise the {backend} process group: {err}"
            ) from err
    ctx = DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        group=dist.group.WORLD,
        backend=backend,
        timeout_s=float(timeout_s),
    )
    _install_fault(rank, env.get(FAULT_ENV))
    return ctx


def finish(ctx: DistContext | None) -> None:
    """End a successful run: wait until every rank is done, then leave the group.

    The barrier makes a failure on one rank (e.g. rank 0 writing its outputs) fail the others
    too, within the timeout, instead of letting them report success.

    Args:
        ctx: The context from :func:`init_distributed` (None: nothing to do).
    """
    _remove_fault()
    if ctx is None or ctx.group is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=ctx.group)
        dist.destroy_process_group()


def abort(
    ctx: DistContext, err: BaseException, *, exit_code: int = 1, show_traceback: bool = True
) -> NoReturn:
    """Report a rank's failure on stderr and end the process at once, without cleanup.

    Prints the traceback (if asked) and ``secondorder: rank r: <error>``, then calls
    ``os._exit``: no ``atexit`` handler or group teardown can block, and the closed
    connections make the peers' collectives fail promptly (or time out).

    Args:
        ctx: This rank's context.
        err: The exception.
        exit_code: The process's exit status (non-zero).
        show_traceback: Print the traceback before the one-line report.
    """
    message = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if _from_collective(err):
        message += " (a collective failed: another rank has probably failed; see its error)"
    try:
        if show_traceback:
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        print(f"secondorder: rank {ctx.rank}: {message}", file=sys.stderr)
    finally:
        exit_now(exit_code)


def _from_collective(err: BaseException) -> bool:
    """Whether ``err`` was raised by a ``torch.distributed`` call (a failed or timed-out peer)."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    filename = last.tb_frame.f_code.co_filename if last is not None else ""
    return f"torch{os.sep}distributed{os.sep}" in filename


def exit_now(exit_code: int) -> NoReturn:
    """Flush stdout and stderr and end the process with ``os._exit``, skipping interpreter teardown.

    Also used after a successful data-parallel run: objects that outlive
    ``destroy_process_group`` (the group is referenced by the context, the optimizers and
    the operators, some in reference cycles) keep gloo's worker threads alive until the
    interpreter's final garbage collection, where tearing them down intermittently ends in
    ``std::terminate`` (SIGABRT, "terminate called without an active exception"; about one
    run in eight here, torch 2.13), which torchrun reports as a failed rank.

    Args:
        exit_code: The process's exit status.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not prevent the exit
            pass
    os._exit(exit_code)


# ------------------------------------------------------------------------ fault injection
_FAULT_HANDLE: Any = None


def _parse_fault(spec: str | None) -> tuple[int, int, str] | None:
    """Parse ``SECONDORDER_DIST_FAULT``: ``(rank, step, "raise" | "hang")`` or None."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        target, at_step = int(parts[0]), int(parts[1])
        mode = parts[2] if len(parts) > 2 else "raise"
        if mode not in ("raise", "hang") or len(parts) > 3:
            raise ValueError(mode)
    except (ValueError, IndexError):
        raise DistributedError(
            f"{FAULT_ENV}={spec!r}: expected 'RANK:STEP' or 'RANK:STEP:hang'"
        ) from None
    return target, at_step, mode


def _install_fault(rank: int, spec: str | None) -> None:
    """Register the optimizer-step hook that ``SECONDORDER_DIST_FAULT`` asks for, if any."""
    global _FAULT_HANDLE
    fault = _parse_fault(spec)
    if fault is None or fault[0] != rank:
        return
    _, at_step, mode = fault
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = 0

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count != at_step:
            return
        if mode == "hang":
            print(f"rank {rank}: {FAULT_ENV}: hanging after step {count}", file=sys.stderr)
            sys.stderr.flush()
            while True:
                time.sleep(1.0)
        raise RuntimeError(
            f"injected fault after optimizer step {count} ({type(optimizer).__name__}; "
            f"{FAULT_ENV}={spec})"
        )

    _FAULT_HANDLE = register_optimizer_step_post_hook(hook)


def _remove_fault() -> None:
    global _FAULT_HANDLE
    if _FAULT_HANDLE is not None:
        _FAULT_HANDLE.remove()
        _FAULT_HANDLE = None
