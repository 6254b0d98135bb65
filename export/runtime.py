"""ONNX Runtime sessions, predictions, fused-op counts and interleaved latency measurements.

``onnxruntime`` is imported inside the functions so that importing :mod:`hirelc.export` stays cheap.
Accelerated providers are never a silent fallback: asking for one that this onnxruntime build lacks is an
error, and :func:`available_providers` reports what exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from hirelc.errors import HirelcError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# Ops counted by fused_op_counts: integer kernels ORT fused, what is left of QDQ, and float compute.
FUSED_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "MatMulNBits", "ConvInteger", "QLinearAdd")
QDQ_OPS = ("DequantizeLinear", "QuantizeLinear")
FLOAT_OPS = ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul")


def available_providers() -> dict[str, bool]:
    """Execution provider name -> whether this onnxruntime build has it."""
    import onnxruntime as ort  # imported on use, as in all of hirelc.export

    have = set(ort.get_available_providers())
    return {name: name in have for name in PROVIDERS.values()}


def _session_options(threads: int | None, level: str = "all", spin: bool = False):
    import onnxruntime as ort  # imported on use, as in all of hirelc.export

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    # ORT's intra-op threads busy-wait for a while after each run by default. With several sessions in one
    # process (interleaved timing, the latency table) the idle session's spinning threads take the cores from
    # the session being timed: on a 2-core machine that inflated medians 2-3x and reordered artifacts.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    # Blocked int4 DQ + MatMul fuses to MatMulNBits, which by default quantizes activations; keep it exact.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    return so


def _load(model: str | Path | bytes, so, providers: list[str]):
    import onnxruntime as ort  # imported on use, as in all of hirelc.export

    where = "in-memory model" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise HirelcError(f"ONNX model not found: {model}")
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HirelcError(f"ONNX Runtime cannot load {where}: {msg}") from None


def make_session(path: str | Path | bytes, provider: str = "cpu", threads: int | None = None, spin: bool = False,
                 provider_options: dict | None = None, profile_prefix: str | None = None):
    """An ``InferenceSession`` on ``provider`` ("cpu", "cuda", "tensorrt"); threads default to all cores.

    ``spin=False`` (the default) stops idle intra-op threads from busy-waiting, so that sessions timed side by
    side do not slow each other down; a single latency-critical session in production may prefer ``True``.
    ``provider_options`` go to the requested provider; ``profile_prefix`` turns on ORT's profiler.
    """
    if provider not in PROVIDERS:
        raise HirelcError(f"unknown provider {provider!r} (use {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    have = available_providers()
    if not have[name]:
        raise HirelcError(f"{name} is unavailable in this onnxruntime build "
                          f"(available: {', '.join(k for k, v in have.items() if v)})")
    if provider != "cpu":
        _preload_gpu_libraries()
    # CPU as the second provider runs the ops the accelerator lacks (what_ran reports how many)
    providers = [(name, provider_options or {})] + ([] if provider == "cpu" else ["CPUExecutionProvider"])
    so = _session_options(threads, spin=spin)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    sess = _load(path, so, providers)
    if name not in sess.get_providers():
        raise HirelcError(f"{name} failed to initialise for {path if not isinstance(path, bytes) else 'model'}")
    return sess


def _preload_gpu_libraries() -> None:
    """Load the CUDA, cuDNN and TensorRT libraries of the pip wheels (onnxruntime-gpu >= 1.21), so that no system
    CUDA is needed; a no-op on builds without ``preload_dlls``."""
    import onnxruntime as ort  # imported on use, as in all of hirelc.export

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # a missing library shows up as the provider failing to initialise, with its name
            pass


def ort_predict(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for ``x`` (N, C, H, W), run in batches."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def ort_accuracy(sess, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    y = np.asarray(y)
    return float(100.0 * (ort_predict(sess, x, batch_size).argmax(1) == y).mean()) if len(y) else 0.0


def optimized_graph(path: str | Path | bytes, level: str = "all"):
    """The graph (``onnx.GraphProto``) ONNX Runtime's CPU EP actually runs after its optimizations at ``level``."""
    import onnx  # imported on use, like onnxruntime

    with tempfile.TemporaryDirectory(prefix="hirelc-ort-") as d:
        so = _session_options(1, level)
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        _load(path, so, ["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph


def optimized_ops(path: str | Path | bytes, level: str = "all") -> list[tuple[str, str]]:
    """(op_type, node name) of the graph ONNX Runtime actually runs after its optimizations at ``level``."""
    return [(n.op_type, n.name) for n in optimized_graph(path, level).node]


def fused_op_counts(path: str | Path | bytes, level: str = "all") -> dict[str, int]:
    """Counts of integer (fused), leftover Q/DQ and float compute ops in ORT's optimized graph."""
    ops = Counter(op for op, _ in optimized_ops(path, level))
    return {op: ops.get(op, 0) for op in (*FUSED_OPS, *QDQ_OPS, *FLOAT_OPS)}


def benchmark_interleaved(paths: dict[str, str | Path], input_shape: tuple[int, ...], batch_sizes=(1, 8),
                          runs: int = 50, warmup: int = 5, threads: int | None = None,
                          seed: int = 0) -> dict[str, dict[int, dict]]:
    """Latency of several models measured side by side on ONNX Runtime CPU:
    ``{name: {batch: {median_ms, p90_ms, mean_ms, runs}}}``.

    Sessions are created once; then each round runs every model once, in an order rotated every round, so
    the noise of a shared machine falls on all models alike. ``input_shape`` is one sample's (C, H, W) or
    (1, C, H, W).
    """
    if not paths:
        raise HirelcError("benchmark: no models given")
    return benchmark_runners({k: _ort_runner(make_session(p, threads=threads)) for k, p in paths.items()},
                             input_shape, batch_sizes, runs, warmup, seed)


def benchmark_runners(runners: dict[str, Callable[[np.ndarray], object]], input_shape: tuple[int, ...],
                      batch_sizes=(1, 8), runs: int = 50, warmup: int = 5,
                      seed: int = 0) -> dict[str, dict[int, dict]]:
    """Like :func:`benchmark_interleaved`, for models already loaded: ``runners`` map a name to a function
    running one batch (an ONNX Runtime session, an OpenVINO request, ...)."""
    if not runners:
        raise HirelcError("benchmark: no models given")
    if runs < 1:
        raise HirelcError(f"benchmark: runs must be >= 1, got {runs}")
    shape = tuple(input_shape)[-3:]
    rng = np.random.default_rng(seed)
    result: dict[str, dict[int, dict]] = {k: {} for k in runners}
    for b in batch_sizes:
        times = _timed_rounds(runners, rng.standard_normal((b, *shape), dtype=np.float32), runs, warmup)
        for k, t in times.items():
            result[k][b] = {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                            "mean_ms": float(t.mean()), "runs": int(t.size)}
    return result


def _ort_runner(sess) -> Callable[[np.ndarray], object]:
    name = sess.get_inputs()[0].name
    return lambda feed: sess.run(None, {name: feed})


def _timed_rounds(runners: dict[str, Callable[[np.ndarray], object]], feed: np.ndarray, runs: int,
                  warmup: int) -> dict[str, np.ndarray]:
    """Milliseconds of each runner's call on ``feed``, ``warmup + runs`` rounds, the first ``warmup`` not
    kept; every round runs each model once, in an order rotated from round to round."""
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            run = runners[k]
            t0 = time.perf_counter()
            run(feed)
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in times.items()}


def median_latency(path: str | Path | bytes, shape: tuple[int, ...], runs: int = 20, warmup: int = 3,
                   seed: int = 0, threads: int | None = None) -> float:
    """Median milliseconds of one model's run on a seeded random input of the full ``shape`` (any rank)."""
    feed = np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
    runner = _ort_runner(make_session(path, threads=threads))
    return float(np.median(_timed_rounds({"m": runner}, feed, runs, warmup)["m"]))


# ---------------------------------------------------------------- memory a session needs

_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort

def rss_mb():  # resident set now (MiB)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

path, shape, batches, threads = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
xs = {b: np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32) for b in batches}
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.log_severity_level = 3
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
base = rss_mb()
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
out = {"session": rss_mb() - base}
name = sess.get_inputs()[0].name
for b in batches:
    sess.run(None, {name: xs[b]})
    out[str(b)] = rss_mb() - base
print(json.dumps({"base_mb": base, "growth_mb": out}))
"""


def session_memory(path: str | Path, shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 8),
                   threads: int | None = None, timeout_s: float = 300.0) -> dict:
    """Memory an ONNX Runtime CPU session of ``path`` needs, measured in a fresh Python process so that no
    other session's allocations hide it: the growth of the process's resident set (MiB) from just before the
    session is created (onnxruntime imported, inputs allocated) to after it is created (``session``) and after
    one run at each batch size in turn (``"1"``, ``"8"``: the arena ONNX Runtime keeps for activations stays
    resident). ``peak_mb`` is the largest of them. ``shape`` is one input's (C, H, W).

    Linux only (``/proc``); elsewhere the figures are None.
    """
    if not Path("/proc/self/statm").exists():
        return {"base_mb": None, "growth_mb": None, "peak_mb": None}
    cmd = [sys.executable, "-c", _MEMORY_PROBE, str(path), json.dumps(list(shape)), json.dumps(list(batch_sizes)),
           str(threads or os.cpu_count() or 1)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise HirelcError(f"measuring the memory of {path} took more than {timeout_s:.0f} s") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise HirelcError(f"cannot measure the memory of {path}: {last}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["peak_mb"] = round(max(out["growth_mb"].values()), 2)
    out["growth_mb"] = {k: round(v, 2) for k, v in out["growth_mb"].items()}
    out["base_mb"] = round(out["base_mb"], 2)
    return out
