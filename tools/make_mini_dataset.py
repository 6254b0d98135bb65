"""Rebuild hirelc's embedded Fashion-MNIST subset, ``toolchain/assets/fashion_mnist_mini.npz``.

The subset lets hirelc (and its tests) run where the full dataset is absent: a stratified sample of 600 train
and 100 test images per class, drawn with a fixed seed from the official IDX files, stored as uint8 28x28
arrays ``x_train, y_train, x_test, y_test`` with ``np.savez_compressed``. The arrays are deterministic
(printed sha256 identifies them); the zip container's timestamps are not.

    python tools/make_mini_dataset.py [--src /usr/share/datasets/fashion-mnist] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from hirelc.data import IDX_FILES, SYSTEM_FASHION_MNIST_DIR, read_idx

SEED = 20240601
PER_CLASS = {"train": 600, "test": 100}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "toolchain" / "assets" / "fashion_mnist_mini.npz"


def pick(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of every class, shuffled together."""
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]
    return rng.permutation(np.concatenate(idx))


def build(src: Path) -> dict[str, np.ndarray]:
    """The subset's arrays, drawn from the IDX files in ``src`` (plain or gzipped)."""
    def find(name: str) -> Path:
        return next(p for p in (src / name, src / f"{name}.gz") if p.is_file())

    rng = np.random.default_rng(SEED)
    out = {}
    for split, (images, labels) in zip(PER_CLASS, (IDX_FILES[:2], IDX_FILES[2:]), strict=True):
        x, y = read_idx(find(images)), read_idx(find(labels))
        idx = pick(y, PER_CLASS[split], rng)
        out[f"x_{split}"], out[f"y_{split}"] = x[idx], y[idx]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(SYSTEM_FASHION_MNIST_DIR), help="folder with the IDX files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    arrays = build(args.src)
    np.savez_compressed(args.out, **arrays)
    digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()
    sizes = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) {sizes} arrays sha256={digest[:16]}")


if __name__ == "__main__":
    main()
