"""MNIST from the standard IDX files, validated.

* :func:`read_idx` -- one IDX file (raw or gzip), its header and size checked.
* :func:`load_mnist_idx` -- one split (raw or gzip, flat or in the torchvision layout
  ``<dir>/MNIST/raw/``); :class:`DataError` names the file and what is wrong.
* :func:`check_mnist_dir` runs the same checks without building tensors.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_CLASSES",
    "MNIST_IMAGE_SHAPE",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataError",
    "check_mnist_dir",
    "load_mnist_idx",
    "read_idx",
]

MNIST_MEAN = 0.1307
"""Mean pixel value of the MNIST training images after scaling to ``[0, 1]``."""

MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixels after scaling to ``[0, 1]``."""

IDX_IMAGES_MAGIC = 0x00000803
"""IDX magic number of an unsigned-byte, 3-dimensional array (the MNIST image files)."""

IDX_LABELS_MAGIC = 0x00000801
"""IDX magic number of an unsigned-byte, 1-dimensional array (the MNIST label files)."""

MNIST_IMAGE_SHAPE = (28, 28)
"""Rows and columns of an MNIST digit, the input size of the studies' models."""

MNIST_CLASSES = 10
"""Number of MNIST classes: labels are ``0 .. 9``."""

_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int"}
_IDX_TYPES.update({0x0D: "float", 0x0E: "double"})


class DataError(ValueError):
    """A data file that cannot be used: corrupt, truncated, or of the wrong format or content.

    The message names the file and says what was expected and what was found.
    """


# Canonical file names of each split, followed by a common variant with a dot.
_MNIST_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (
        ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
        ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
        ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
    ),
}


# ------------------------------------------------------------------------------------- IDX
def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into a NumPy array.

    An IDX file starts with a big-endian 32-bit magic number ``0x0000TTNN`` (``TT = 0x08`` for
    unsigned bytes, ``NN`` the number of dimensions), followed by ``NN`` big-endian 32-bit sizes
    and the data in C order. Files whose name ends in ``.gz`` are decompressed first.

    Args:
        path: The file to read.
        expected_magic: The magic number the file must have, e.g. :data:`IDX_IMAGES_MAGIC`
            (``0x00000803``) or :data:`IDX_LABELS_MAGIC` (``0x00000801``).

    Returns:
        A uint8 array whose shape is given by the header.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        DataError: (a ``ValueError``) If the file is not valid gzip (a bad header, a corrupt
            body or a truncated stream), is shorter than its header says, has trailing bytes,
            or has a magic number other than ``expected_magic`` (another element type or
            number of dimensions, or no IDX file at all); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file: {err}") from err
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a valid (complete) gzip file: {err}") from err
    if len(raw) < 4:
        raise DataError(
            f"{path}: truncated IDX file: {len(raw)} bytes, expected at least a 4-byte header"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number {_describe_magic(magic, expected_magic)}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX header: {len(raw)} bytes, expected {header} for {ndim} "
            "dimensions"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    count = math.prod(dims)
    got = len(raw) - header
    if got != count:
        what = "truncated IDX file" if got < count else "IDX file has trailing bytes"
        raise DataError(f"{path}: {what}: {got} data bytes, expected {count} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _describe_magic(magic: int, expected: int) -> str:
    """``0x...``, expected ``0x...``, and what differs (not IDX, element type, dimensions)."""
    text = f"0x{magic:08x}, expected 0x{expected:08x}"
    if magic >> 16:
        return text + " (not an IDX file: its first two bytes must be zero)"
    kind, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    want_kind, want_ndim = (expected >> 8) & 0xFF, expected & 0xFF
    if kind != want_kind:
        name = _IDX_TYPES.get(kind, "unknown")
        text += f" ({name} elements (type 0x{kind:02x}), expected {_IDX_TYPES[want_kind]})"
    elif ndim != want_ndim:
        text += f" ({ndim} dimensions, expected {want_ndim})"
    return text


def _find_idx_file(directory: Path, names: tuple[str, ...], what: str) -> Path:
    places = (directory, directory / "MNIST" / "raw")
    candidates = [place / (name + ext) for place in places for name in names for ext in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST {what} file {names[0]!r} (raw or .gz) not found; looked for: "
        + ", ".join(str(c) for c in candidates)
    )


def _read_mnist_split(
    directory: str | Path, split: str, image_shape: tuple[int, int] | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The validated uint8 images ``(N, rows, cols)`` and labels ``(N,)`` of one split."""
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory does not exist: {directory}")
    image_names, label_names = _MNIST_FILES[split]
    image_file = _find_idx_file(directory, image_names, f"{split} images")
    label_file = _find_idx_file(directory, label_names, f"{split} labels")
    images = read_idx(image_file, IDX_IMAGES_MAGIC)
    labels = read_idx(label_file, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_file} holds {images.shape[0]} images but {label_file} holds "
            f"{labels.shape[0]} labels; expected the same number"
        )
    if images.shape[0] == 0:
        raise DataError(f"{image_file} holds no images; expected at least one")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        rows, cols = images.shape[1:]
        raise DataError(
            f"{image_file}: images of {rows}x{cols} pixels, expected "
            f"{image_shape[0]}x{image_shape[1]} (the size the study's models take)"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{label_file}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range; "
            f"expected labels in 0..{num_classes - 1} ({bad.size} out of range)"
        )
    return images, labels


def check_mnist_dir(
    directory: str | Path,
    *,
    image_shape: tuple[int, int] | None = MNIST_IMAGE_SHAPE,
    num_classes: int = MNIST_CLASSES,
) -> None:
    """Check both splits of MNIST in ``directory`` as :func:`load_mnist_idx` does, quickly.

    Reads every file in full (a corrupt gzip body shows only then) but builds no tensors; the
    command line calls it before a study starts, so bad data fails before any training.

    Args:
        directory: Directory holding the IDX files.
        image_shape: The ``(rows, cols)`` the images must have (``None``: any).
        num_classes: Labels must lie in ``0 .. num_classes - 1``.

    Raises:
        FileNotFoundError: If ``directory`` or one of the files does not exist.
        DataError: If a file is malformed (see :func:`read_idx`), the images have another
            size, a label is out of range, a split is empty, or its two files hold different
            numbers of items.
    """
    for split in _MNIST_FILES:
        _read_mnist_split(directory, split, image_shape, num_classes)


def load_mnist_idx(
    directory: str | Path,
    split: str = "train",
    *,
    normalize: bool = True,
    image_shape: tuple[int, int] | None = MNIST_IMAGE_SHAPE,
    num_classes: int = MNIST_CLASSES,
) -> tuple[Tensor, Tensor]:
    r"""Load one split of MNIST from the standard IDX files.

    The files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (``split="train"``) or
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (``split="test"``) are looked up,
    raw or with a ``.gz`` suffix, directly in ``directory`` and then in the torchvision layout
    ``directory/MNIST/raw/``. The variant names with a dot (``train-images.idx3-ubyte``) are
    accepted too.

    Pixels are scaled to :math:`[0, 1]` and, with ``normalize=True``, standardized as
    :math:`(p - 0.1307) / 0.3081` (:data:`MNIST_MEAN`, :data:`MNIST_STD`, the statistics of
    the training set), like ``torchvision.transforms.Normalize((0.1307,), (0.3081,))``.

    Args:
        directory: Directory holding the IDX files.
        split: ``"train"`` (60,000 digits) or ``"test"`` (10,000 digits).
        normalize: Whether to standardize the pixels with the MNIST mean and std.
        image_shape: The ``(rows, cols)`` the images must have (default ``(28, 28)``;
            ``None``: any).
        num_classes: Labels must lie in ``0 .. num_classes - 1`` (default 10).

    Returns:
        ``(images, labels)``: float32 images of shape ``(N, 1, rows, cols)`` (``28 x 28``) and
        int64 labels of shape ``(N,)``.

    Raises:
        ValueError: If ``split`` is unknown.
        DataError: (a ``ValueError``) If a file is malformed (see :func:`read_idx`), the
            images have another size than ``image_shape``, a label is out of range, the split
            is empty, or the two files hold different numbers of items.
        FileNotFoundError: If ``directory`` or one of the files does not exist.
    """
    images, labels = _read_mnist_split(directory, split, image_shape, num_classes)
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1).div_(255.0)
    if normalize:
        x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return x, torch.from_numpy(labels.astype(np.int64))
