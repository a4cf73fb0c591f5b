r"""Eigenpairs of the low-rank GGN's per-block Gram matrices :math:`V^\top V`, cached.

A mixin of :class:`~secondorder.curvature.lowrank.LowRankGGN`: the full spectrum by
``torch.linalg.eigh``, the leading pairs by restarted block Krylov iteration
(:func:`~secondorder.linalg.dense_eig.top_eigh`), or chosen pairs through LAPACK's tridiagonal
reduction (:class:`~secondorder.linalg.lapack_tridiagonal.Tridiagonal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..linalg.dense_eig import krylov_applies, top_eigh
from ..linalg.lapack_tridiagonal import Tridiagonal
from ..linalg.precision import full_precision
from .lowrank_columns import Columns


class GramSpectrum:
    """Gram matrices and their eigenpairs per block of parameters (cached per block)."""

    eigensolver: str
    _columns: list[Columns]
    _cache: dict[tuple[int, ...], dict[str, Any]]

    @property
    def num_columns(self) -> int:
        """:math:`D`, the number of columns of :math:`V` (size of the Gram matrix)."""
        raise NotImplementedError

    def _block(self, params: Sequence[Tensor] | None) -> tuple[int, ...]:
        raise NotImplementedError

    def _entry(self, params: Sequence[Tensor] | None) -> dict[str, Any]:
        block = self._block(params)
        entry = self._cache.get(block)
        if entry is None:
            gram = cross = None
            for col in self._columns:
                members = [i for i in col.indices if i in block]
                if members:
                    g, c = col.kernels(members)
                    gram = g if gram is None else gram.add_(g)
                    cross = c if cross is None else cross.add_(c)
            assert gram is not None and cross is not None
            entry = self._cache[block] = {"block": block, "gram": gram, "cross": cross}
        return entry

    @staticmethod
    def _finite_gram(entry: dict[str, Any]) -> Tensor:
        """The entry's Gram matrix, checked for non-finite entries (one reduction first)."""
        gram = entry["gram"]
        if not bool(torch.isfinite(gram.sum())) and not bool(torch.isfinite(gram).all()):
            raise FloatingPointError("LowRankGGN: the Gram matrix has non-finite entries")
        return gram

    def _spectrum(self, params: Sequence[Tensor] | None) -> dict[str, Any]:
        entry = self._entry(params)
        if "evals" not in entry:
            gram = self._finite_gram(entry)
            tri = Tridiagonal.create(gram) if self.eigensolver == "lapack" else None
            if tri is None:
                entry["evals"], entry["evecs"] = torch.linalg.eigh(gram)
                entry["method"] = "eigh"
            else:
                entry["evals"], entry["tridiagonal"] = tri.evals, tri
                entry["method"] = "lapack"
        return entry

    @full_precision
    def leading_eigh(self, k: int, params: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        r"""The ``k`` largest eigenpairs :math:`(\lambda_j, u_j)` of the Gram matrix.

        With ``eigensolver="auto"`` and ``k`` small beside :math:`D` they come from restarted
        block Krylov iteration on :math:`V^\top V` (:func:`~secondorder.linalg.dense_eig.
        top_eigh`: residuals :math:`\lVert V^\top V u_j - \lambda_j u_j \rVert \le
        10 \sqrt{D}\, \epsilon\, \lambda_{\max}`, a start block from a generator seeded 0,
        so deterministic), otherwise from the full decomposition. Cached per block; a full
        decomposition, once computed, serves every later request.

        Args:
            k: Number of pairs; more than :math:`D` means all :math:`D`.
            params: Parameters of the block (default: all).

        Returns:
            Eigenvalues in ascending order, shape ``(K,)`` with ``K = min(k, D)``, and
            orthonormal eigenvectors as columns, shape ``(D, K)``.

        Raises:
            ValueError: If ``k`` is not a positive int.
            FloatingPointError: If the Gram matrix is not finite.
        """
        check_int("k", k)
        entry = self._entry(params)
        D = self.num_columns
        k = min(k, D)
        lead = entry.get("leading")
        if "evecs" not in entry and (lead is None or lead[0].numel() < k):
            if self.eigensolver == "lapack":
                idx = list(range(D - k, D))
                return self.eigvalsh(params)[idx], self.gram_eigenvectors(idx, params)
            if self.eigensolver == "torch" or not krylov_applies(k, D):
                evals, evecs = self.eigh(params)
                return evals[-k:], evecs[:, -k:]
            gram = self._finite_gram(entry)
            generator = torch.Generator(device=gram.device).manual_seed(0)
            result = top_eigh(gram, k, generator=generator)
            lead = entry["leading"] = (result.eigenvalues, result.eigenvectors)
            entry["method"] = "krylov" if result.method == "krylov" else "eigh"
            entry["krylov"] = result
        if "evecs" in entry or lead is None:
            return entry["evals"][-k:], entry["evecs"][:, -k:]
        return lead[0][-k:], lead[1][:, -k:]

    def eigensolver_used(self, params: Sequence[Tensor] | None = None) -> str | None:
        """How the block's eigenpairs were computed so far.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            ``"krylov"``, ``"eigh"``, ``"lapack"`` or None (not yet).
        """
        return self._entry(params).get("method")

    @full_precision
    def gram(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""The Gram matrix :math:`V^\top V` of the block ``params``.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(D, D)``.
        """
        return self._entry(params)["gram"]

    @full_precision
    def eigvalsh(self, params: Sequence[Tensor] | None = None) -> Tensor:
        r"""All eigenvalues of the Gram matrix in ascending order, shape ``(D,)``.

        Its nonzero eigenvalues are the nonzero eigenvalues of the block's GGN. This is a full
        decomposition (``torch.linalg.eigh``); with ``eigensolver="lapack"`` on the CPU the
        matrix is instead reduced to tridiagonal form once (LAPACK ``sytrd`` through SciPy,
        when installed), so that :meth:`gram_eigenvectors` later costs :math:`O(D^2 K)` for
        :math:`K` eigenvectors. Only the largest few? :meth:`leading_eigh` is cheaper.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            The eigenvalues.

        Raises:
            FloatingPointError: If the Gram matrix is not finite.
        """
        return self._spectrum(params)["evals"]

    @full_precision
    def eigh(self, params: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        r"""Full eigendecomposition :math:`V^\top V = U \operatorname{diag}(\lambda) U^\top`.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            Eigenvalues in ascending order, shape ``(D,)``, and orthonormal eigenvectors as
            columns, shape ``(D, D)``.

        Raises:
            FloatingPointError: If the Gram matrix is not finite.
        """
        entry = self._spectrum(params)
        if "evecs" not in entry:
            _, entry["evecs"] = torch.linalg.eigh(entry["gram"])
            entry["method"] = "eigh"
        return entry["evals"], entry["evecs"]

    def tolerance(self, params: Sequence[Tensor] | None = None) -> float:
        r"""Eigenvalues at or below this are numerically zero: :math:`D\,\epsilon\,\lambda_{\max}`.

        Args:
            params: Parameters of the block (default: all).

        Returns:
            The threshold (0 when the block's GGN is zero).
        """
        entry = self._entry(params)
        lead = entry.get("leading")
        if "evals" in entry:
            top = entry["evals"][-1]
        elif lead is not None:
            top = lead[0][-1]
        else:
            top = self.leading_eigh(1, params)[0][-1]
        return self.num_columns * torch.finfo(top.dtype).eps * max(float(top), 0.0)

    def _indices(self, indices: Sequence[int] | Tensor) -> list[int]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        D = self.num_columns
        if any(not 0 <= i < D for i in idx):
            raise IndexError(f"eigenvalue indices must lie in [0, {D}), got {idx}")
        return idx

    @full_precision
    def gram_eigenvectors(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None = None
    ) -> Tensor:
        r"""Orthonormal eigenvectors :math:`u_k` of the Gram matrix for the chosen eigenvalues.

        Args:
            indices: Positions in :meth:`eigvalsh`'s ascending eigenvalues.
            params: Parameters of the block (default: all).

        Returns:
            Shape ``(D, K)``; column :math:`k` belongs to ``eigvalsh(params)[indices[k]]``.
        """
        idx = self._indices(indices)
        leading = self._leading(idx, params)
        if leading is not None:
            return leading[1]
        entry = self._spectrum(params)
        if "evecs" in entry:
            return entry["evecs"][:, idx]
        U = entry["tridiagonal"].eigenvectors(idx)
        if U is None:  # LAPACK's inverse iteration failed: decompose fully instead
            entry["evals"], entry["evecs"] = torch.linalg.eigh(entry["gram"])
            return entry["evecs"][:, idx]
        return U

    def _leading(
        self, idx: list[int], params: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor] | None:
        """Eigenpairs at positions ``idx`` from the leading ones, when those serve.

        They do when a full decomposition is not cached and either cached leading pairs cover
        ``idx`` or (``eigensolver="auto"``) they can be computed: the ``D - min(idx)`` largest.
        """
        entry = self._entry(params)
        if not idx or "evals" in entry:
            return None
        D = self.num_columns
        lead = entry.get("leading")
        m = D - min(idx)
        if lead is None or lead[0].numel() < m:
            if self.eigensolver != "auto":
                return None
            lead = self.leading_eigh(m, params)
            if "evals" in entry:  # it decomposed fully: the caller's path serves
                return None
        offset = D - lead[0].numel()
        pos = [i - offset for i in idx]
        return lead[0][pos], lead[1][:, pos]

    def _selected(
        self, indices: Sequence[int] | Tensor, params: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        idx = self._indices(indices)
        leading = self._leading(idx, params)
        lam = self.eigvalsh(params)[idx] if leading is None else leading[0]
        tol = self.tolerance(params)
        if idx and float(lam.min()) <= tol:
            bad = [i for i, v in zip(idx, lam.tolist()) if v <= tol]
            raise ValueError(
                f"eigenvalues {bad} are numerically zero (<= {tol:.3e}); their GGN eigenvectors "
                "V u / sqrt(lambda) are undefined (choose eigenvalues above `tolerance()`)"
            )
        if leading is not None:
            return lam, leading[1]
        return lam, self.gram_eigenvectors(idx, params)
