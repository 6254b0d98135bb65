"""The run directory: the contract between stages.

Every stage reads its inputs from the run directory and writes its outputs into it atomically (temporary
name in the same directory, then ``os.replace``), so an interrupted stage leaves no half-written file and
``--resume`` can skip what is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hirelc.errors import HirelcError

# File names inside a run directory (one place, so stages and tests agree).
BASELINE_CKPT = "baseline.pt"
BASELINE_META = "baseline.json"
BASELINE_STATE = "baseline_state.pt"  # an unfinished baseline training (resumed by the next identical call)
POLICY = "policy.json"
LOWERED_MODEL = "lowered.pt"
LOWER_REPORT = "lower_report.json"
FP32_ONNX = "fp32.onnx"
HIRELC_ONNX = "model.onnx"
ORT_INT8_ONNX = "ort_int8.onnx"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SENSITIVITY = "sensitivity.json"
SEARCH_LOG = "search.jsonl"
SEARCH_STATE = "search_state.pt"
CONFIG = "run_config.json"
GRAPH_BYTES = "graph_bytes.json"  # the exported graph's own bytes (hirelc.evaluate.measure_graph_bytes)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: str | Path, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HirelcError(f"{what} {p} is corrupt (not valid JSON): {e}") from None


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def require_run_dir(run_dir: str | Path, *needs: str) -> Path:
    """The run directory, checked to exist and to hold ``needs`` (file names), else a one-line error."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise HirelcError(f"run directory not found: {rd}")
    for n in needs:
        if not (rd / n).exists():
            raise HirelcError(f"{rd / n} is missing: run the stage that writes it first")
    return rd


def link_baseline(run_dir: Path, sub: Path) -> None:
    """Give ``sub`` the baseline of ``run_dir`` (hard links where the filesystem allows, else copies), and its
    measured graph bytes when there are some (they depend on the baseline alone)."""
    sub.mkdir(parents=True, exist_ok=True)
    for name in (BASELINE_META, BASELINE_CKPT, CONFIG, GRAPH_BYTES):
        dst = sub / name
        if dst.exists() or (name == GRAPH_BYTES and not (run_dir / name).exists()):
            continue
        try:
            os.link(run_dir / name, dst)
        except OSError:
            shutil.copy2(run_dir / name, dst)


def open_study_dir(run_dir: str | Path, out_dir: str | Path | None, default: str, finished: str,
                   what: str) -> tuple[Path, Path]:
    """(run dir, output folder) of a study over a trained baseline (``hirelc bench``, ``hirelc ablate``).

    The output folder defaults to ``run_dir/default``; one that already holds ``finished`` is refused so a
    finished study is never overwritten (an interrupted one, without it, resumes).
    """
    rd = require_run_dir(run_dir, BASELINE_META, BASELINE_CKPT, CONFIG)
    out = Path(out_dir) if out_dir is not None else rd / default
    if (out / finished).exists():
        raise HirelcError(f"{out} already holds a finished {what} ({finished}); give another --out")
    out.mkdir(parents=True, exist_ok=True)
    return rd, out
