"""`hirelc bench`: hirelc beside what a user would pick instead, on one model, one dataset and one budget.

From a run directory's trained baseline, one call builds every artifact and measures them side by side:

========================  ==============================================================================
fp32                      the baseline exported as is
ort-int8                  ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations)
uniform-w4                int4 weights everywhere (per-channel), float activations (weight-only)
uniform-int8              hirelc's int8 (per-channel weights, uint8 activations), no pruning
prune-int8                torch-pruning structured pruning with one keep ratio everywhere, sized to hirelc's
                          kept parameter count, then int8
random                    random search over hirelc's action space, same number of real evaluations
flat                      one PPO agent over all layers (no high level, no ensemble), same evaluations
hirelc                    the hierarchical search
========================  ==============================================================================

Every policy-based artifact is lowered with the same fine-tuning epochs. Accuracy is ORT top-1 on the full
test split; latency is the median of interleaved ONNX Runtime runs of all artifacts in one process, so the
machine's noise falls on all of them alike. Results go to ``<out>/bench.json``, ``bench.md`` and two plots
(accuracy against bytes and against batch-8 latency, with the Pareto front).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from hirelc import runs
from hirelc.cost import policy_storage
from hirelc.export import export_fp32, ort_int8_baseline
from hirelc.export.targets import TRT_CACHE, check_target, measure_artifacts
from hirelc.export.verify import what_ran_summary
from hirelc.lower import LowerConfig
from hirelc.options import METHODS, BenchConfig  # noqa: F401 (part of this API)
from hirelc.pipeline import (
    export_stage,
    fp32_file_bytes,
    load_or_measure_graph_bytes,
    lower_stage,
    lowering_record,
    prepare_latency,
    run_bundle,
    search_stage,
    share_latency,
)
from hirelc.policy import PRESETS, LayerPolicy, Policy
from hirelc.report import fmt, md_table
from hirelc.search.plots import plot_bench
from hirelc.studies import report_header
from hirelc.topology import build_topology
from hirelc.train import load_baseline, set_threads

SEARCHED = {"random": "random", "flat": "flat", "hirelc": "hierarchical"}
BENCH_JSON, BENCH_MD = "bench.json", "bench.md"




def uniform_keep_for_params(specs, bits: int, target_params: int):
    """The single keep ratio whose pruned model keeps about ``target_params`` compressible parameters."""
    def kept(k: float) -> int:
        layers = Policy(default=LayerPolicy(bits=bits, keep_ratio=k)).resolve(specs)
        return policy_storage(specs, layers)["kept_params"]

    lo, hi = 0.05, 1.0
    if kept(lo) > target_params:
        return lo
    for _ in range(30):  # kept params grow with k: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) <= target_params else (lo, mid)
    return round(lo, 4)


def _lower_cfg(cfg: BenchConfig, **kw):
    return LowerConfig(epochs=cfg.qat_epochs, max_steps=cfg.lower_max_steps, seed=cfg.seed, **kw)


def _build(rd: Path, out: Path, cfg: BenchConfig, progress: bool, echo) -> dict[str, dict]:
    """Every artifact of the comparison: ``{method: {path, run_dir, search?}}`` (finished ones are reused)."""
    arts: dict[str, dict] = {}
    model, mcfg, _ = load_baseline(rd)
    shape = (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size)
    topo = build_topology(model, shape)
    specs = list(topo.layers)
    fp32 = out / runs.FP32_ONNX
    if not fp32.exists():
        export_fp32(model, shape, fp32)
    if "fp32" in cfg.methods:
        arts["fp32"] = {"path": fp32}
    if "ort-int8" in cfg.methods:
        path = out / runs.ORT_INT8_ONNX
        if not path.exists():
            bundle = run_bundle(rd)
            calib = bundle.subset("train", min(256, len(bundle.train)), seed=0).x.numpy()
            ort_int8_baseline(fp32, path, calib)
        # per-channel int8 weights on every layer: what ort-int8 stores
        int8 = policy_storage(specs, PRESETS["int8"].resolve(specs))["effective_ratio"]
        arts["ort-int8"] = {"path": path, "effective_ratio": int8}

    def lowered(method: str, policy: str, weight_only: bool = False, search: dict | None = None) -> None:
        sub = out / method
        runs.link_baseline(rd, sub)
        onnx_path = sub / runs.HIRELC_ONNX
        if not onnx_path.exists():
            echo(f"  {method}: lowering {policy if '/' not in policy else 'the searched policy'}")
            lower_stage(sub, policy, _lower_cfg(cfg, act_quant=not weight_only), progress=progress)
            export_stage(sub, weight_only=weight_only)
        arts[method] = {"path": onnx_path, "run_dir": sub, "search": search}

    order = [m for m in ("hirelc", "random", "flat") if m in cfg.methods]  # hirelc first: prune-int8 needs it
    if order:  # measured once here, linked into every searched method's folder
        # One latency table (and ORT int8 reference) for every searched method: each judges its candidates by
        # the same predictions and the same default latency budget.
        prepare_latency(rd, model, mcfg, topo, reference=cfg.max_latency_ms is None, progress=progress)
        load_or_measure_graph_bytes(rd, model, topo)
        fp32_file_bytes(rd, model, mcfg)
    for method in order:
        sub = out / method
        runs.link_baseline(rd, sub)  # the search reads the baseline before lowering does
        share_latency(rd, sub)
        summary_path = sub / "search.json"
        if summary_path.exists() and (sub / runs.POLICY).exists():
            summary = runs.read_json(summary_path, "search summary")
        else:
            echo(f"  {method}: searching ({SEARCHED[method]} mode, {cfg.preset} effort)")
            summary = search_stage(sub, target_ratio=cfg.target_ratio, max_latency_ms=cfg.max_latency_ms,
                                   preset=cfg.preset, seed=cfg.seed, progress=progress,
                                   overrides={**cfg.search_overrides, "mode": SEARCHED[method],
                                              "fill_budget": cfg.fill_budget})
        lowered(method, str(sub / runs.POLICY), search=summary)
    for method, preset, weight_only in (("uniform-w4", "w4", True), ("uniform-int8", "int8", False)):
        if method in cfg.methods:
            lowered(method, preset, weight_only=weight_only)
    if "prune-int8" in cfg.methods:
        sub = out / "prune-int8"
        sub.mkdir(parents=True, exist_ok=True)
        target = runs.read_json(out / "hirelc" / runs.LOWER_REPORT, "lower report")["compressible_params_after"]
        keep = uniform_keep_for_params(specs, 8, int(target))
        policy_path = sub / "uniform_policy.json"
        Policy(default=LayerPolicy(bits=8, keep_ratio=keep), name=f"uniform-keep{keep}").save(policy_path)
        lowered("prune-int8", str(policy_path))
        arts["prune-int8"]["keep_ratio"] = keep
    return {m: arts[m] for m in cfg.methods}


def bench(run_dir: str | Path, cfg: BenchConfig | None = None, out_dir: str | Path | None = None,
          progress: bool = True, echo=print) -> dict:
    """Build and measure every method; write bench.json, bench.md and the plots into ``out_dir``."""
    cfg = cfg or BenchConfig()
    # what the built artifacts depend on; methods, targets and timing may change when it is resumed
    built = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "targets", "runs", "batch_sizes")},
             **lowering_record()}  # and this build's lowering
    rd, out = runs.open_study_dir(run_dir, out_dir, "bench", BENCH_JSON, "comparison", options=built)
    set_threads()
    for t in cfg.targets:  # a target this machine cannot run: exit 2 now, not after the searches
        check_target(t)
    t0 = time.time()
    arts = _build(rd, out, cfg, progress, echo)
    build_s = time.time() - t0

    bundle = run_bundle(rd)
    rows: dict[str, dict] = {m: {"file": str(Path(a["path"]).relative_to(out)),
                                 "bytes": Path(a["path"]).stat().st_size} for m, a in arts.items()}
    per_target = {t: measure_on_target(t, arts, bundle, cfg, out, echo) for t in cfg.targets}
    fp32_bytes = (out / runs.FP32_ONNX).stat().st_size
    for m, a in arts.items():
        r = rows[m]
        r.update(top1=per_target[cfg.targets[0]][m]["top1"], latency_ms=per_target[cfg.targets[0]][m]["latency_ms"])
        r["targets"] = {t: per_target[t][m] for t in cfg.targets}
        r["size_ratio"] = fp32_bytes / r["bytes"]
        if "run_dir" in a:
            r["effective_ratio"] = runs.read_json(a["run_dir"] / runs.LOWER_REPORT, "lower report")["effective_ratio"]
        else:
            r["effective_ratio"] = a.get("effective_ratio", 1.0)  # fp32: 1.0
        s = a.get("search")
        r["search_wall_s"] = s["wall_s"] if s else None
        r["real_evals"] = s["n_real_evals"] if s else None
        r["final_fidelity_evals"] = s.get("n_final_fidelity_evals", s["n_real_evals"]) if s else None
        r["surrogate_spearman"] = s.get("surrogate_spearman") if s else None
        # what the latency table promised the search, beside what was measured (None without a budget)
        r["predicted_latency_ms_b8"] = s.get("predicted_latency_ms_b8") if s else None
        if "keep_ratio" in a:
            r["keep_ratio"] = a["keep_ratio"]
    for r in rows.values():
        r["speedup_vs_fp32"] = {b: (rows["fp32"]["latency_ms"][b] / v if "fp32" in rows else None)
                                for b, v in r["latency_ms"].items()}
        r["speedup_vs_ort_int8"] = {b: (rows["ort-int8"]["latency_ms"][b] / v if "ort-int8" in rows else None)
                                    for b, v in r["latency_ms"].items()}
    report = {
        **report_header(rd),
        "data": {"name": bundle.name, "fingerprint": bundle.fingerprint, "test_samples": int(len(bundle.test.y))},
        "config": {**dataclasses.asdict(cfg), "methods": list(cfg.methods), "targets": list(cfg.targets)},
        "build_wall_s": round(build_s, 1),
        "methods": rows,
    }
    plot_bench(rows, "bytes", out / "bench_accuracy_vs_bytes.png", "ONNX file bytes")
    plot_bench(rows, "latency_b8", out / "bench_accuracy_vs_latency.png", "ORT CPU batch-8 latency (ms)")
    runs.atomic_write_json(out / BENCH_JSON, report)
    runs.atomic_write_text(out / BENCH_MD, format_bench(report))
    return report


def measure_on_target(target: str, arts: dict[str, dict], bundle, cfg: BenchConfig, out: Path, echo) -> dict:
    """Every artifact on one target: ``{method: {top1, latency_ms, speedup_vs_ort_int8, what_ran}}``, latencies
    interleaved within the target."""
    x, y = bundle.test.x.numpy(), bundle.test.y.numpy()
    echo(f"  measuring {len(arts)} artifacts on {target} ({len(y)} test images, {cfg.runs} timed runs)")
    check_target(target)
    res, _ = measure_artifacts(target, {m: a["path"] for m, a in arts.items()}, x, y,
                               (bundle.in_chans, bundle.img_size, bundle.img_size), cfg.batch_sizes, cfg.runs,
                               cache_dir=out / TRT_CACHE)
    for r in res.values():
        r["latency_ms"] = {str(b): v["median_ms"] for b, v in r.pop("latency").items()}
    for r in res.values():
        r["speedup_vs_ort_int8"] = {b: (res["ort-int8"]["latency_ms"][b] / v if "ort-int8" in res else None)
                                    for b, v in r["latency_ms"].items()}
    return res


def format_bench(report: dict) -> str:
    """The comparison as a Markdown table (what ``bench.md`` holds and the CLI prints)."""
    bs = [str(b) for b in report["config"]["batch_sizes"]]
    first = list(report["config"].get("targets", ["ort-cpu"]))[0]
    head = ["method", "ORT top-1 %" if first == "ort-cpu" else f"{first} top-1 %", "effective", "bytes", "fp32/size"]
    head += [f"b{b} ms" for b in bs] + [f"b{b} fp32/x" for b in bs] + [f"b{b} ort-int8/x" for b in bs]
    # the search's batch-8 prediction, for reports whose searched methods had a latency budget
    pred = any(r.get("predicted_latency_ms_b8") is not None for r in report["methods"].values())
    head += ["pred b8 ms"] if pred else []
    head += ["search s", "real evals"]
    lines = [
        f"# hirelc bench - {report['model']['name'] if report.get('model') else ''} on {report['data']['name']}",
        "",
        f"{report['created']} - budget {report['config']['target_ratio']}x"
        + (f" and {lat} ms at batch 8" if (lat := report["config"].get("max_latency_ms")) else "")
        + ", search effort "
        f"{report['config']['preset']}, {report['config']['qat_epochs']} fine-tuning epochs, "
        f"{report['config']['runs']} interleaved runs",
        "",
    ]
    rows = []
    for m, r in report["methods"].items():
        cells = [m, f"{r['top1']:.2f}", fmt(r["effective_ratio"], ".2f", "x"), f"{r['bytes']:,}",
                 f"{r['size_ratio']:.2f}x"]
        cells += [f"{r['latency_ms'][b]:.3f}" for b in bs]
        cells += [fmt(r["speedup_vs_fp32"][b], ".2f", "x") for b in bs]
        cells += [fmt(r["speedup_vs_ort_int8"][b], ".2f", "x") for b in bs]
        cells += [fmt(r.get("predicted_latency_ms_b8"), ".3f")] if pred else []
        cells += [fmt(r["search_wall_s"], ".0f"), fmt(r["real_evals"], "d")]
        rows.append(cells)
    lines += md_table(head, rows)
    targets = list(report["config"].get("targets", ["ort-cpu"]))
    lines += ["", "`bN fp32/x`: fp32 latency / this row's (> 1: faster than fp32); likewise for ort-int8.",
              f"Latency: {targets[0]}, medians of interleaved runs in one process."]
    if pred:
        lines.append("`pred b8 ms`: the batch-8 latency the search's latency table predicted for its winner.")
    if targets != ["ort-cpu"]:
        lines += ["", "## Per target", "", "Each target's latencies are interleaved medians within that target; "
                  "`what ran`: the share of kernels on the requested ONNX Runtime provider, or OpenVINO's runtime "
                  "precision of each convolution and matrix multiplication.", ""]
        head = ["target", "method", "top-1 %"] + [f"b{b} ms" for b in bs]
        head += [f"b{b} ort-int8/x" for b in bs] + ["what ran"]
        trows = []
        for t in targets:
            for m, r in report["methods"].items():
                tr = (r.get("targets") or {}).get(t)
                if tr is None:
                    continue
                trows.append([t, m, f"{tr['top1']:.2f}", *(f"{tr['latency_ms'][b]:.3f}" for b in bs),
                              *(fmt(tr["speedup_vs_ort_int8"][b], ".2f", "x") for b in bs),
                              what_ran_summary(tr.get("what_ran"))])
        lines += md_table(head, trows)
    return "\n".join(lines) + "\n"
