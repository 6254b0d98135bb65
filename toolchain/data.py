"""Datasets: load raw images, split them deterministically and preprocess them into model-ready tensors.

A spec names a built-in dataset (``fashion-mnist``, ``fashion-mnist-mini``, ``digits``) or is a path to an
ImageFolder directory or an ``.npz`` file. Every loader yields raw uint8/float arrays (N, C, H, W); one common
pipeline then carves a stratified validation split from train, resizes, adapts channels and normalises with the
train split's statistics, all in torch. The fingerprint identifies the raw data plus every preprocessing
parameter, so results can say exactly what they were measured on. Bad user data raises :class:`HirelcError`
with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hirelc.errors import HirelcError

DATASETS: tuple[str, ...] = ("fashion-mnist", "fashion-mnist-mini", "digits")
FASHION_MNIST_ENV = "HIRELC_FASHION_MNIST_DIR"
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MINI_ASSET = "assets/fashion_mnist_mini.npz"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SPLITS = ("train", "val", "test")
TEST_SPLIT_SEED = 0  # fixed, so the test set of 80/20-split datasets never depends on the user's seed
CHUNK = 8192  # images preprocessed at a time, bounds temporary memory


@dataclass
class Split:
    """Preprocessed tensors, ready for the model."""

    x: torch.Tensor  # (N, C, H, W) float32, resized, channel-adapted, normalised
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    """A dataset split into train/val/test, with provenance (``source``) and identity (``fingerprint``)."""

    name: str
    source: str
    num_classes: int
    in_chans: int
    img_size: int
    train: Split
    val: Split
    test: Split
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def split(self, split: str) -> Split:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def subset(self, split: str, n: int, seed: int = 0) -> Split:
        """Deterministic stratified subset of ``n`` samples (the whole split if ``n`` is not smaller)."""
        s = self.split(split)
        if n < 1:
            raise HirelcError(f"subset of {split} split needs n >= 1, got {n}")
        if n >= len(s):
            return s
        idx = torch.from_numpy(_stratified_pick(s.y.numpy(), n, np.random.default_rng(seed)))
        return Split(s.x[idx], s.y[idx])

    def loader(
        self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0, limit: int | None = None
    ) -> DataLoader:
        """DataLoader over a split; ``limit`` first takes a seeded stratified subset of that many samples."""
        s = self.subset(split, limit, seed) if limit is not None else self.split(split)
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(TensorDataset(s.x, s.y), batch_size=batch_size, shuffle=shuffle, generator=gen)

    def describe(self) -> dict:
        """JSON-ready summary recorded with results."""
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "sizes": {s: len(self.split(s)) for s in SPLITS},
            "fingerprint": self.fingerprint,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass
class _Raw:
    """Raw data as loaded: x (N, C, H, W) uint8 or float32 with C in {1, 3}, y int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str


# ---------------------------------------------------------------- public entry point


def load_data(
    spec: str = "fashion-mnist",
    *,
    data_dir: str | None = None,
    img_size: int = 32,
    in_chans: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
) -> DataBundle:
    """Load a dataset by spec and return its preprocessed train/val/test splits."""
    if not isinstance(img_size, int) or img_size < 1:
        raise HirelcError(f"img_size must be a positive integer, got {img_size!r}")
    if in_chans not in (None, 1, 3):
        raise HirelcError(f"in_chans must be 1 or 3 (or unset to keep the data's own), got {in_chans!r}")
    if not 0.0 < val_fraction < 1.0:
        raise HirelcError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_train is not None and max_train < 1:
        raise HirelcError(f"max_train must be >= 1, got {max_train}")

    raw, kind = _load_raw(str(spec), data_dir, img_size)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _carve(raw.y_train, val_fraction, rng)
    if len(val_idx) == 0:
        raise HirelcError(f"{spec}: every class has a single training sample, so no validation split can be carved")
    if max_train is not None and max_train < len(train_idx):
        train_idx = train_idx[_stratified_pick(raw.y_train[train_idx], max_train, rng)]

    chans = in_chans or raw.x_train.shape[1]
    where = str(spec)
    xs = [_to_tensor(a, img_size, chans, where) for a in (raw.x_train[train_idx], raw.x_train[val_idx], raw.x_test)]
    mean, std = _channel_stats(xs[0])
    for x in xs:
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    ys = [torch.from_numpy(y) for y in (raw.y_train[train_idx], raw.y_train[val_idx], raw.y_test)]

    params = dict(spec=kind, img_size=img_size, in_chans=in_chans, val_fraction=val_fraction, seed=seed,
                  max_train=max_train)
    return DataBundle(
        name=str(spec),
        source=raw.source,
        num_classes=raw.num_classes,
        in_chans=chans,
        img_size=img_size,
        train=Split(xs[0], ys[0]),
        val=Split(xs[1], ys[1]),
        test=Split(xs[2], ys[2]),
        fingerprint=_fingerprint(raw, params),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _load_raw(spec: str, data_dir: str | None, img_size: int) -> tuple[_Raw, str]:
    """Dispatch a spec to its loader; returns the raw data and the spec's kind for the fingerprint.

    Paths contribute their kind ("imagefolder"/"npz"), not their location, so moving a dataset keeps its
    fingerprint (the fingerprint hashes the data itself anyway).
    """
    if spec == "fashion-mnist":
        return _load_fashion_mnist(data_dir), spec
    if spec == "fashion-mnist-mini":
        return _load_mini(), spec
    if spec == "digits":
        return _load_digits(), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_image_folder(path, img_size), "imagefolder"
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path), "npz"
    if path.exists():
        raise HirelcError(f"{path}: not a directory (ImageFolder layout) or an .npz file")
    if os.sep in spec or "/" in spec or path.suffix:
        raise HirelcError(f"{path}: dataset path does not exist")
    raise HirelcError(f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, an ImageFolder directory or a .npz")


# ---------------------------------------------------------------- splitting


def _carve(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, carved): per class round(fraction * n), at least 1, and never the last sample."""
    rest, carved = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        carved.append(idx[:k])
        rest.append(idx[k:])
    return rng.permutation(np.concatenate(rest)), rng.permutation(np.concatenate(carved))


def _stratified_pick(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` samples keeping y's class proportions (largest remainder), in random order."""
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(picked))


# ---------------------------------------------------------------- preprocessing


def _to_tensor(x: np.ndarray, img_size: int, chans: int, where: str) -> torch.Tensor:
    """Raw (N, C, H, W) -> float32 (N, chans, img_size, img_size); uint8 scaled to [0, 1]; not yet normalised."""
    out = torch.empty((len(x), chans, img_size, img_size), dtype=torch.float32)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    for i in range(0, len(x), CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[i : i + CHUNK])).float() * scale
        if chans < t.shape[1]:  # both steps are linear: reduce channels before resizing, expand after
            t = _adapt_channels(t, chans, where)
        if t.shape[-2:] != (img_size, img_size):
            t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + CHUNK] = _adapt_channels(t, chans, where)
    return out


def _adapt_channels(t: torch.Tensor, chans: int, where: str) -> torch.Tensor:
    """Gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma."""
    have = t.shape[1]
    if have == chans:
        return t
    if have == 1:
        return t.expand(-1, chans, -1, -1)
    if have == 3 and chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype).view(1, 3, 1, 1)
        return (t * w).sum(1, keepdim=True)
    raise HirelcError(f"{where}: cannot adapt {have}-channel images to {chans} channels")


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64 accumulation, chunked); a zero std becomes 1 so constant data survives."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    ss = torch.zeros_like(s)
    for i in range(0, len(x), CHUNK):
        t = x[i : i + CHUNK].double()
        s += t.sum((0, 2, 3))
        ss += t.square().sum((0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = s / n
    std = (ss / n - mean.square()).clamp_min(0).sqrt()
    std[std < 1e-12] = 1.0
    return mean.float(), std.float()


def _fingerprint(raw: _Raw, params: dict) -> str:
    """sha256 over the raw arrays (dtype, shape, bytes) and the preprocessing parameters."""
    h = hashlib.sha256()
    for a in (raw.x_train, raw.y_train, raw.x_test, raw.y_test):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- validation shared by all loaders


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64, rejecting non-integer and negative values."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise HirelcError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise HirelcError(f"{where}: labels must be integers")
    elif not np.issubdtype(y.dtype, np.integer):
        raise HirelcError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise HirelcError(f"{where}: labels out of range (negative label {int(y.min())})")
    return y.astype(np.int64)


def _checked(where: str, x_train, y_train, x_test, y_test, source: str, num_classes: int | None = None) -> _Raw:
    """Validate raw arrays (lengths, emptiness, shapes, label range, class count) and wrap them."""
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise HirelcError(f"{where}: {name} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise HirelcError(f"{where}: {name} split is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise HirelcError(f"{where}: train images have shape {x_train.shape[1:]} but test images {x_test.shape[1:]}")
    if x_train.ndim != 4 or min(x_train.shape[1:]) < 1:
        raise HirelcError(f"{where}: images must be (N, C, H, W) with C, H, W >= 1, got {x_train.shape}")
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    bad = max(int(y_train.max()), int(y_test.max()))
    if bad >= num_classes:
        raise HirelcError(f"{where}: labels out of range (label {bad}, but only {num_classes} classes)")
    if len(np.unique(y_train)) < 2:
        raise HirelcError(f"{where}: needs at least 2 classes in train, found {len(np.unique(y_train))}")
    return _Raw(x_train, y_train, x_test, y_test, num_classes, source)


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a writable numpy array."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise HirelcError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise HirelcError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise HirelcError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(dims)):
        raise HirelcError(f"{path}: IDX payload has {len(data) - header} bytes, header says {int(np.prod(dims))}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _idx_paths(folder: Path) -> list[Path] | None:
    """The four Fashion-MNIST files in ``folder`` (plain or .gz), None if there are none at all."""
    found = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in IDX_FILES]
    if not any(found):
        return None
    missing = [n for n, p in zip(IDX_FILES, found, strict=True) if p is None]
    if missing:
        raise HirelcError(f"{folder}: incomplete Fashion-MNIST, missing {', '.join(missing)}[.gz]")
    return found


def _load_fashion_mnist(data_dir: str | None) -> _Raw:
    """Full Fashion-MNIST from data_dir, $HIRELC_FASHION_MNIST_DIR or the system path, else the embedded subset.

    A folder the user named explicitly (argument or environment) must exist; one without the files is skipped.
    """
    named = [(data_dir, "data_dir"), (os.environ.get(FASHION_MNIST_ENV), f"${FASHION_MNIST_ENV}")]
    for d, what in named:
        if d and not Path(d).expanduser().is_dir():
            raise HirelcError(f"{d}: Fashion-MNIST directory ({what}) does not exist")
    candidates = [d for d, _ in named if d] + [SYSTEM_FASHION_MNIST_DIR]
    for d in candidates:
        folder = Path(d).expanduser()
        paths = _idx_paths(folder) if folder.is_dir() else None
        if paths is not None:
            return _read_fashion_mnist(folder, paths)
    raw = _load_mini()
    raw.source += f"; full Fashion-MNIST not found in {', '.join(candidates)}"
    return raw


def _read_fashion_mnist(folder: Path, paths: list[Path]) -> _Raw:
    """Read and check the four IDX files (images 3-D, labels 1-D in 0..9, matching counts)."""
    arrays = []
    for img_path, lab_path in (paths[:2], paths[2:]):
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.ndim != 3:
            raise HirelcError(f"{img_path}: expected 3-D image data, got shape {x.shape}")
        if y.ndim != 1:
            raise HirelcError(f"{lab_path}: expected 1-D labels, got shape {y.shape}")
        if len(x) != len(y):
            raise HirelcError(f"{lab_path}: {len(y)} labels but {img_path.name} has {len(x)} images")
        if len(y) == 0:
            raise HirelcError(f"{lab_path}: empty split")
        if y.max() > 9:
            raise HirelcError(f"{lab_path}: labels out of range (label {int(y.max())}, Fashion-MNIST has 10 classes)")
        arrays += [x[:, None], y.astype(np.int64)]
    src = f"Fashion-MNIST full ({len(arrays[1])}/{len(arrays[3])}) from {folder}"
    return _checked(str(folder), *arrays, src, 10)


def _load_mini() -> _Raw:
    """The embedded stratified Fashion-MNIST subset shipped with hirelc (see tools/make_mini_dataset.py)."""
    ref = resources.files("hirelc").joinpath(MINI_ASSET)
    with ref.open("rb") as f, np.load(f) as z:
        xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    src = f"embedded Fashion-MNIST subset ({len(xtr)}/{len(xte)})"
    return _checked(MINI_ASSET, xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64), src, 10)


# ---------------------------------------------------------------- digits


def _load_digits() -> _Raw:
    """scikit-learn's 8x8 digits, scaled 0..16 -> 0..255, fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits  # optional heavy dependency, imported for the digits dataset only

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    tr, te = _carve(y, 0.2, np.random.default_rng(TEST_SPLIT_SEED))
    return _checked("digits", x[tr], y[tr], x[te], y[te], f"scikit-learn digits ({len(tr)}/{len(te)})", 10)


# ---------------------------------------------------------------- ImageFolder


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise HirelcError(f"{folder}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
    return files


def _read_image(path: Path) -> np.ndarray:
    """Decode one image to uint8 (H, W) if grayscale, else (H, W, 3)."""
    from PIL import Image  # optional dependency, imported for image folders only

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise HirelcError(f"{path}: unreadable or corrupt image ({e})") from None


def _load_image_folder(root: Path, img_size: int) -> _Raw:
    """One sub-folder per class (sorted names -> labels); optional train/ + test/ pair, else a fixed 80/20 split.

    Images of mixed sizes are resized to ``img_size`` one by one (then stored as uint8) so they can be stacked.
    """
    paired = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if paired else root
    classes = [p.name for p in _class_dirs(train_root)]
    if len(classes) < 2:
        raise HirelcError(f"{train_root}: needs at least 2 class folders, found {len(classes)}")
    files = [(f, i) for i, c in enumerate(classes) for f in _image_files(train_root / c)]
    n_train = len(files)
    if paired:
        for d in _class_dirs(root / "test"):
            if d.name not in classes:
                raise HirelcError(f"{d}: test class {d.name!r} has no folder in {train_root}")
            files += [(f, classes.index(d.name)) for f in _image_files(d)]
        if len(files) == n_train:
            raise HirelcError(f"{root / 'test'}: test split is empty")
    imgs = [_read_image(f) for f, _ in files]
    if any(a.ndim == 3 for a in imgs):
        imgs = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in imgs]
    imgs = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in imgs]
    if len({a.shape for a in imgs}) > 1:
        imgs = [_resize_uint8(a, img_size) for a in imgs]
    x = np.stack(imgs)
    y = np.array([lab for _, lab in files], dtype=np.int64)
    if paired:
        tr, te, how = np.arange(n_train), np.arange(n_train, len(files)), "train/ + test/ folders"
    else:
        tr, te = _carve(y, 0.2, np.random.default_rng(TEST_SPLIT_SEED))
        how = "80/20 split"
    src = f"ImageFolder {root} ({len(tr)}/{len(te)}, {len(classes)} classes, {how})"
    return _checked(str(root), x[tr], y[tr], x[te], y[te], src, len(classes))


def _resize_uint8(a: np.ndarray, size: int) -> np.ndarray:
    """Resize one (C, H, W) uint8 image to size x size with the pipeline's interpolation, back to uint8."""
    t = torch.from_numpy(np.ascontiguousarray(a))[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t[0].round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------- npz


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) | (N,H,W,C) | (N,C,H,W) uint8/integer/float -> (N, C, H, W) uint8 or float32 with C in {1, 3}."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.shape[1] not in (1, 3):
            raise HirelcError(f"{where}: images need 1 or 3 channels, got shape {x.shape}")
    else:
        raise HirelcError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.all(np.isfinite(x)):
            raise HirelcError(f"{where}: images contain NaN or infinity")
        return np.ascontiguousarray(x, dtype=np.float32)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise HirelcError(f"{where}: integer images must lie in 0..255")
        return np.ascontiguousarray(x, dtype=np.uint8)
    raise HirelcError(f"{where}: unsupported image dtype {x.dtype}")


def _load_npz(path: Path) -> _Raw:
    """An .npz with x_train, y_train, x_test, y_test; float images are used as they are (normalisation follows)."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise HirelcError(f"{path}: missing key(s) {', '.join(missing)} (needs {', '.join(keys)})")
            xtr, ytr, xte, yte = (z[k] for k in keys)
    except HirelcError:
        raise
    except Exception as e:  # zipfile, pickle and format errors all mean the same to the user
        raise HirelcError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from None
    where = str(path)
    xtr, xte = _images(xtr, f"{where} x_train"), _images(xte, f"{where} x_test")
    ytr, yte = _labels(ytr, f"{where} y_train"), _labels(yte, f"{where} y_test")
    return _checked(where, xtr, ytr, xte, yte, f"npz {path} ({len(xtr)}/{len(xte)})")
