r"""Eigenpairs of a symmetric matrix through LAPACK's tridiagonal reduction (SciPy, CPU).

:math:`A = Q T Q^\top` by ``sytrd``; all eigenvalues of :math:`T` by ``sterf``; eigenvectors
only for chosen eigenvalues by bisection (``stebz``) and inverse iteration (``stein``), mapped
back by the stored Householder reflectors (``ormqr``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Tridiagonal"]


def _lapack() -> Any:
    """SciPy's LAPACK wrappers, or None when SciPy is not installed."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy is an optional dependency
        return None
    return lapack


class Tridiagonal:
    r"""A symmetric matrix reduced to tridiagonal form :math:`A = Q T Q^\top` (LAPACK ``sytrd``).

    All eigenvalues come from ``sterf`` (:math:`O(D^2)`); eigenvectors are computed only for
    the requested ones: bisection (``stebz``) and inverse iteration (``stein``) on :math:`T`,
    then :math:`Q z` by the stored Householder reflectors (``ormqr``), :math:`O(D^2 K)`.
    """

    def __init__(self, lapack: Any, prefix: str, a: Any, like: Tensor) -> None:
        self.lapack, self.prefix, self.like = lapack, prefix, like
        n = a.shape[0]
        work, _ = self._fn("sytrd_lwork")(n, lower=1)
        self.c, self.d, self.e, self.tau, info = self._fn("sytrd")(a, lower=1, lwork=int(work))
        vals, info2 = self._fn("sterf")(self.d.copy(), self.e.copy())
        if info or info2:
            raise FloatingPointError(f"LAPACK sytrd/sterf failed (info {info}, {info2})")
        self.evals = torch.from_numpy(vals).to(like.device, like.dtype)

    def _fn(self, name: str) -> Any:
        return getattr(self.lapack, self.prefix + name)

    @classmethod
    def create(cls, gram: Tensor) -> Tridiagonal | None:
        """Reduce ``gram`` if SciPy is available and it is a CPU float32/float64 matrix."""
        prefix = {torch.float32: "s", torch.float64: "d"}.get(gram.dtype)
        lapack = _lapack()
        if prefix is None or lapack is None or gram.device.type != "cpu" or gram.shape[0] < 2:
            return None
        return cls(lapack, prefix, gram.detach().numpy(), gram)

    def eigenvectors(self, indices: list[int]) -> Tensor | None:
        """Eigenvectors of the chosen eigenvalues (ascending positions), or None on failure."""
        import numpy as np

        n = self.d.shape[0]
        wanted = sorted(set(indices))
        if not wanted:
            return self.like.new_zeros(n, 0)
        runs = [[wanted[0], wanted[0]]]
        for i in wanted[1:]:
            if i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        ws, blocks, ranks = [], [], []
        isplit = None
        for lo, hi in runs:  # eigenvalues lo..hi (0-based, inclusive) by bisection
            m, w, iblock, isplit, info = self._fn("stebz")(
                self.d, self.e, 2, 0.0, 0.0, lo + 1, hi + 1, 0.0, "B"
            )
            if info or m != hi - lo + 1:
                return None
            ws.append(w[:m])
            blocks.append(iblock[:m])
            ranks.append(lo + np.argsort(np.argsort(w[:m], kind="stable"), kind="stable"))
        w, iblock, rank = (np.concatenate(t) for t in (ws, blocks, ranks))
        order = np.lexsort((w, iblock))  # stein wants them grouped by block, ascending inside
        padded = np.zeros(n, dtype=iblock.dtype)
        padded[: len(order)] = iblock[order]
        z, info = self._fn("stein")(self.d, self.e, w[order], padded, isplit)
        if info:
            return None
        K = z.shape[1]
        cq, _, info = self._fn("ormqr")(
            "L", "N", self.c[1:, : n - 1], self.tau, z[1:], lwork=max(64 * K, 1)
        )
        if info:
            return None
        z[1:] = cq
        column = {int(r): j for j, r in enumerate(rank[order])}
        U = torch.from_numpy(z[:, [column[i] for i in indices]].copy())
        return U.to(self.like.device, self.like.dtype)
