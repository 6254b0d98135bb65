"""The run directory: the contract between stages.

Every stage reads its inputs from the run directory and writes its outputs into it atomically (temporary
name in the same directory, then ``os.replace``), so an interrupted stage leaves no half-written file and
``--resume`` can skip what is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

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
FRONT = "front.json"  # the search's Pareto front (hirelc.search.front)
CONFIG = "run_config.json"
GRAPH_BYTES = "graph_bytes.json"  # the exported graph's own bytes (hirelc.evaluate.measure_graph_bytes)
FP32_BYTES = "fp32_bytes.json"  # bytes of the baseline's fp32.onnx, with its checkpoint's digest
PROVENANCE = "provenance.json"  # per artifact: its sha256, the sha256 of the files it was built from, options
LOCK = ".hirelc.lock"  # held (flock) by the one command writing into the run directory


def _default_mode() -> int:
    """The permission bits a new file gets under the process umask (0o666 & ~umask)."""
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


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
        # mkstemp makes 0600 files: keep the mode of the file replaced, else what a new file gets
        mode = path.stat().st_mode & 0o7777 if path.is_file() else _default_mode()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so it can be written as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens: a value that could not be measured is null)."""
    return json.dumps(strict(_plain(obj)), indent=2, sort_keys=False, allow_nan=False, default=_json_default)


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays as Python values, so :func:`strict` sees their floats."""
    import numpy as np  # imported on use: the base helpers load no numerical library

    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file. Written through a file object, so the archive's inner folder is
    always ``archive`` (not the random temporary name): the same object gives the same bytes."""
    import torch  # imported on use: the base helpers load no numerical library

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def read_json(path: str | Path, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise HirelcError(f"{what} {p} is corrupt (not valid JSON): {e}") from None
    except OSError as e:
        raise HirelcError(f"cannot read {what} {p}: {e.strerror or e}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_default(o: Any):
    import numpy as np  # imported on use: the base helpers load no numerical library

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
    measured graph and fp32 file bytes when there are some (they depend on the baseline alone)."""
    sub.mkdir(parents=True, exist_ok=True)
    for name in (BASELINE_META, BASELINE_CKPT, CONFIG, GRAPH_BYTES, FP32_BYTES):
        dst = sub / name
        if dst.exists() or (name in (GRAPH_BYTES, FP32_BYTES) and not (run_dir / name).exists()):
            continue
        try:
            os.link(run_dir / name, dst)
        except OSError:
            shutil.copy2(run_dir / name, dst)


STUDY_OPTIONS = "study_options.json"  # in a study's output folder: the options its finished runs were made with


def differences(was: Mapping[str, Any], now: Mapping[str, Any], keys=None, now_word: str = "now") -> str:
    """``"k A there, B now; ..."`` for each of ``keys`` (default: every key of either, sorted) whose value differs
    between ``was`` and ``now``; empty when none does."""
    keys = sorted(set(was) | set(now)) if keys is None else keys
    return "; ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} {now_word}" for k in keys if was.get(k) != now.get(k))


def open_study_dir(run_dir: str | Path, out_dir: str | Path | None, default: str, finished: str,
                   what: str, options: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """(run dir, output folder) of a study over a trained baseline (``hirelc bench``, ``hirelc ablate``).

    The output folder defaults to ``run_dir/default``; one that already holds ``finished`` is refused so a
    finished study is never overwritten (an interrupted one, without it, resumes). ``options`` are what every
    run of the study depends on (budget, effort, fine-tuning): kept in the folder when the study starts, and an
    interrupted study resumed with other ones is refused, since its finished runs would be reused as if they
    had been made with them.
    """
    rd = require_run_dir(run_dir, BASELINE_META, BASELINE_CKPT, CONFIG)
    out = Path(out_dir) if out_dir is not None else rd / default
    if (out / finished).exists():
        raise HirelcError(f"{out} already holds a finished {what} ({finished}); give another --out")
    now = None if options is None else json.loads(json.dumps(strict(_plain(dict(options))), default=_json_default))
    kept = out / STUDY_OPTIONS
    if now is not None and kept.is_file():
        diff = differences(read_json(kept, f"{what} options"), now)
        if diff:
            raise HirelcError(f"{out} holds an unfinished {what} made with other options ({diff}): resume it with "
                              f"the same options, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    if now is not None and not kept.is_file():
        atomic_write_json(kept, now)
    return rd, out


# ---------------------------------------------------------------- provenance: what each artifact was built from


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def options_digest(options: Any) -> str:
    """A short stable digest of JSON-able options (key order does not matter)."""
    text = json.dumps(strict(_plain(options)), sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json_object(path: Path, what: str) -> dict:
    """``path``'s JSON object; {} when the file does not exist, an error naming it when it holds anything else."""
    if not path.is_file():
        return {}
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise HirelcError(f"{path} is corrupt (not a JSON object)")
    return obj


def read_provenance(rd: Path) -> dict:
    return read_json_object(rd / PROVENANCE, "provenance record")


def record(rd: str | Path, artifact: str, inputs: tuple[str, ...] | list[str] = (), options: Any = None) -> None:
    """Note in ``provenance.json`` that ``artifact`` (a file of ``rd``) was just built from the files ``inputs``
    (of ``rd``) with ``options``: the sha256 of each, and the options' digest."""
    rd = Path(rd)
    prov = read_provenance(rd)
    prov[artifact] = {"sha256": file_digest(rd / artifact),
                      "inputs": {n: file_digest(rd / n) for n in inputs if (rd / n).is_file()},
                      "options": options_digest(options)}
    atomic_write_json(rd / PROVENANCE, prov)


def forget(rd: str | Path, *artifacts: str) -> None:
    """Drop the records of ``artifacts`` (they are being rebuilt)."""
    rd = Path(rd)
    prov = read_provenance(rd)
    if any(a in prov for a in artifacts):
        atomic_write_json(rd / PROVENANCE, {k: v for k, v in prov.items() if k not in artifacts})


def stale(rd: str | Path, artifact: str, inputs: tuple[str, ...] | list[str] = (), options: Any = None,
          check_options: bool = True) -> str | None:
    """Why ``artifact`` is not what building it from the current ``inputs`` with ``options`` gives, or None when
    it is: missing, no record, changed since it was written, built from other input files, other options."""
    rd = Path(rd)
    if not (rd / artifact).is_file():
        return f"{artifact} is missing"
    entry = read_provenance(rd).get(artifact)
    if not isinstance(entry, dict):
        return f"{artifact} has no provenance record (not built by this hirelc in {rd})"
    if entry.get("sha256") != file_digest(rd / artifact):
        return f"{artifact} was changed after it was built"
    recorded = entry.get("inputs") or {}
    for n in inputs:
        if not (rd / n).is_file():
            return f"{artifact} was built from {n}, which is missing now"
        if recorded.get(n) != file_digest(rd / n):
            return f"{artifact} was not built from the current {n}"
    if check_options and entry.get("options") != options_digest(options):
        return f"{artifact} was built with other options"
    return None


# ---------------------------------------------------------------- one writer per run directory


_HELD: set[str] = set()  # run directories this process holds the lock of


@contextlib.contextmanager
def locked(run_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold the run directory's lock for the block: a second writer gets a one-line error naming the holder.

    The lock is an ``flock`` on ``.hirelc.lock``; the kernel drops it when the holder exits, even on kill -9,
    so it can never go stale. While it is held, temporary files of writers that died (``.NAME.*.tmp``) are
    removed: nobody else can be writing them.
    """
    import fcntl  # POSIX only; imported where the lock is taken

    rd = Path(run_dir)
    if rd.exists() and not rd.is_dir():
        raise HirelcError(f"run directory {rd} is a file, not a directory")
    key = str(rd.resolve())
    if key in _HELD:  # this process holds it already (a library call inside a command): nothing to take
        yield rd
        return
    created = not rd.exists()
    rd.mkdir(parents=True, exist_ok=True)
    path = rd / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _default_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise HirelcError(f"run directory {rd} is in use by {holder}; wait for it or use another "
                              f"--run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (hirelc {command}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        _HELD.add(key)
        remove_litter(rd)
        yield rd
    finally:
        _HELD.discard(key)
        if created and [p.name for p in rd.iterdir()] == [LOCK]:  # made for a command that wrote nothing
            path.unlink()
            rd.rmdir()
        os.close(fd)  # releases the flock


def remove_litter(rd: Path) -> list[Path]:
    """Delete temporary files left in ``rd`` (and its study folders) by writers that were killed."""
    gone = []
    for p in list(rd.glob(".*.tmp")) + list(rd.glob("*/.*.tmp")) + list(rd.glob("*/*/.*.tmp")):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


def is_empty(rd: Path) -> bool:
    """True when ``rd`` holds nothing but its lock file."""
    return not any(p.name != LOCK for p in rd.iterdir())
