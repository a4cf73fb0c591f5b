r"""English text for the character-level language model: the Python language reference.

The text is the prose of CPython's own documentation topics, ``pydoc_data.topics.topics``: the
pages of the Python Language Reference and Library Reference that ``help("if")``,
``help("class")`` etc. print (about 465,000 characters, ~100 distinct characters). It ships
with every CPython installation (the ``pydoc_data`` package of the standard library), so the
study needs no download and no extra dependency. It is real English prose written by people
(with code examples and grammar snippets), not generated text. Licence: the Python Software
Foundation License Version 2 (the documentation's licence; © Python Software Foundation).
The exact text depends on the Python version; :func:`load_text` records its length and SHA-256.

:func:`load_text` joins the topics in sorted key order, cuts the text into contiguous blocks of
``block_chars`` characters and assigns block ``b`` to validation when ``b % 10 == 8``, to test
when ``b % 10 == 9`` and to training otherwise (an 80/10/10 split spread evenly over the whole
reference, so no topic is only in training or only in evaluation). Each split is the
concatenation of its blocks in order; no character belongs to two splits.

:class:`Windows` serves every training window ``(x, y) = (s[i:i+T], s[i+1:i+T+1])`` as a
map-style dataset for ``torch.utils.data.DataLoader``; :func:`eval_windows` cuts an evaluation
split into non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "LICENCE",
    "SOURCE",
    "TextSplit",
    "Windows",
    "decode",
    "encode",
    "eval_windows",
    "load_text",
    "python_reference_text",
    "split_blocks",
]

SOURCE = "CPython's pydoc_data.topics (the Python Language and Library Reference topics)"
LICENCE = "Python Software Foundation License Version 2 (documentation of CPython)"


def python_reference_text() -> str:
    """Return the Python reference topics as one text, topics in sorted key order.

    Returns:
        The text of ``pydoc_data.topics.topics``, topics separated by a blank line.

    Raises:
        ImportError: If this Python was built without ``pydoc_data`` (some minimal builds).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - every CPython ships it
        raise ImportError(
            "the charlm text is CPython's pydoc_data.topics, which this Python lacks; use a "
            "full CPython build"
        ) from err
    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def split_blocks(
    num_chars: int, block_chars: int, period: int = 10
) -> tuple[list[range], list[range], list[range]]:
    """Assign contiguous blocks of a text to training, validation and test.

    Block ``b`` (characters ``[b * block_chars, (b + 1) * block_chars)``, the last one
    shorter) goes to validation when ``b % period == period - 2``, to test when
    ``b % period == period - 1``, to training otherwise.

    Args:
        num_chars: Length of the text.
        block_chars: Characters per block, >= 1.
        period: Blocks per cycle (>= 3): one validation and one test block per cycle.

    Returns:
        ``(train, val, test)``: lists of character ranges, in text order.

    Raises:
        ValueError: If an argument is out of range or the text is too short for one block of
            each split.
    """
    if block_chars < 1 or period < 3 or num_chars < 1:
        raise ValueError(
            f"need num_chars >= 1, block_chars >= 1 and period >= 3, got {num_chars}, "
            f"{block_chars} and {period}"
        )
    parts: tuple[list[range], list[range], list[range]] = ([], [], [])
    for b, start in enumerate(range(0, num_chars, block_chars)):
        which = {period - 2: 1, period - 1: 2}.get(b % period, 0)
        parts[which].append(range(start, min(start + block_chars, num_chars)))
    if not all(parts):
        raise ValueError(
            f"a text of {num_chars} characters in blocks of {block_chars} has fewer than "
            f"{period} blocks: no validation or test block"
        )
    return parts


def encode(text: str, vocab: str) -> Tensor:
    """Map characters to their index in ``vocab`` (int64).

    Args:
        text: The text.
        vocab: The characters, each once.

    Returns:
        Codes ``(len(text),)``.

    Raises:
        ValueError: If ``text`` holds a character outside ``vocab``.
    """
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise ValueError(f"characters outside the vocabulary: {missing[:10]!r}")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode(codes: Tensor, vocab: str) -> str:
    """Map codes back to text (the inverse of :func:`encode`).

    Args:
        codes: 1-D integer tensor.
        vocab: The characters.

    Returns:
        The text.
    """
    return "".join(vocab[int(i)] for i in codes.tolist())


@dataclass(frozen=True)
class TextSplit:
    """A text split into training, validation and test codes.

    Attributes:
        train: Codes of the training text (int64, 1-D).
        val: Codes of the validation text.
        test: Codes of the test text.
        vocab: The characters; code ``i`` is ``vocab[i]``.
        source: Where the text comes from and how it was split.
        licence: The text's licence.
        num_chars: Length of the whole text.
        sha256: SHA-256 of the whole text (UTF-8), to identify the version.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    vocab: str
    source: str
    licence: str
    num_chars: int
    sha256: str


def load_text(block_chars: int = 2048, *, text: str | None = None) -> TextSplit:
    """Load the Python reference text (or ``text``) and split it by contiguous blocks.

    Args:
        block_chars: Characters per block of :func:`split_blocks`.
        text: A text to use instead of :func:`python_reference_text` (for tests).

    Returns:
        The split with its vocabulary (every character of the text, sorted).
    """
    own = text is None
    full = python_reference_text() if text is None else text
    vocab = "".join(sorted(set(full)))
    codes = encode(full, vocab)
    train, val, test = split_blocks(len(full), block_chars)

    def gather(ranges: list[range]) -> Tensor:
        return torch.cat([codes[r.start : r.stop] for r in ranges])

    version = ".".join(map(str, sys.version_info[:3]))
    source = (
        f"{SOURCE if own else 'given text'}"
        f"{f', Python {version}' if own else ''}: {len(full)} characters, "
        f"{len(vocab)} distinct; blocks of {block_chars} split 8:1:1 into train/val/test"
    )
    return TextSplit(
        gather(train),
        gather(val),
        gather(test),
        vocab,
        source,
        LICENCE if own else "given",
        len(full),
        hashlib.sha256(full.encode("utf-8")).hexdigest(),
    )


class Windows(Dataset[tuple[Tensor, Tensor]]):
    """Every window of ``context`` characters and its next-character targets.

    Item ``i`` is ``(codes[i : i + T], codes[i + 1 : i + T + 1])``.

    Args:
        codes: 1-D codes of a text, longer than ``context``.
        context: Window length ``T``.

    Raises:
        ValueError: If the text is not longer than ``context``.
    """

    def __init__(self, codes: Tensor, context: int) -> None:
        if codes.ndim != 1 or codes.numel() <= context or context < 1:
            raise ValueError(
                f"need 1-D codes longer than context={context}, got shape {tuple(codes.shape)}"
            )
        self.codes = codes
        self.context = context

    def __len__(self) -> int:
        return self.codes.numel() - self.context

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        return self.codes[i : i + self.context], self.codes[i + 1 : i + self.context + 1]


def eval_windows(
    codes: Tensor, context: int, max_windows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Cut a text into non-overlapping windows and their next-character targets.

    Args:
        codes: 1-D codes.
        context: Window length ``T``.
        max_windows: Keep at most this many windows, spread evenly over the text.

    Returns:
        ``(x, y)``, both ``(W, T)``.

    Raises:
        ValueError: If the text is shorter than one window plus one character.
    """
    count = (codes.numel() - 1) // context
    if count < 1:
        raise ValueError(f"a text of {codes.numel()} codes holds no window of {context}")
    starts = torch.arange(count) * context
    if max_windows is not None and max_windows < count:
        starts = starts[torch.linspace(0, count - 1, max_windows).round().long()]
    offsets = torch.arange(context)
    x = codes[starts[:, None] + offsets]
    return x, codes[starts[:, None] + offsets + 1]
