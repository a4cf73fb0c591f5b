"""Registry of losses for the conformance matrix, each with the targets it takes.

``LossSpec.out`` is the model output kind it is applied to (see ``models.py``);
``likelihood`` says whether the loss is a negative log-likelihood the library knows (exact,
Monte-Carlo and empirical Fisher, low-rank GGN, diagonals apply). Adding an entry adds its
tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from secondorder import SequenceCrossEntropyLoss

from .models import DT, C, L


@dataclass(frozen=True)
class LossSpec:
    """A loss factory, its targets and what it supports.

    Attributes:
        make: Returns the loss callable.
        targets: ``targets(n, generator)`` returns the targets of ``n`` samples.
        out: The model output kind it applies to.
        likelihood: A negative log-likelihood with a known distribution.
    """

    make: Callable[[], Any]
    targets: Callable[[int, torch.Generator], Tensor]
    out: str = "vec"
    likelihood: bool = False


def _classes(
    *shape: int, ignore: int | None = None, ignored: tuple[int, ...] = (0, 3, 5)
) -> Callable[[int, torch.Generator], Tensor]:
    def make(n: int, g: torch.Generator) -> Tensor:
        y = torch.randint(0, C, (n, *shape), generator=g)
        if ignore is not None:  # the first position of the samples ``ignored``, no other
            y[y == ignore] = (ignore + 1) % C
            y.view(n, -1)[list(ignored), 0] = ignore
        return y

    return make


def _probs(n: int, g: torch.Generator) -> Tensor:
    return torch.softmax(torch.randn(n, C, generator=g, dtype=DT), 1)


def _padded(first_batch_ignored: bool) -> Callable[[int, torch.Generator], Tensor]:
    """Tokens ``(n, L)``, each sequence padded with ``ignore_index=1`` after a random length
    (at least 1); with ``first_batch_ignored`` samples 0-2 (the first batch of the unequal and
    DataLoader splits) are padding only."""

    def make(n: int, g: torch.Generator) -> Tensor:
        y = torch.randint(0, C, (n, L), generator=g)
        y[y == 1] = 2
        lengths = torch.randint(1, L + 1, (n,), generator=g)
        y[torch.arange(L) >= lengths[:, None]] = 1
        if first_batch_ignored:
            y[:3] = 1
        return y

    return make


def _seq_probs(n: int, g: torch.Generator) -> Tensor:
    return torch.softmax(torch.randn(n, L, C, generator=g, dtype=DT), -1)


def _real(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g, dtype=DT)


def _binary(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n, C), generator=g).to(DT)


class DoubledCrossEntropy(nn.CrossEntropyLoss):
    """A subclass of a supported loss with its own forward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return 2.0 * super().forward(input, target)


def callable_mean(z: Tensor, y: Tensor) -> Tensor:
    """A plain callable: a mean over samples of a per-sample loss (no ``reduction`` attribute)."""
    return (torch.cosh(z - y) - 1).sum(1).mean()


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(nn.CrossEntropyLoss, _classes(), likelihood=True),
    "ce_sum": LossSpec(lambda: nn.CrossEntropyLoss(reduction="sum"), _classes(), likelihood=True),
    "ce_ignore": LossSpec(
        lambda: nn.CrossEntropyLoss(ignore_index=1), _classes(ignore=1), likelihood=True
    ),
    # every target of the first batch (of the unequal and DataLoader splits) ignored
    "ce_ignore_batch": LossSpec(
        lambda: nn.CrossEntropyLoss(ignore_index=1),
        _classes(ignore=1, ignored=(0, 1, 2)),
        likelihood=True,
    ),
    "ce_weight": LossSpec(
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT)), _classes()
    ),
    "ce_smoothing": LossSpec(
        lambda: nn.CrossEntropyLoss(label_smoothing=0.2), _classes(), likelihood=True
    ),
    "ce_probs": LossSpec(nn.CrossEntropyLoss, _probs, likelihood=True),
    "ce_seq": LossSpec(nn.CrossEntropyLoss, _classes(L), out="seq", likelihood=True),
    "ce_seq_ignore_sum": LossSpec(
        lambda: nn.CrossEntropyLoss(ignore_index=0, reduction="sum"),
        _classes(L, ignore=0),
        out="seq",
        likelihood=True,
    ),
    "ce_subclass": LossSpec(DoubledCrossEntropy, _classes()),
    # SequenceCrossEntropyLoss on class-last logits (N, L, C): reductions x padding patterns
    "seqce": LossSpec(SequenceCrossEntropyLoss, _classes(L), out="seq_last", likelihood=True),
    "seqce_sum": LossSpec(
        lambda: SequenceCrossEntropyLoss(reduction="sum"),
        _classes(L),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_pad": LossSpec(
        lambda: SequenceCrossEntropyLoss(ignore_index=1),
        _padded(False),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_pad_sum": LossSpec(
        lambda: SequenceCrossEntropyLoss(ignore_index=1, reduction="sum"),
        _padded(False),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_pad_batch": LossSpec(
        lambda: SequenceCrossEntropyLoss(ignore_index=1),
        _padded(True),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_smoothing": LossSpec(
        lambda: SequenceCrossEntropyLoss(ignore_index=1, label_smoothing=0.2),
        _padded(False),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_chunked": LossSpec(  # fused head products in chunks of 3 tokens (sequences split)
        lambda: SequenceCrossEntropyLoss(ignore_index=1, chunk_size=3),
        _padded(False),
        out="seq_last",
        likelihood=True,
    ),
    "seqce_probs": LossSpec(SequenceCrossEntropyLoss, _seq_probs, out="seq_last", likelihood=True),
    "seqce_weight": LossSpec(
        lambda: SequenceCrossEntropyLoss(
            weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT), ignore_index=1
        ),
        _padded(False),
        out="seq_last",
    ),
    "mse": LossSpec(nn.MSELoss, _real(C), likelihood=True),
    "mse_sum": LossSpec(lambda: nn.MSELoss(reduction="sum"), _real(C), likelihood=True),
    "mse_seq": LossSpec(nn.MSELoss, _real(C, L), out="seq", likelihood=True),
    "bce": LossSpec(nn.BCEWithLogitsLoss, _binary, likelihood=True),
    "bce_pos_weight": LossSpec(
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 1.5], dtype=DT)), _binary
    ),
    "bce_weight_sum": LossSpec(
        lambda: nn.BCEWithLogitsLoss(
            weight=torch.tensor([1.5, 0.5, 1.0], dtype=DT), reduction="sum"
        ),
        _binary,
    ),
    "nll": LossSpec(nn.NLLLoss, _classes(), out="logprob"),
    "kldiv_batchmean": LossSpec(lambda: nn.KLDivLoss(reduction="batchmean"), _probs, out="logprob"),
    "callable_mean": LossSpec(lambda: callable_mean, _real(C)),
}

# the loss each output kind uses in the layer x engine block
DEFAULT_LOSS = {"vec": "ce", "seq": "ce_seq", "seq_last": "seqce_pad", "logprob": "nll"}

__all__ = ["DEFAULT_LOSS", "LOSSES", "LossSpec", "F"]
