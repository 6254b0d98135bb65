"""Tests for hirelc.data: splits, preprocessing, determinism, every loader and every bad-data error."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hirelc import data
from hirelc.data import DATASETS, FASHION_MNIST_ENV, DataBundle, load_data
from hirelc.errors import HirelcError

FULL_DIR = Path(data.SYSTEM_FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def mini() -> DataBundle:
    return load_data("fashion-mnist-mini")


def counts(y: torch.Tensor, k: int = 10) -> list[int]:
    return torch.bincount(y, minlength=k).tolist()


def write_npz(tmp_path: Path, name: str = "d.npz", **override) -> Path:
    """A small valid npz (4 classes, 10 train + 3 test images each, 8x8 gray uint8), with fields overridden."""
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
        "y_train": np.repeat(np.arange(4), 10),
        "x_test": rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        "y_test": np.repeat(np.arange(4), 3),
    }
    arrays.update(override)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_folder(root: Path, classes: dict[str, int], size=(10, 10), mode: str = "L") -> Path:
    """ImageFolder layout: ``classes`` maps class name -> number of PNG images."""
    rng = np.random.default_rng(2)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def write_idx(path: Path, arr: np.ndarray) -> Path:
    payload = struct.pack(f">BBBB{arr.ndim}I", 0, 0, 8, arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_fashion(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> Path:
    """A tiny dataset in Fashion-MNIST's IDX file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return folder


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Make the Fashion-MNIST lookup independent of this machine."""
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", str(tmp_path / "no-system-copy"))
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)


# ---------------------------------------------------------------- shapes, normalisation, stratification


def test_mini_shapes_dtypes_and_normalisation(mini):
    assert mini.name == "fashion-mnist-mini" and mini.source == "embedded Fashion-MNIST subset (6000/1000)"
    assert (mini.num_classes, mini.in_chans, mini.img_size) == (10, 1, 32)
    assert [len(mini.train), len(mini.val), len(mini.test)] == [5400, 600, 1000]
    for s in (mini.train, mini.val, mini.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64 and s.x.shape[1:] == (1, 32, 32)
    assert mini.train.x.mean().abs() < 1e-4 and abs(mini.train.x.std().item() - 1) < 1e-3
    assert 0.2 < mini.mean[0] < 0.4 and 0.2 < mini.std[0] < 0.5
    d = mini.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["sizes"] == {"train": 5400, "val": 600, "test": 1000} and len(d["fingerprint"]) == 16


def test_stratified_val_and_max_train(mini):
    assert counts(mini.val.y) == [60] * 10 and counts(mini.train.y) == [540] * 10 and counts(mini.test.y) == [100] * 10
    capped = load_data("fashion-mnist-mini", max_train=1000, val_fraction=0.05)
    assert counts(capped.train.y) == [100] * 10 and counts(capped.val.y) == [30] * 10
    assert capped.fingerprint != mini.fingerprint


def test_val_carve_keeps_at_least_one_per_class(tmp_path):
    b = load_data(str(write_npz(tmp_path)), val_fraction=0.01)
    assert counts(b.val.y, 4) == [1] * 4 and counts(b.train.y, 4) == [9] * 4


def test_determinism_and_seed(mini):
    again = load_data("fashion-mnist-mini")
    assert again.fingerprint == mini.fingerprint
    assert torch.equal(again.val.x, mini.val.x) and torch.equal(again.train.y, mini.train.y)
    other = load_data("fashion-mnist-mini", seed=1)
    assert other.fingerprint != mini.fingerprint
    assert not torch.equal(other.val.x, mini.val.x)
    # the test split's samples never depend on the seed (only its normalisation, via the train statistics)
    assert torch.equal(other.test.y, mini.test.y)
    assert torch.allclose(other.test.x * other.std[0] + other.mean[0], mini.test.x * mini.std[0] + mini.mean[0],
                          atol=1e-5)


def test_subset_and_loader(mini):
    sub = mini.subset("val", 100, seed=3)
    assert counts(sub.y) == [10] * 10
    assert torch.equal(sub.x, mini.subset("val", 100, seed=3).x)
    assert mini.subset("val", 10**6) is mini.val
    batches = list(mini.loader("test", batch_size=64, limit=200))
    assert [len(y) for _, y in batches] == [64, 64, 64, 8] and counts(torch.cat([y for _, y in batches])) == [20] * 10
    first = [next(iter(mini.loader("train", batch_size=8, shuffle=True, seed=s)))[1] for s in (5, 5, 6)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    with pytest.raises(HirelcError, match="n >= 1"):
        mini.subset("train", 0)


# ---------------------------------------------------------------- resizing and channels


@pytest.mark.parametrize("size", [16, 28, 48])
def test_resize(size):
    b = load_data("digits", img_size=size)
    assert b.train.x.shape[1:] == (1, size, size) and b.test.x.shape[1:] == (1, size, size)
    assert b.num_classes == 10 and b.source.startswith("scikit-learn digits")
    assert len(b.train) + len(b.val) + len(b.test) == 1797


def test_gray_to_rgb(mini):
    rgb = load_data("fashion-mnist-mini", in_chans=3)
    assert rgb.in_chans == 3 and rgb.train.x.shape[1:] == (3, 32, 32) and len(rgb.mean) == 3
    assert torch.equal(rgb.train.x[:, 0], rgb.train.x[:, 2])
    assert torch.allclose(rgb.train.x[:, :1], mini.train.x, atol=1e-5)
    assert rgb.fingerprint != mini.fingerprint


def test_rgb_npz_layouts_and_luma(tmp_path):
    rng = np.random.default_rng(4)
    x_train, x_test = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), rng.integers(0, 256, (12, 3, 8, 8))
    first = load_data(str(write_npz(tmp_path, "cf.npz", x_train=x_train, x_test=x_test.astype(np.uint8))))
    last = load_data(str(write_npz(tmp_path, "cl.npz", x_train=x_train.transpose(0, 2, 3, 1),
                                   x_test=x_test.transpose(0, 2, 3, 1).astype(np.uint8))))
    assert first.in_chans == last.in_chans == 3 and torch.equal(first.test.x, last.test.x)

    gray = load_data(str(tmp_path / "cf.npz"), in_chans=1, img_size=8)
    luma = torch.from_numpy(np.tensordot([0.299, 0.587, 0.114], x_test / 255.0, axes=(0, 1))).float()
    restored = gray.test.x[:, 0] * gray.std[0] + gray.mean[0]  # test keeps the file's order
    assert gray.test.x.shape == (12, 1, 8, 8) and torch.allclose(restored, luma, atol=1e-5)


def test_npz_float_and_gray(tmp_path):
    rng = np.random.default_rng(5)
    path = write_npz(tmp_path, x_train=rng.random((40, 6, 6)), x_test=rng.random((12, 6, 6, 1)),
                     y_train=np.repeat(np.arange(4.0), 10))
    b = load_data(str(path), img_size=12)
    assert b.name == str(path) and b.num_classes == 4 and b.in_chans == 1 and b.test.x.shape == (12, 1, 12, 12)
    assert b.source == f"npz {path} (40/12)"


def test_fingerprint_ignores_location(tmp_path):
    a = write_npz(tmp_path, "a.npz")
    b = write_npz(tmp_path, "b.npz")
    c = write_npz(tmp_path, "c.npz", y_test=np.array([0, 1, 2, 3] * 3))
    fp = [load_data(str(p)).fingerprint for p in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_split(tmp_path):
    root = write_folder(tmp_path / "imgs", {"cat": 5, "dog": 5, "emu": 10})
    (root / "cat" / "notes.txt").write_text("ignored")
    b = load_data(str(root), img_size=10)
    assert b.num_classes == 3 and b.in_chans == 1
    assert counts(b.test.y, 3) == [1, 1, 2] and len(b.train) + len(b.val) == 16
    assert "ImageFolder" in b.source and "3 classes" in b.source


def test_image_folder_train_test_rgb_mixed_sizes(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root / "train", {"a": 3, "b": 3})
    write_folder(root / "test", {"b": 2}, size=(12, 7), mode="RGB")
    b = load_data(str(root), img_size=16)
    assert b.in_chans == 3 and b.test.x.shape == (2, 3, 16, 16) and b.test.y.tolist() == [1, 1]
    assert "train/ + test/" in b.source


# ---------------------------------------------------------------- Fashion-MNIST lookup


def test_fallback_to_embedded_subset(tmp_path, no_system_fashion):
    (tmp_path / "empty").mkdir()
    b = load_data("fashion-mnist", data_dir=str(tmp_path / "empty"))
    assert b.source.startswith("embedded Fashion-MNIST subset (6000/1000)") and "not found" in b.source
    assert str(tmp_path / "empty") in b.source and b.num_classes == 10


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_env_dir(tmp_path, monkeypatch, no_system_fashion, gz):
    folder = write_fashion(tmp_path / "fm", gz=gz)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    b = load_data("fashion-mnist", img_size=28)
    assert b.source == f"Fashion-MNIST full (50/20) from {folder}"
    assert (len(b.train), len(b.val), len(b.test)) == (40, 10, 20)


def test_data_dir_wins_over_env(tmp_path, monkeypatch, no_system_fashion):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(write_fashion(tmp_path / "env")))
    b = load_data("fashion-mnist", data_dir=str(write_fashion(tmp_path / "arg", n_train=30)))
    assert b.source.startswith("Fashion-MNIST full (30/20)")


@pytest.mark.skipif(not FULL_DIR.is_dir(), reason="full Fashion-MNIST not installed")
def test_full_fashion_mnist(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    b = load_data("fashion-mnist", img_size=28)
    assert b.source == f"Fashion-MNIST full (60000/10000) from {FULL_DIR}"
    assert b.describe()["sizes"] == {"train": 54000, "val": 6000, "test": 10000}
    assert b.train.x.shape[1:] == (1, 28, 28) and b.num_classes == 10


# ---------------------------------------------------------------- bad data


def raises(where, *fragments: str):
    """pytest.raises for a HirelcError whose message names ``where`` and contains the fragments, in order."""
    return pytest.raises(HirelcError, match=".*".join(re.escape(str(s)) for s in (where, *fragments)))


def test_unknown_spec_and_missing_path(tmp_path):
    with pytest.raises(HirelcError, match="unknown dataset 'cifar'.*" + ".*".join(DATASETS)):
        load_data("cifar")
    with raises(tmp_path / "nope.npz", "does not exist"):
        load_data(str(tmp_path / "nope.npz"))
    with raises(tmp_path / "nope" / "dir", "does not exist"):
        load_data(str(tmp_path / "nope" / "dir"))
    (tmp_path / "x.txt").write_text("")
    with raises(tmp_path / "x.txt", "not a directory"):
        load_data(str(tmp_path / "x.txt"))
    with raises(tmp_path / "gone", "data_dir", "does not exist"):
        load_data("fashion-mnist", data_dir=str(tmp_path / "gone"))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"in_chans": 2}, "in_chans"), ({"val_fraction": 0.0}, "val_fraction"), ({"img_size": 0}, "img_size"),
     ({"max_train": 0}, "max_train")],
)
def test_bad_parameters(kwargs, fragment):
    with pytest.raises(HirelcError, match=fragment):
        load_data("digits", **kwargs)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ({"y_test": None}, ["missing key(s) y_test"]),
        ({"y_train": np.zeros(39, int)}, ["train has 40 images but 39 labels"]),
        ({"x_test": np.zeros((12, 9, 9), np.uint8)}, ["train images have shape", "test images"]),
        ({"y_train": np.repeat(np.arange(-1, 3), 10)}, ["y_train", "negative label -1"]),
        ({"y_train": np.repeat(np.arange(4), 10) + 0.5}, ["y_train", "must be integers"]),
        ({"y_test": np.array([0, 1, 2, 9] * 3)}, ["labels out of range", "label 9"]),
        ({"y_train": np.zeros(40, int), "y_test": np.zeros(12, int)}, ["at least 2 classes"]),
        ({"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, int)}, ["test split is empty"]),
        ({"x_train": np.zeros((40, 8, 8, 4), np.uint8)}, ["x_train", "1 or 3 channels"]),
        ({"x_train": np.full((40, 8, 8), 300)}, ["x_train", "0..255"]),
        ({"x_train": np.full((40, 8, 8), np.nan)}, ["x_train", "NaN"]),
    ],
)
def test_bad_npz(tmp_path, override, fragments):
    path = write_npz(tmp_path, **override)
    with raises(path, *fragments):
        load_data(str(path))


def test_corrupt_npz(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip")
    with raises(path, "cannot read .npz"):
        load_data(str(path))


def test_bad_image_folders(tmp_path):
    root = write_folder(tmp_path / "a", {"x": 2, "y": 2})
    (root / "z").mkdir()
    with raises(root / "z", "empty class folder"):
        load_data(str(root))

    root = write_folder(tmp_path / "b", {"x": 2, "y": 2})
    (root / "y" / "bad.png").write_bytes(b"\x89PNG garbage")
    with raises(root / "y" / "bad.png", "corrupt image"):
        load_data(str(root))

    root = write_folder(tmp_path / "c", {"only": 3})
    with raises(root, "at least 2 class folders"):
        load_data(str(root))

    root = tmp_path / "d"
    write_folder(root / "train", {"x": 2, "y": 2})
    (root / "test").mkdir()
    with raises(root / "test", "test split is empty"):
        load_data(str(root))

    root = tmp_path / "e"
    write_folder(root / "train", {"x": 2, "y": 2})
    write_folder(root / "test", {"w": 1})
    with raises(root / "test" / "w", "no folder in"):
        load_data(str(root))


def test_bad_idx_files(tmp_path, monkeypatch, no_system_fashion):
    folder = write_fashion(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    labels = folder / "train-labels-idx1-ubyte.gz"

    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x32" + bytes(10)))
    with raises(labels, "payload has 10 bytes, header says 50"):
        load_data("fashion-mnist")
    labels.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00"))
    with raises(labels, "bad magic number"):
        load_data("fashion-mnist")
    labels.write_bytes(gzip.compress(bytes(200))[:20])
    with raises(labels, "cannot read IDX file"):
        load_data("fashion-mnist")
    write_idx(labels, np.full(50, 10))
    with raises(labels, "labels out of range"):
        load_data("fashion-mnist")
    write_idx(labels, np.zeros(49))
    with raises(labels, "49 labels but", "50 images"):
        load_data("fashion-mnist")
    labels.unlink()
    with raises(folder, "incomplete Fashion-MNIST", "train-labels-idx1-ubyte"):
        load_data("fashion-mnist")
