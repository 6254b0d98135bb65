"""Latency budgets: a per-layer ONNX Runtime latency table, measured once per model, predicts a policy's
batch latency so the search can respect ``--max-latency-ms`` without exporting every candidate.

Each compressible layer is exported alone (fp32, 8-bit and 4-bit weights with uint8 input Q/DQ, exactly as
the real exporter writes them) and timed on ONNX Runtime at the budget's batch size. A policy's predicted
latency is the time the rest of the network takes (fp32 whole-model latency minus the fp32 layer times) plus,
per layer, the measured time of its container scaled by the fraction of its multiply-accumulates that
pruning keeps. The final artifact's measured latency is always reported beside the prediction.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hirelc import runs
from hirelc.cost import group_keeps, kept_shape
from hirelc.policy import LayerPolicy
from hirelc.topology import Topology

LATENCY_TABLE = "latency_table.json"
CONTAINERS = {"fp32": None, "w8": 8, "w4": 4}


def _container(bits: int | None) -> str:
    return "fp32" if bits is None else ("w4" if bits <= 4 else "w8")


def _input_shapes(model: nn.Module, topo: Topology) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    def hook(_m, inp, name):
        shapes.setdefault(name, tuple(inp[0].shape))  # returns None: the inputs stay untouched

    hooks = [model.get_submodule(s.name).register_forward_pre_hook(lambda m, i, n=s.name: hook(m, i, n))
             for s in topo.layers]
    with torch.no_grad():
        model.eval()(torch.zeros(topo.input_shape))
    for h in hooks:
        h.remove()
    return shapes


def _time_onnx(path: Path, shape: tuple[int, ...], runs_: int) -> float:
    from hirelc.export import make_session

    sess = make_session(path)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs_):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _single_layer(mod: nn.Module, bits: int | None, in_shape: tuple[int, ...]) -> nn.Module:
    from hirelc.lower import calibrate, freeze, swap_quantized

    wrap = nn.Sequential(copy.deepcopy(mod))
    if bits is not None:
        swap_quantized(wrap, {"0": LayerPolicy(bits=bits)})
        calibrate(wrap, [torch.randn(in_shape)])
        freeze(wrap)
    return wrap.eval()


def measure_latency_table(model: nn.Module, topo: Topology, batch: int = 8, runs_: int = 20,
                          progress: bool = True) -> dict:
    """Time every layer alone in each container, and the whole fp32 model, at ``batch``."""
    from tqdm.auto import tqdm

    from hirelc.export import export_fp32, export_lowered

    shapes = _input_shapes(model, topo)
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.onnx"
        export_fp32(model, topo.input_shape, full)
        whole = _time_onnx(full, (batch, *topo.input_shape[1:]), runs_)
        bar = tqdm(topo.layers, desc="latency table", disable=not progress, leave=False)
        for s in bar:
            in_shape = shapes[s.name]
            row = {}
            for cname, bits in CONTAINERS.items():
                wrap = _single_layer(model.get_submodule(s.name), bits, in_shape)
                path = Path(tmp) / f"{cname}.onnx"
                (export_fp32 if bits is None else export_lowered)(wrap, in_shape, path)
                row[cname] = _time_onnx(path, (batch, *in_shape[1:]), runs_)
            table[s.name] = row
    layer_sum = sum(r["fp32"] for r in table.values())
    return {"batch": batch, "fp32_model_ms": whole, "rest_ms": max(whole - layer_sum, 0.0), "layers": table}


def predict_latency(table: dict, topo: Topology, layers: dict[str, LayerPolicy]) -> float:
    """Predicted latency (ms, at the table's batch size) of the lowered model for ``layers``."""
    specs = list(topo.layers)
    keeps = group_keeps(specs, layers)
    total = table["rest_ms"]
    for s in specs:
        out, inn = kept_shape(s, layers, keeps)
        frac = (out * inn) / max(1, s.out_features * s.in_features)
        total += table["layers"][s.name][_container(layers[s.name].bits)] * frac
    return float(total)


def load_or_measure(run_dir: str | Path, model: nn.Module, topo: Topology, batch: int = 8,
                    progress: bool = True) -> dict:
    """The run directory's latency table, measured and saved on first use."""
    path = Path(run_dir) / LATENCY_TABLE
    if path.exists():
        table = runs.read_json(path, "latency table")
        if table.get("batch") == batch and set(table.get("layers", {})) == set(topo.names):
            return table
    table = measure_latency_table(model, topo, batch=batch, progress=progress)
    runs.atomic_write_json(path, table)
    return table


def min_latency(table: dict, topo: Topology, max_prune: float) -> float:
    """A lower bound on what any policy can reach: fastest container per layer at the deepest pruning."""
    total = table["rest_ms"]
    for s in topo.layers:
        frac = (1 - max_prune) if s.prunable or s.input_group >= 0 else 1.0
        total += min(table["layers"][s.name].values()) * frac
    return float(total)
