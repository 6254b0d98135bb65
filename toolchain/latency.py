"""Latency budgets: a per-layer ONNX Runtime latency table, measured once per model, predicts a policy's
batch latency so the search can respect ``--max-latency-ms`` without exporting every candidate.

**Layer times.** Each compressible layer is exported alone in every weight *format* the action space can
give it and timed on ONNX Runtime at the budget's batch size. A format is what decides which kernel ORT runs:
the container (``fp32``, ``w8`` for 5..8 bits, ``w4`` for 2..4 bits), the scheme (``-asym``) and per-group
scales (``-group``). Each is exported exactly as lowering writes it (uint8 input Q/DQ, an output quantizer, the
``fold`` weight format, so ORT fuses ``QLinearConv`` / ``QGemm`` where it can; per-group convs stay
``DequantizeLinear`` + float kernel). :func:`fast_formats` reads from the table which formats run no slower
than int8 here; the default search space offers only those.

**Pruned layers** are timed too: each prunable layer is timed in int8 with only its output channels, and with
only its input channels (where its input is pruned), cut to the keep ratios ``CURVE_KEEPS`` (channel counts
rounded as lowering rounds them). Its ``keep_out`` / ``keep_in`` curves map the fraction of channels kept on
that side to the fraction of time left: a layer's time does not fall in proportion to its multiply-accumulates
(fewer output channels parallelise worse than fewer input channels; small layers are overhead-bound). A pruned
layer's time is its format's full time times the product of the two curves at its kept fractions (linear
scaling on a side without a curve).

**The rest of the network** (activations, pooling, residual adds, the Q/DQ between layers) is calibrated
against whole models lowered the real way (output and residual-block quantizers included, ranges from
noise): the fp32 model, uniform int8, and uniform int8 with every prunable group cut to ``anchor_keep``.
``rest = whole - sum(layer times)`` at each anchor; a policy's rest interpolates between the fp32 and the
int8 rest by its quantized share of the fp32 layer time, and linearly in its mean kept output fraction. The
three anchors are therefore predicted exactly, and the final artifact's measured latency is always reported
beside the prediction.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hirelc.cost import group_keeps, kept_channels, kept_shape
from hirelc.export import ORT_PROBE, export_fp32, export_lowered
from hirelc.export.runtime import median_latency
from hirelc.lower import LowerConfig, calibrate, freeze, lower_model, swap_quantized
from hirelc.machine import record
from hirelc.policy import (
    FORMAT_KEYS,
    LayerPolicy,
    PerChannel,
    PerGroup,
    Scheme,
    check_layer,
    format_key,
    uniform_policy,
)
from hirelc.qmodules import ActQuant, quant_layers
from hirelc.topology import LayerSpec, Topology

LATENCY_TABLE = "latency_table.json"  # the search's table, batch 8


def table_file(batch: int) -> str:
    """The run directory's file for the latency table of ``batch`` (``latency_table.json`` for batch 8)."""
    return LATENCY_TABLE if batch == 8 else f"latency_table_b{batch}.json"
TABLE_VERSION = 5  # 3: layers timed in the fold weight format with output quantizers; 5: keep curves
CURVE_KEEPS = (0.25, 0.5, 0.75)  # keep ratios each prunable layer is timed at (int8)
GROUP_SIZES = (32, 64)  # per-group formats are timed at the smallest of these the layer accepts
ANCHOR_KEEP = 0.5


variant = format_key  # the table key of a layer policy's weight format


def _formats(spec: LayerSpec, group_sizes: tuple[int, ...]) -> dict[str, LayerPolicy | None]:
    """One representative policy per format this layer can take (per-group only where a group size fits)."""
    out: dict[str, LayerPolicy | None] = {"fp32": None}
    for bits in (8, 4):
        for scheme in Scheme:
            grans = [PerChannel()] + [PerGroup(g) for g in sorted(group_sizes)
                                      if check_layer(spec, LayerPolicy(bits=bits, granularity=PerGroup(g))) is None][:1]
            for gran in grans:
                lp = LayerPolicy(bits=bits, scheme=scheme, granularity=gran)
                out[variant(lp)] = lp
    return out


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


def _single_layer(mod: nn.Module, lp: LayerPolicy | None, in_shape: tuple[int, ...]) -> nn.Module:
    """``mod`` alone, quantized as lowering would quantize it inside the network."""
    wrap = nn.Sequential(copy.deepcopy(mod))
    if lp is not None:
        swap_quantized(wrap, {"0": lp})
        q = quant_layers(wrap)["0"]
        if not isinstance(lp.granularity, PerGroup):
            q.out_act = ActQuant()  # inside the network its output is quantized (next layer or lowering)
        calibrate(wrap, [torch.randn(in_shape)])
        freeze(wrap)
    return wrap.eval()


class _NoiseData:
    """Stands in for a data bundle when a model is lowered only to be timed: one batch of noise."""

    def __init__(self, input_shape: tuple[int, ...]):
        self.input_shape = input_shape

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch_size, *self.input_shape[1:]), generator=g)
        return [(x, torch.zeros(batch_size, dtype=torch.long))]


def lowered_on_noise(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy]) -> nn.Module:
    """``model`` lowered for ``layers`` the real way (ORT-placed quantizers) but without fine-tuning and with
    activation ranges from one batch of noise: enough to measure its graph's time or bytes, not its accuracy."""
    return lower_model(model, topo, layers, _NoiseData(topo.input_shape),
                       LowerConfig(epochs=0, batch_size=16, calib_batches=1), progress=False, probe=ORT_PROBE)[0]


def time_lowered(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy], batch: int, runs_: int,
                 path: Path) -> float:
    """Lower ``model`` for ``layers`` the real way (no fine-tuning, ranges from noise), export, time it."""
    export_lowered(lowered_on_noise(model, topo, layers), topo.input_shape, path, check_runtime=False)  # timed next
    return median_latency(path, (batch, *topo.input_shape[1:]), runs=runs_, warmup=3)


def _shares(table: dict, topo: Topology, layers: dict[str, LayerPolicy], keeps: dict[int, float]) -> tuple[float, float]:
    """(quantized share, mean kept output fraction) of a policy, both weighted by the layers' fp32 time."""
    w = {s.name: table["layers"][s.name]["fp32"] for s in topo.layers}
    total = sum(w.values()) or 1.0
    q = sum(w[s.name] for s in topo.layers if layers[s.name].bits is not None) / total
    k = sum(w[s.name] * kept_shape(s, layers, keeps)[0] / s.out_features for s in topo.layers) / total
    return q, k


def _interp(curve: list | None, frac: float) -> float:
    """A keep curve's time fraction at ``frac`` of the channels kept: interpolated between measured points,
    proportional below the smallest one; ``frac`` itself without a curve."""
    if not curve or frac >= 1.0:
        return frac
    xs, ys = zip(*sorted(curve), strict=True)
    if frac < xs[0]:
        return frac * ys[0] / xs[0]
    return float(np.interp(frac, xs, ys))


def time_fraction(row: dict, out_fraction: float, in_fraction: float = 1.0) -> float:
    """The fraction of a layer's full time left when pruning keeps ``out_fraction`` of its output channels and
    ``in_fraction`` of its input channels: the product of its two measured keep curves (each the kept fraction
    itself where the layer has no curve)."""
    return _interp(row.get("keep_out"), out_fraction) * _interp(row.get("keep_in"), in_fraction)


def _layer_sum(table: dict, topo: Topology, layers: dict[str, LayerPolicy], keeps: dict[int, float]) -> float:
    total = 0.0
    for s in topo.layers:
        out, inn = kept_shape(s, layers, keeps)
        row = table["layers"][s.name]
        key = variant(layers[s.name])
        if key not in row:  # a per-group format the layer was not timed in: nearest timed format
            key = key.removesuffix("-group")
        total += row[key] * time_fraction(row, out / max(1, s.out_features), inn / max(1, s.in_features))
    return total


def _pruned_layer(mod: nn.Module, spec: LayerSpec, out: int, inn: int, in_shape: tuple[int, ...]):
    """(a copy of ``mod`` with ``out`` output and ``inn`` input channels, its input shape), or None for a layer
    pruning does not shrink this way (grouped convs, attention pruned by heads)."""
    if isinstance(mod, nn.Conv2d):
        if spec.kind == "dwconv":
            new = nn.Conv2d(out, out, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups=out,
                            bias=mod.bias is not None)
            return new.eval(), (in_shape[0], out, *in_shape[2:])
        if mod.groups != 1:
            return None
        new = nn.Conv2d(inn, out, mod.kernel_size, mod.stride, mod.padding, mod.dilation, bias=mod.bias is not None)
        return new.eval(), (in_shape[0], inn, *in_shape[2:])
    if isinstance(mod, nn.Linear):
        return nn.Linear(inn, out, bias=mod.bias is not None).eval(), (*in_shape[:-1], inn)
    return None


def _keep_curves(model: nn.Module, spec: LayerSpec, in_shape: tuple[int, ...], full_ms: float, batch: int,
                 runs_: int, tmp: Path) -> dict[str, list[list[float]]]:
    """``keep_out`` / ``keep_in``: [[kept channel fraction, time / full time], ...] of one layer timed in int8 with
    only its output (input) channels cut to ``CURVE_KEEPS``, for the sides pruning can cut."""
    sides = {}
    if spec.prunable and not spec.grouped_tied and spec.kind != "attn_qkv":
        sides["keep_out"] = True
    if spec.input_group >= 0 and spec.kind != "dwconv" and not spec.grouped_tied:
        sides["keep_in"] = False
    curves: dict[str, list[list[float]]] = {}
    for name, is_out in sides.items():
        n = spec.out_features if is_out else spec.in_features
        points: dict[float, float] = {}
        for keep in CURVE_KEEPS:
            k = kept_channels(n, keep)
            if k >= n or k / n in points:
                continue
            cut = _pruned_layer(model.get_submodule(spec.name), spec, k if is_out else spec.out_features,
                                spec.in_features if is_out else k, in_shape)
            if cut is None:
                break
            mod, shape = cut
            path = tmp / f"{name}{keep}.onnx"
            export_lowered(_single_layer(mod, LayerPolicy(bits=8), shape), shape, path, check_runtime=False)  # timed next
            points[k / n] = median_latency(path, (batch, *shape[1:]), runs=runs_, warmup=3) / max(full_ms, 1e-9)
        if points:
            curves[name] = [[x, points[x]] for x in sorted(points)] + [[1.0, 1.0]]
    return curves


def measure_latency_table(model: nn.Module, topo: Topology, batch: int = 8, runs_: int = 20,
                          progress: bool = True, group_sizes: tuple[int, ...] = GROUP_SIZES,
                          anchor_keep: float = ANCHOR_KEEP) -> dict:
    """Time every layer alone in each format, and the whole model at the three anchors, at ``batch``."""
    model = model.eval()
    shapes = _input_shapes(model, topo)
    table: dict = {"version": TABLE_VERSION, "batch": batch, "machine": machine_key(), "layers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.onnx"
        export_fp32(model, topo.input_shape, full)
        table["fp32_model_ms"] = median_latency(full, (batch, *topo.input_shape[1:]), runs=runs_, warmup=3)
        bar = tqdm(topo.layers, desc="latency table", disable=not progress, leave=False)
        for s in bar:
            in_shape = shapes[s.name]
            row = {}
            for key, lp in _formats(s, group_sizes).items():
                wrap = _single_layer(model.get_submodule(s.name), lp, in_shape)
                path = Path(tmp) / f"{key}.onnx"
                if lp is None:
                    export_fp32(wrap, in_shape, path)
                else:
                    export_lowered(wrap, in_shape, path, check_runtime=False)  # timed next: it loads or fails there
                row[key] = median_latency(path, (batch, *in_shape[1:]), runs=runs_, warmup=3)
            if "w8" in row:
                row.update(_keep_curves(model, s, in_shape, row["w8"], batch, runs_, Path(tmp)))
            table["layers"][s.name] = row
        int8 = uniform_policy(list(topo.layers), 8, 1.0)
        table["int8_model_ms"] = time_lowered(model, topo, int8, batch, runs_, Path(tmp) / "int8.onnx")
        if any(s.prunable for s in topo.layers):
            table["anchor_policy_keep"] = anchor_keep
            pruned = uniform_policy(list(topo.layers), 8, anchor_keep)
            table["pruned_int8_model_ms"] = time_lowered(model, topo, pruned, batch, runs_, Path(tmp) / "p.onnx")
    return calibrate_rest(table, topo)


def calibrate_rest(table: dict, topo: Topology) -> dict:
    """Set the table's "rest of the network" terms from its whole-model anchors and its layer times (again, after
    the layer times changed): each anchor's measured time minus the sum of its layers' predicted times."""
    fp32 = {s.name: LayerPolicy(bits=None) for s in topo.layers}
    int8 = uniform_policy(list(topo.layers), 8, 1.0)
    table["rest_ms"] = table["fp32_model_ms"] - _layer_sum(table, topo, fp32, {})
    table["int8_rest_ms"] = table["int8_model_ms"] - _layer_sum(table, topo, int8, {})
    if "pruned_int8_model_ms" in table:
        pruned = uniform_policy(list(topo.layers), 8, table.get("anchor_policy_keep", ANCHOR_KEEP))
        keeps = group_keeps(list(topo.layers), pruned)
        table["anchor_keep"] = _shares(table, topo, pruned, keeps)[1]
        table["pruned_int8_rest_ms"] = table["pruned_int8_model_ms"] - _layer_sum(table, topo, pruned, keeps)
    return table


FAST_TOLERANCE = 1.10  # a format is "fast" when its layers together take at most this times their int8 time


def fast_formats(table: dict, tolerance: float = FAST_TOLERANCE) -> tuple[str, ...]:
    """The weight formats that run no slower than symmetric int8 (``w8``) on the machine the table was timed on.

    Each format's time is summed over the layers timed in it and compared with the same layers' ``w8`` time.
    ``w8`` is always offered. With the ``fold`` export every per-tensor / per-channel format should pass; on a
    runtime without that folding 4-bit layers would run as float kernels and drop out here.
    """
    rows = table["layers"].values()
    out = ["w8"]
    for key in FORMAT_KEYS[1:]:
        timed = [r for r in rows if key in r and "w8" in r]
        if timed and sum(r[key] for r in timed) <= tolerance * sum(r["w8"] for r in timed):
            out.append(key)
    return tuple(out)


def machine_key() -> dict:
    """What a table's times depend on: the CPU (name, int8 instruction sets), its cores, ONNX Runtime's version."""
    m = record()
    return {k: m[k] for k in ("cpu", "isa", "cores", "onnxruntime")}


def usable(table: dict, topo: Topology, batch: int | None = None) -> bool:
    """True when ``table`` can predict for ``topo`` here: current format, same layers (and batch, when given),
    measured on this kind of machine (a table timed on another CPU predicts nothing about this one)."""
    return (table.get("version") == TABLE_VERSION and set(table.get("layers", {})) == set(topo.names)
            and (batch is None or table.get("batch") == batch) and table.get("machine") == machine_key())


def predict_latency(table: dict, topo: Topology, layers: dict[str, LayerPolicy]) -> float:
    """Predicted latency (ms, at the table's batch size) of the lowered model for ``layers``."""
    keeps = group_keeps(list(topo.layers), layers)  # once: predictions sit in the search's repair loop
    q, k = _shares(table, topo, layers, keeps)
    rest_int = table["int8_rest_ms"]
    if "anchor_keep" in table and table["anchor_keep"] < 1.0:
        slope = (table["int8_rest_ms"] - table["pruned_int8_rest_ms"]) / (1.0 - table["anchor_keep"])
        rest_int -= slope * (1.0 - k)
    rest = (1.0 - q) * table["rest_ms"] * k + q * rest_int
    return float(max(_layer_sum(table, topo, layers, keeps) + rest, 0.0))
