"""How well the per-layer latency table predicts whole lowered models: resnet18, deit_tiny and mobilenetv2_100,
random policies from the default search space, predicted vs measured batch-8 ONNX Runtime latency.

    HIRELC_BENCH_LATENCY_OUT=latency-model python -m pytest benchmarks/test_bench_latency_model.py -s

Skipped without ``HIRELC_BENCH_LATENCY_OUT``. Each model's table and every measured policy are saved in that
folder as they are done (``<model>.json``), so an interrupted run continues where it stopped; ``summary.json`` and
``summary.md`` give, per model, the median and worst |measured / predicted - 1|, beside the same figures for
predicting pruned layers by their kept multiply-accumulates alone (the table without its keep curves), and how
many policies ORT ran with a float Conv or Gemm kernel (each policy's record keeps its formats and ORT's op
counts).
Measured policies are timed alone (one model per session), like the table's anchors.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hirelc import runs
from hirelc.export import fused_op_counts
from hirelc.latency import (
    calibrate_rest,
    fast_formats,
    measure_latency_table,
    predict_latency,
    time_lowered,
    variant,
)
from hirelc.machine import record
from hirelc.models import build_model, model_config
from hirelc.report import md_table
from hirelc.search.config import SearchConfig
from hirelc.search.space import Constraints, random_policy
from hirelc.topology import build_topology
from hirelc.train import set_threads

OUT = os.environ.get("HIRELC_BENCH_LATENCY_OUT")
MODELS = tuple(os.environ.get("HIRELC_BENCH_LATENCY_MODELS", "resnet18,deit_tiny_patch16_224,mobilenetv2_100").split(","))
POLICIES = int(os.environ.get("HIRELC_BENCH_LATENCY_POLICIES", "10"))
BATCH, SHAPE = 8, (1, 1, 32, 32)

pytestmark = pytest.mark.skipif(not OUT, reason="set HIRELC_BENCH_LATENCY_OUT to a folder to run this benchmark")


def _errors(rows: list[dict], key: str) -> dict:
    e = np.array([abs(r["measured_ms"] / r[key] - 1.0) for r in rows])
    return {"median": float(np.median(e)), "worst": float(e.max()), "n": len(rows)}


def _model(name: str, out: Path) -> dict:
    path = out / f"{name}.json"
    state = runs.read_json(path, "latency benchmark state") if path.is_file() else {"model": name, "policies": []}
    model = build_model(model_config(name, 10, SHAPE[1], SHAPE[2])).eval()
    topo = build_topology(model, SHAPE)
    specs = list(topo.layers)
    if "table" not in state:
        state["table"] = measure_latency_table(model, topo, batch=BATCH, progress=True)
        runs.atomic_write_json(path, state)
    table = state["table"]
    by_macs = copy.deepcopy(table)  # the same table, pruned layers scaled by their kept MACs
    for row in by_macs["layers"].values():
        row.pop("keep_out", None)
        row.pop("keep_in", None)
    calibrate_rest(by_macs, topo)  # its pruned anchor's rest, recomputed for MAC-scaled layers
    space = Constraints.from_config(SearchConfig(formats=fast_formats(table)))
    rng = np.random.default_rng([0, len(name)])
    samples = [random_policy(specs, rng, space) for _ in range(POLICIES)]  # the same sequence on every resume
    with tempfile.TemporaryDirectory() as tmp:
        for i, layers in enumerate(samples):
            if i < len(state["policies"]):
                continue
            onnx_path = Path(tmp) / f"p{i}.onnx"
            measured = time_lowered(model, topo, layers, BATCH, 30, onnx_path)
            ops = fused_op_counts(onnx_path)
            state["policies"].append({
                "index": i, "predicted_ms": predict_latency(table, topo, layers),
                "predicted_by_macs_ms": predict_latency(by_macs, topo, layers), "measured_ms": measured,
                "mean_keep": float(np.mean([lp.keep_ratio for lp in layers.values()])),
                # what to look at when a prediction misses: the formats drawn, and what ORT really ran
                "formats": dict(Counter(variant(lp) for lp in layers.values())),
                # float Conv / FusedConv / Gemm kernels ORT ran: layers left unfused, or left in float by the policy
                # (a ViT's float MatMuls are mostly attention, so they are not counted here; see "ops")
                "float_convs_gemms": ops["Conv"] + ops["FusedConv"] + ops["Gemm"],
                "ops": {k: v for k, v in ops.items() if v},
            })
            runs.atomic_write_json(path, state)
    return state


def test_latency_table_predicts_random_policies():
    out = Path(OUT)
    out.mkdir(parents=True, exist_ok=True)
    set_threads()
    summary = {"machine": record(), "batch": BATCH, "input": list(SHAPE), "policies_per_model": POLICIES,
               "models": {}}
    for name in MODELS:
        state = _model(name, out)
        summary["models"][name] = {"keep_curves": _errors(state["policies"], "predicted_ms"),
                                   "macs_only": _errors(state["policies"], "predicted_by_macs_ms"),
                                   "with_float_convs": sum(1 for r in state["policies"] if r.get("float_convs_gemms"))}
    runs.atomic_write_json(out / "summary.json", summary)
    head = ["model", "policies", "median |m/p-1|", "worst |m/p-1|", "median, MACs only", "worst, MACs only",
            "with float convs"]
    rows = [[m, str(v["keep_curves"]["n"]), f"{v['keep_curves']['median']:.1%}", f"{v['keep_curves']['worst']:.1%}",
             f"{v['macs_only']['median']:.1%}", f"{v['macs_only']['worst']:.1%}", str(v["with_float_convs"])]
            for m, v in summary["models"].items()]
    text = "\n".join([f"# Latency table vs measured, batch {BATCH}, {summary['machine']['cpu']}", "",
                      *md_table(head, rows)]) + "\n"
    runs.atomic_write_text(out / "summary.md", text)
    print("\n" + text + json.dumps(summary["models"], indent=1))
    for v in summary["models"].values():
        assert v["keep_curves"]["n"] == POLICIES and np.isfinite(v["keep_curves"]["median"])
