"""Deploy targets: the runtimes ``hirelc verify`` and ``hirelc bench`` measure an ONNX file on.

=================  ==============================================================================================
target             what runs the file
=================  ==============================================================================================
``ort-cpu``        ONNX Runtime, CPU execution provider (the default)
``ort-cuda``       ONNX Runtime, CUDA execution provider (``onnxruntime-gpu``); ops it lacks go to the CPU
``ort-tensorrt``   ONNX Runtime, TensorRT execution provider, int8 enabled, engine and timing caches kept in
                   the run directory (``trt_cache/``) so a second verify does not rebuild the engines
``openvino``       OpenVINO Runtime on its CPU device, float layers kept in fp32 (``INFERENCE_PRECISION_HINT``)
=================  ==============================================================================================

:func:`open_target` gives a :class:`TargetSession`: logits for a batch, and :meth:`TargetSession.what_ran`, what
the runtime really executed: for ONNX Runtime the share of kernels placed on the requested provider (from a
profiled run); for TensorRT also whether the quantized part went into its engines; for OpenVINO the runtime
precision of every convolution and matrix multiplication (from its runtime model). A target this machine cannot
run is an error naming what is missing, never a silent fallback to the CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from hirelc.errors import HirelcError
from hirelc.export.runtime import PROVIDERS, available_providers, benchmark_runners, make_session, optimized_graph
from hirelc.options import TARGETS

ORT_TARGETS = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}
GPU_EXTRA = 'onnxruntime-gpu in place of onnxruntime, as the README\'s GPU section shows'
OPENVINO_EXTRA = 'pip install -e ".[openvino]"'
TRT_CACHE = "trt_cache"
# OpenVINO runtime layer types that do the multiply-accumulate work
OV_COMPUTE = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm")
OV_INTEGER = ("u8", "i8", "u4", "i4")


def _openvino():
    try:
        import openvino  # an optional extra: imported only when the target is asked for
    except ImportError:
        raise HirelcError(f"target openvino: the openvino package is not installed ({OPENVINO_EXTRA})") from None
    return openvino


def check_target(target: str) -> None:
    """Raise a one-line error naming what is missing when this machine cannot run ``target``."""
    if target not in TARGETS:
        raise HirelcError(f"unknown target {target!r} (use {', '.join(TARGETS)})")
    if target == "openvino":
        ov = _openvino()
        if "CPU" not in ov.Core().available_devices:
            raise HirelcError("target openvino: OpenVINO sees no CPU device")
        return
    provider = PROVIDERS[ORT_TARGETS[target]]
    if not available_providers()[provider]:
        raise HirelcError(f"target {target}: {provider} is unavailable in this onnxruntime build "
                          f"(install the gpu extra: {GPU_EXTRA})")


def runtime_version(target: str) -> str:
    """``onnxruntime 1.32.0 (CPUExecutionProvider)`` / ``openvino 2026.4.1 (CPU)``."""
    if target == "openvino":
        return f"openvino {_openvino().__version__.split('-')[0]} (CPU)"
    import onnxruntime as ort  # imported on use, as in all of hirelc.export

    return f"onnxruntime {ort.__version__} ({PROVIDERS[ORT_TARGETS[target]]})"


class TargetSession:
    """One ONNX file loaded on one target: ``session(x)`` gives the logits of the batch ``x``."""

    def __init__(self, target: str, path: Path, run: Callable[[np.ndarray], np.ndarray],
                 what_ran: Callable[[], dict]):
        self.target, self.path, self._run, self._what_ran = target, path, run, what_ran

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for ``x`` (N, C, H, W), run in batches."""
        outs = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
        """Top-1 accuracy in percent."""
        return float(100.0 * (self.predict(x, batch_size).argmax(1) == np.asarray(y)).mean()) if len(y) else 0.0

    def what_ran(self) -> dict:
        """What the runtime really executed for this file (see the module docstring)."""
        return self._what_ran()


def open_target(target: str, path: str | Path, threads: int | None = None,
                cache_dir: str | Path | None = None) -> TargetSession:
    """Load ``path`` on ``target``; ``cache_dir`` holds TensorRT's engine and timing caches (ort-tensorrt)."""
    check_target(target)
    path = Path(path)
    if target == "openvino":
        return _openvino_session(path, threads)
    options = _trt_options(cache_dir) if target == "ort-tensorrt" else None
    sess = make_session(path, ORT_TARGETS[target], threads=threads, provider_options=options)
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    def what_ran() -> dict:
        out = ort_placement(path, ORT_TARGETS[target], sess.get_inputs()[0].shape, threads, options)
        if target == "ort-tensorrt":
            out["tensorrt_check"] = tensorrt_check(path)
            qdq_off = sum(n for (prov, op), n in out.pop("_by_op").items()
                          if prov != PROVIDERS["tensorrt"] and op in ("QuantizeLinear", "DequantizeLinear"))
            out["int8_engine"] = bool(out["on_provider"]) and qdq_off == 0 and out["tensorrt_check"]["ok"]
            out["cached_engines"] = sorted(p.name for p in Path(options["trt_engine_cache_path"]).glob("*.engine"))
        else:
            out.pop("_by_op")
        return out

    return TargetSession(target, path, run, what_ran)


def measure_artifacts(target: str, paths: dict[str, str | Path], x: np.ndarray, y: np.ndarray,
                      shape: tuple[int, ...], batch_sizes=(1, 8), runs: int = 50, warmup: int = 5,
                      threads: int | None = None, cache_dir: str | Path | None = None, eval_batch: int = 256,
                      with_sessions: Callable[[dict[str, TargetSession]], object] | None = None):
    """Every model of ``paths`` on one target: ``({name: {top1, what_ran, latency: {batch: stats}}}, extra)``,
    latencies interleaved within the target (:func:`~hirelc.export.runtime.benchmark_runners`). ``with_sessions``
    is called with the loaded sessions before they are timed; ``extra`` is what it returns (None without it)."""
    sessions = {k: open_target(target, p, threads, cache_dir=cache_dir) for k, p in paths.items()}
    res = {k: {"top1": s.accuracy(x, y, eval_batch), "what_ran": s.what_ran()} for k, s in sessions.items()}
    extra = with_sessions(sessions) if with_sessions is not None else None
    lat = benchmark_runners(sessions, shape, batch_sizes, runs, warmup)
    del sessions
    for k, r in res.items():
        r["latency"] = lat[k]
    return res, extra


def _trt_options(cache_dir: str | Path | None) -> dict:
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="hirelc-trt-"))
    cache.mkdir(parents=True, exist_ok=True)
    # int8 on: the Q/DQ pairs in the file give TensorRT the scales (explicit quantization); fp16 for the rest
    return {"trt_int8_enable": True, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache)}


def ort_placement(path: str | Path, provider: str = "cpu", input_shape=None, threads: int | None = None,
                  provider_options: dict | None = None) -> dict:
    """Which provider ran each kernel of ``path``, from one profiled batch-1 run: ``provider`` (requested),
    ``kernels``, ``on_provider``, ``share`` (on_provider / kernels), ``by_provider`` and ``off_provider_ops``
    (op -> count of the kernels that ran elsewhere)."""
    shape = [d if isinstance(d, int) else 1 for d in (input_shape or [1, 3, 32, 32])]
    with tempfile.TemporaryDirectory(prefix="hirelc-prof-") as d:
        sess = make_session(path, provider, threads=threads, provider_options=provider_options,
                            profile_prefix=os.path.join(d, "profile"))
        sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    kernels = Counter((e["args"].get("provider", "?"), e["args"].get("op_name", "?")) for e in events
                      if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"))
    want = PROVIDERS[provider]
    total = sum(kernels.values())
    on = sum(n for (prov, _), n in kernels.items() if prov == want)
    by_provider = Counter()
    off = Counter()
    for (prov, op), n in kernels.items():
        by_provider[prov] += n
        if prov != want:
            off[op] += n
    return {"provider": want, "kernels": total, "on_provider": on, "share": on / total if total else None,
            "by_provider": dict(by_provider), "off_provider_ops": dict(off), "_by_op": kernels}


def _openvino_session(path: Path, threads: int | None) -> TargetSession:
    ov = _openvino()
    if not path.is_file():
        raise HirelcError(f"ONNX model not found: {path}")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1)}
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as e:  # OpenVINO raises its own RuntimeError subclasses with multi-line messages
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _has_int2(path):  # OpenVINO 2026.4's ONNX frontend stops at the type with no more than this
            msg = f"it cannot read INT2/UINT2 initializers (an opset-25 export): export with --opset 21 ({msg})"
        raise HirelcError(f"OpenVINO cannot load {path}: {msg}") from None
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[compiled.outputs[0]])

    return TargetSession("openvino", path, run, lambda: openvino_precisions(compiled))


def _has_int2(path: Path) -> bool:
    import onnx  # imported on use, as in all of hirelc.export

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    two = (onnx.TensorProto.INT2, onnx.TensorProto.UINT2)
    return any(t.data_type in two for t in model.graph.initializer)


def openvino_precisions(compiled) -> dict:
    """The runtime precision of every compute layer of an OpenVINO compiled model: ``layers`` (name, type,
    runtime ``precision``, ``activations`` type, ``integer``: an integer kernel on integer activations),
    ``by_type`` (type -> precision -> count) and ``integer_share`` (share of integer kernels)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in OV_COMPUTE:
            # an integer kernel takes integer activations; a weight-compressed layer reports its weights' i8/u4
            # as runtime precision while it multiplies float activations
            act = op.input(0).get_element_type().get_type_name() if op.get_input_size() else "?"
            layers.append({"name": op.get_friendly_name(), "type": kind,
                           "precision": info["runtimePrecision"].astype(str), "activations": act,
                           "integer": act in OV_INTEGER})
    by_type: dict[str, dict[str, int]] = {}
    for layer in layers:
        by_type.setdefault(layer["type"], {}).setdefault(layer["precision"], 0)
        by_type[layer["type"]][layer["precision"]] += 1
    n_int = sum(layer["integer"] for layer in layers)
    return {"layers": layers, "by_type": by_type, "compute_layers": len(layers),
            "integer_layers": n_int, "integer_share": n_int / len(layers) if layers else None}


# ---------------------------------------------------------------- what TensorRT will be handed

# Casts TensorRT's ONNX parser rejects: to 8- or 4-bit integers (the folded low-bit form relies on ORT folding them)
_TRT_BAD_CAST = {3: "INT8", 2: "UINT8", 22: "INT4", 21: "UINT4", 26: "INT2", 25: "UINT2"}
_TRT_QDQ_TYPES = {3: "INT8", 22: "INT4"}  # signed, zero point 0: TensorRT's explicit quantization


def tensorrt_check(path: str | Path) -> dict:
    """A static check of the graph ONNX Runtime hands to TensorRT (``path`` after ORT's basic, provider-independent
    optimizations, which fold the widening casts of packed low-bit weights): every QuantizeLinear /
    DequantizeLinear is signed (INT8, or INT4 weights) with zero points 0, no Cast to an 8-/4-bit integer is left,
    and no op is outside the standard ONNX domain. ``ok``, one line per kind of ``problem`` (first 20) and
    ``int32_biases`` (bias DequantizeLinear nodes ORT inserts itself, not counted as problems)."""
    import onnx  # imported on use, as in all of hirelc.export
    from onnx import numpy_helper  # with onnx, on use

    graph = optimized_graph(path, "basic")
    inits = {t.name: t for t in graph.initializer}
    # ORT's own level-1 bias quantization gives every QDQ Conv/Gemm an INT32 bias DequantizeLinear, whatever
    # the provider; they are counted apart (TensorRT's handling of them is only known from a GPU run)
    bias_inputs = {n.input[2] for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    int32_biases = 0
    counted: Counter = Counter()
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in bias_inputs:
            src = inits.get(node.input[0])
            if src is not None and src.data_type == onnx.TensorProto.INT32:
                int32_biases += 1
                continue
        if node.domain not in ("", "ai.onnx"):
            counted[f"{node.op_type} (domain {node.domain}) is not a standard ONNX op"] += 1
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in _TRT_BAD_CAST:
                counted[f"Cast to {_TRT_BAD_CAST[to]} left in the graph"] += 1
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            named = len(node.input) > 2 and bool(node.input[2])
            zp = inits.get(node.input[2]) if named else None
            if named and zp is None:
                counted[f"{node.op_type} zero point is computed, not a constant"] += 1
                continue
            if zp is None:  # no zero point: Q writes UINT8 (ONNX's default); DQ takes its input's type
                src = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
                dtype = src.data_type if src is not None else (2 if node.op_type == "QuantizeLinear" else None)
                if dtype is not None and dtype not in _TRT_QDQ_TYPES:
                    counted[f"{node.op_type} with {onnx.TensorProto.DataType.Name(dtype)} codes "
                            f"(TensorRT takes signed INT8 / INT4)"] += 1
                continue
            kind = _TRT_QDQ_TYPES.get(zp.data_type)
            if kind is None:
                counted[f"{node.op_type} with {onnx.TensorProto.DataType.Name(zp.data_type)} codes "
                        f"(TensorRT takes signed INT8 / INT4)"] += 1
            elif np.any(numpy_helper.to_array(zp) != 0):
                counted[f"{node.op_type} with a non-zero zero point"] += 1
    problems = [f"{n} x {what}" for what, n in counted.items()]
    return {"ok": not problems, "problems": problems[:20], "nodes": len(graph.node), "int32_biases": int32_biases}
