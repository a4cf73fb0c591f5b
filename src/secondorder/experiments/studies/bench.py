"""Run the benchmark scripts of the source tree and collect their tables.

The benchmarks live beside the package in ``benchmarks/`` (they are measurement scripts, not
library code). Each is run in its own process with ``--markdown`` into the output folder; the
tables are concatenated into ``summary.md``. With ``--python`` (or a ``.refenv`` beside the
source tree, see ``benchmarks/README.md``) they run under an interpreter that also has the
reference libraries, so their columns appear in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from ..report import write_atomically, write_markdown

NAME = "bench"
HELP = "Run the benchmark scripts (operators, solvers, optimizers, distributed) and collect tables."

SCRIPTS = ("operators", "solvers", "optimizers", "distributed")
REQUIRES: tuple[str, ...] = ()  # the scripts run in their own interpreter


def _script_list(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SCRIPTS)}, got {text!r}"
        )
    return ",".join(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    parser.add_argument(
        "--only",
        type=_script_list,
        default=None,
        help=f"comma-separated subset of {','.join(SCRIPTS)} (default: all; --quick: operators "
        "on problem A with 10 samples)",
    )
    parser.add_argument(
        "--python", default=None, help="interpreter to run them with (default: .refenv if present)"
    )


def _source_root() -> Path:
    return Path(__file__).resolve().parents[4]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected benchmark scripts and write their tables to ``args.out``.

    Args:
        args: Parsed command-line arguments.

    Returns:
        Per script: the command, exit code, wall time and the path of its table; ``"failed"``
        lists the scripts that exited non-zero (the command then exits with code 1).

    Raises:
        FileNotFoundError: If the benchmark scripts are not beside the package.
        ValueError: For an unknown script name.
    """
    root = _source_root()
    bench_dir = root / "benchmarks"
    if not bench_dir.is_dir():
        raise FileNotFoundError(
            f"benchmark scripts not found in {bench_dir}: `secondorder bench` needs the source "
            "tree (a git clone), not an installed wheel"
        )
    only = args.only or ("operators" if args.quick else ",".join(SCRIPTS))
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {unknown}; expected some of {SCRIPTS}")
    refenv = root / ".refenv" / "bin" / "python"
    python = args.python or (str(refenv) if refenv.exists() else sys.executable)
    out = Path(args.out).resolve()  # the scripts run in the source tree, not in the cwd
    results: dict[str, Any] = {}
    failed: list[str] = []
    sections = ["# Benchmarks", "", f"Interpreter: `{python}`; threads: {args.threads or 2}.", ""]
    for name in names:
        script = bench_dir / f"{name}.py"
        if not script.exists():
            results[name] = {"skipped": f"{script} not found"}
            failed.append(f"{name} (not found)")
            continue
        table = out / f"{name}.md"
        cmd = [python, str(script), "--markdown", str(table)]
        if args.quick and name == "operators":
            cmd += ["--repeats", "10", "--problems", "A"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        wall = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        write_atomically(out / f"{name}.log", partial(Path.write_text, data=log))
        results[name] = {"command": cmd, "returncode": proc.returncode, "wall_s": wall}
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode}, log in {name}.log)")
        sections += [f"## {name} (exit {proc.returncode}, {wall:.0f} s)", ""]
        if table.exists():
            results[name]["table"] = table.name
            sections.append(table.read_text())
        else:
            sections.append("```\n" + (proc.stdout + proc.stderr)[-3000:] + "\n```")
        sections.append("")
    write_markdown(out / "summary.md", "\n".join(sections) + "\n")
    print("\n".join(sections))
    if failed:
        results["failed"] = failed
    return results
