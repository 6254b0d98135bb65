"""Stages of a run directory, each one function the CLI calls: train -> (search) -> lower -> export ->
baseline -> verify, plus :func:`compress`, which chains them with ``--resume``.

The data a run was trained on is recorded in ``run_config.json`` by :func:`train_stage`; later stages
reload exactly that data from it, so ``hirelc lower --run-dir R`` needs no data options.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hirelc import latency, runs
from hirelc.data import load_data
from hirelc.errors import HirelcError
from hirelc.evaluate import Predictors, RealEvaluator, evaluation_lower_config, measure_graph_bytes
from hirelc.export import (
    ORT_PROBE,
    VerifyConfig,
    benchmark_interleaved,
    export_fp32,
    export_lowered,
    ort_int8_baseline,
    verify_run,
)
from hirelc.export.onnx_export import DEFAULT_OPSET, INT2_OPSET, check_export_options
from hirelc.lower import LowerConfig, load_lowered, lower_model, save_lowered
from hirelc.models import model_config
from hirelc.options import CompressConfig, DataOptions  # noqa: F401 (part of this API)
from hirelc.parallel import distributed, needs_ray
from hirelc.policy import LayerPolicy, Policy, get_policy
from hirelc.search import PRESETS, Budget, check_budget_feasible, fisher_sensitivity, run_search
from hirelc.search.engine import surrogate_prediction
from hirelc.search.front import check_front, competing, front_report, pick, picked_policy
from hirelc.search.plots import plot_front, plot_pareto, plot_policy_heatmap, plot_progress, plot_surrogate
from hirelc.search.space import uniform_grid
from hirelc.topology import Topology, build_topology
from hirelc.train import TrainConfig, evaluate, load_baseline, predict_logits, set_threads, train_baseline


def lowering_record() -> dict:
    """The lowering settings a study's figures rest on besides its own options, as flat keys: the winners' final
    fine-tune (``lower.*``; its length is the study's ``qat_epochs``) and the search's real evaluations
    (``evaluation.*``), seeds left out. They are build defaults, not options, so a study folder or report made by a
    build with other ones is not continued by this one.
    """
    final = asdict(LowerConfig())
    scored = asdict(evaluation_lower_config())
    flat = {**{f"lower.{k}": v for k, v in final.items() if k not in ("seed", "epochs", "max_steps")},
            **{f"evaluation.{k}": v for k, v in scored.items() if k != "seed"}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}  # as a report reads back


def load_bundle(opts: DataOptions, in_chans: int | None = None):
    return load_data(opts.spec, data_dir=opts.data_dir, img_size=opts.img_size, in_chans=in_chans,
                     val_fraction=opts.val_fraction, seed=opts.seed, max_train=opts.max_train)


def run_bundle(run_dir: str | Path):
    """The data bundle a run directory was trained on (from its run_config.json)."""
    rd = runs.require_run_dir(run_dir, runs.CONFIG)
    cfg = runs.read_json(rd / runs.CONFIG, "run config")
    try:
        opts = DataOptions(**cfg["data"])
        # the in_chans the data was *requested* with at train time (None = the data's own) is part of the
        # data fingerprint, so reload with exactly that, not the model's resolved channel count
        in_chans = cfg["in_chans"] if "in_chans" in cfg else int(cfg["model"]["in_chans"])
    except (KeyError, TypeError) as e:
        raise HirelcError(f"{rd / runs.CONFIG} is corrupt: {e}") from None
    return load_bundle(opts, in_chans)


def train_stage(run_dir: str | Path, model: str, data: DataOptions, train_cfg, *, patch_size: int | None = None,
                in_chans: int | None = None, checkpoint: str | None = None, progress: bool = True) -> dict:
    """Train (or reuse) the fp32 baseline and record the run's data and model options."""
    if checkpoint and not Path(checkpoint).is_file():
        raise HirelcError(f"checkpoint not found: {checkpoint}")
    bundle = load_bundle(data, in_chans)
    mcfg = model_config(model, bundle.num_classes, bundle.in_chans, data.img_size, patch_size)
    rd = Path(run_dir)
    if (rd / runs.CONFIG).exists():
        old = runs.read_json(rd / runs.CONFIG, "run config")
        if old.get("model") != mcfg.to_dict() or old.get("data") != asdict(data):
            raise HirelcError(f"{rd} already holds a run for other model/data options; use a new --run-dir")
    rd.mkdir(parents=True, exist_ok=True)
    meta = train_baseline(rd, mcfg, bundle, train_cfg, progress=progress, checkpoint=checkpoint)
    runs.atomic_write_json(rd / runs.CONFIG, {"model": mcfg.to_dict(), "data": asdict(data), "in_chans": in_chans})
    runs.record(rd, runs.BASELINE_CKPT, (), train_options(model, data, train_cfg, patch_size, in_chans, checkpoint))
    return meta


def train_options(model: str, data: DataOptions, train_cfg, patch_size: int | None = None,
                  in_chans: int | None = None, checkpoint: str | None = None) -> dict:
    """What the baseline of a run directory depends on (its provenance record's options)."""
    return {"model": model, "data": asdict(data), "train": asdict(train_cfg), "patch_size": patch_size,
            "in_chans": in_chans, "checkpoint": runs.file_digest(checkpoint) if checkpoint else None}


def lower_run(run_dir: str | Path, policy: Policy, bundle, cfg: LowerConfig, progress: bool = True) -> dict:
    """Lower ``policy`` on the baseline of ``run_dir`` -> lowered.pt + lower_report.json; returns the report."""
    rd = Path(run_dir)
    model, mcfg, meta = load_baseline(rd)
    if meta.get("data", {}).get("fingerprint") != bundle.fingerprint:
        raise HirelcError(
            f"the data given ({bundle.name}, fingerprint {bundle.fingerprint}) is not the data the baseline in "
            f"{rd} was trained on ({meta.get('data', {}).get('fingerprint')})"
        )
    topo = build_topology(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    layers = policy.resolve(list(topo.layers))
    lowered, info = lower_model(model, topo, layers, bundle, cfg, progress=progress, probe=ORT_PROBE)
    val = evaluate(lowered, bundle.loader("val", 256))
    test = evaluate(lowered, bundle.loader("test", 256))
    report = {
        "model": mcfg.to_dict(),
        "data": bundle.describe(),
        "policy": policy.to_dict(),
        "lower_config": asdict(cfg),
        "accuracy": {
            "baseline_val": meta["val_acc"],
            "baseline_test": meta["test_acc"],
            "lowered_val": val,
            "lowered_test": test,
            "test_drop": meta["test_acc"] - test,
        },
        **info,
        # from the run directory's latency table (the one a --max-latency-ms search used), when there is one
        "predicted_latency": stored_prediction(rd, topo, layers),
        "layers": {k: v.to_dict() for k, v in layers.items()},
        "warnings": [f"policy rule {p!r} matches no layer of {mcfg.name}" for p in policy.unmatched(topo.names)],
    }
    save_lowered(rd / runs.LOWERED_MODEL, lowered, mcfg, policy, layers, topo, cfg)
    runs.atomic_write_json(rd / runs.LOWER_REPORT, report)
    return report


def lower_stage(run_dir: str | Path, policy_spec: str | Policy, lower_cfg, progress: bool = True) -> dict:
    """The `hirelc lower` stage: :func:`lower_run` on the run directory's own data, recorded in provenance;
    ``policy_spec`` is a preset name, a policy file or a :class:`Policy` (e.g. :func:`pick_policy`'s)."""
    rd = runs.require_run_dir(run_dir, runs.BASELINE_META, runs.BASELINE_CKPT, runs.CONFIG)
    policy = policy_spec if isinstance(policy_spec, Policy) else get_policy(policy_spec)
    report = lower_run(rd, policy, run_bundle(rd), lower_cfg, progress=progress)
    for w in report.get("warnings", []):
        print(f"hirelc: warning: {w}", file=sys.stderr)
    opts = lower_options(policy, lower_cfg)
    runs.record(rd, runs.LOWERED_MODEL, (runs.BASELINE_CKPT,), opts)
    runs.record(rd, runs.LOWER_REPORT, (runs.LOWERED_MODEL, runs.BASELINE_CKPT), opts)
    return report


def lower_options(policy, lower_cfg) -> dict:
    return {"policy": policy.to_dict(), "lower": asdict(lower_cfg)}


def export_stage(run_dir: str | Path, fp32: bool = False, weight_only: bool = False, weight_format: str = "fold",
                 opset: int | None = None) -> dict:
    """Write model.onnx from the lowered model (or fp32.onnx from the baseline with ``fp32=True``).

    ``weight_format``: ``fold`` (integer kernels on ONNX Runtime at every bit width) or ``plain`` (INT4/UINT4 into
    DequantizeLinear); an option the installed onnxruntime cannot run is an error before anything is written.
    ``opset`` None: the one the search budgeted the file at (search.json), else :data:`DEFAULT_OPSET`.
    """
    rd = runs.require_run_dir(run_dir)
    if opset is None:
        opset = DEFAULT_OPSET if fp32 else searched_opset(rd)
    check_export_options(opset, weight_format)
    if fp32:
        model, mcfg, _ = load_baseline(rd)
        info = export_fp32(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size), rd / runs.FP32_ONNX,
                           opset=opset)
        runs.record(rd, runs.FP32_ONNX, (runs.BASELINE_CKPT,), {"opset": opset})
        return info
    blob = load_lowered(rd / runs.LOWERED_MODEL)
    mc = blob["model_config"]
    info = export_lowered(blob["model"], (1, mc["in_chans"], mc["img_size"], mc["img_size"]), rd / runs.HIRELC_ONNX,
                          weight_only=weight_only, weight_format=weight_format, opset=opset)
    runs.record(rd, runs.HIRELC_ONNX, (runs.LOWERED_MODEL,), export_options(weight_only, weight_format, opset))
    return info


def searched_opset(rd: Path) -> int:
    """The opset the run directory's search budgeted model.onnx at (search.json), else :data:`DEFAULT_OPSET`."""
    path = rd / "search.json"
    opset = runs.read_json_object(path, "search summary").get("opset", DEFAULT_OPSET)
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise HirelcError(f"{path} is corrupt (opset {opset!r} is not an integer)")
    return opset


def check_search_opset(opset: int) -> None:
    """An opset a searched policy can be exported at: one the installed onnx takes, and one with INT4 (the search
    offers 2-4-bit weights)."""
    check_export_options(opset, "fold")
    if opset < DEFAULT_OPSET:
        raise HirelcError(f"opset {opset}: the search offers 2-4-bit weights, which need opset {DEFAULT_OPSET} or later")


def export_options(weight_only: bool = False, weight_format: str = "fold", opset: int = DEFAULT_OPSET) -> dict:
    return {"weight_only": weight_only, "weight_format": weight_format, "opset": opset}


def ort_int8_stage(run_dir: str | Path, calib_samples: int = 256, act_int8: bool = False) -> dict:
    """ONNX Runtime's own static int8 quantization of fp32.onnx, calibrated on the same training data
    (``act_int8``: symmetric int8 activations, for TensorRT)."""
    if calib_samples < 1:
        raise HirelcError(f"--calib-samples must be >= 1, got {calib_samples}")
    rd = runs.require_run_dir(run_dir, runs.CONFIG)
    if runs.stale(rd, runs.FP32_ONNX, (runs.BASELINE_CKPT,), check_options=False):
        export_stage(rd, fp32=True)
    bundle = run_bundle(rd)
    calib = bundle.subset("train", min(calib_samples, len(bundle.train)), seed=0).x.numpy()
    info = ort_int8_baseline(rd / runs.FP32_ONNX, rd / runs.ORT_INT8_ONNX, calib, act_int8=act_int8)
    options = {"calib_samples": calib_samples, **({"act_int8": True} if act_int8 else {})}
    runs.record(rd, runs.ORT_INT8_ONNX, (runs.FP32_ONNX,), options)
    return info


# What verify measures and what each was built from, with the command that rebuilds it.
CHAIN = (
    (runs.LOWERED_MODEL, (runs.BASELINE_CKPT,), "hirelc lower"),
    (runs.LOWER_REPORT, (runs.LOWERED_MODEL,), "hirelc lower"),
    (runs.HIRELC_ONNX, (runs.LOWERED_MODEL,), "hirelc export"),
    (runs.FP32_ONNX, (runs.BASELINE_CKPT,), "hirelc export --fp32"),
    (runs.ORT_INT8_ONNX, (runs.FP32_ONNX,), "hirelc baseline ort-int8"),
)


def check_provenance(rd: Path) -> None:
    """Refuse a run directory whose artifacts were not built from each other as they are now: every present
    artifact of :data:`CHAIN` must match its provenance record, and so must the files it was built from."""
    for artifact, inputs, fix in CHAIN:
        if not (rd / artifact).is_file():
            continue
        reason = runs.stale(rd, artifact, inputs, check_options=False)
        if reason:
            raise HirelcError(f"{rd}: {reason}; run `{fix}` again (verify measures only artifacts built from "
                              f"the current files)")


def lowered_reference(rd: Path, eval_batch: int = 256):
    """The logits of the run directory's lowered.pt as a function of test inputs (what verify compares model.onnx
    with), or None when there is no lowered.pt. The file is loaded on the first call, so a run directory
    verified without a model.onnx never reads it."""
    if not (rd / runs.LOWERED_MODEL).is_file():
        return None
    model = functools.cache(lambda: load_lowered(rd / runs.LOWERED_MODEL)["model"])

    def logits(x: np.ndarray) -> np.ndarray:
        return predict_logits(model(), torch.from_numpy(x), eval_batch).numpy()

    return logits


def verify_stage(run_dir: str | Path, verify_cfg) -> dict:
    rd = runs.require_run_dir(run_dir)
    check_provenance(rd)
    report = verify_run(rd, run_bundle(rd), verify_cfg, reference=lowered_reference(rd, verify_cfg.eval_batch))
    runs.record(rd, runs.REPORT_JSON, verify_inputs(rd), asdict(verify_cfg))
    return report


def verify_inputs(rd: Path) -> tuple[str, ...]:
    names = (runs.HIRELC_ONNX, runs.FP32_ONNX, runs.ORT_INT8_ONNX, runs.LOWERED_MODEL, runs.LOWER_REPORT)
    return tuple(n for n in names if (rd / n).is_file())


STAGES = ("train", "policy", "lower", "export", "fp32", "ort-int8", "verify")




def _compress_parts(cfg: CompressConfig):
    return (TrainConfig(epochs=cfg.train_epochs, seed=cfg.seed), LowerConfig(epochs=cfg.qat_epochs, seed=cfg.seed,
                                                                           distill=cfg.distill),
            VerifyConfig(runs=cfg.verify_runs))


def _lower_policy(rd: Path, cfg: CompressConfig) -> Policy:
    """What compress lowers: the front entry ``--pick`` names, else policy.json (the search's winner or --policy)."""
    return pick_policy(rd, cfg.pick) if cfg.pick else get_policy(str(rd / runs.POLICY))


def compress_overrides(cfg: CompressConfig) -> dict | None:
    """The SearchConfig fields `hirelc compress` changes from the preset's (None: none; a default is left out, so
    a run directory searched before the option existed stays current)."""
    out = {"screening": cfg.screening} if cfg.screening != "surrogate" else {}
    if cfg.surrogate_prior != "none":
        out["surrogate_prior"] = cfg.surrogate_prior
    if cfg.warmup_pool is not None:
        out["warmup_pool"] = cfg.warmup_pool
    return out or None


def stage_stale(rd: Path, stage: str, cfg: CompressConfig) -> str | None:
    """Why ``stage`` of :func:`compress` must run (again), or None when its outputs are what it would build now:
    each output's provenance record must match its current input files and this call's options."""
    train_cfg, lower_cfg, verify_cfg = _compress_parts(cfg)
    if stage == "train":
        return runs.stale(rd, runs.BASELINE_CKPT, (), train_options(cfg.model, cfg.data, train_cfg))
    if stage == "policy":
        if cfg.policy:
            return runs.stale(rd, runs.POLICY, (), {"policy": get_policy(cfg.policy).to_dict()})
        why = runs.stale(rd, runs.POLICY, (runs.BASELINE_CKPT,), search_options(
            cfg.target_ratio, cfg.search_preset, cfg.max_size_mb, cfg.max_latency_ms, cfg.seed, compress_overrides(cfg),
            cfg.latency_budget, cfg.opset))
        if why is None and cfg.pick:  # --pick needs the search's front (a stopped search may not have written it)
            why = runs.stale(rd, runs.FRONT, FRONT_INPUTS, check_options=False)
        return why
    if stage == "lower":
        if not (rd / runs.POLICY).is_file():
            return f"{runs.POLICY} is missing"
        opts = lower_options(_lower_policy(rd, cfg), lower_cfg)
        return (runs.stale(rd, runs.LOWERED_MODEL, (runs.BASELINE_CKPT,), opts)
                or runs.stale(rd, runs.LOWER_REPORT, (runs.LOWERED_MODEL, runs.BASELINE_CKPT), opts))
    if stage == "export":
        return runs.stale(rd, runs.HIRELC_ONNX, (runs.LOWERED_MODEL,), export_options(opset=cfg.opset))
    if stage == "fp32":
        return runs.stale(rd, runs.FP32_ONNX, (runs.BASELINE_CKPT,), {"opset": 21})
    if stage == "ort-int8":
        return runs.stale(rd, runs.ORT_INT8_ONNX, (runs.FP32_ONNX,), {"calib_samples": 256})
    if stage == "verify":
        return runs.stale(rd, runs.REPORT_JSON, verify_inputs(rd), asdict(verify_cfg))
    raise ValueError(stage)


def compress(cfg: CompressConfig, progress: bool = True, echo=print) -> dict:
    """train -> policy (search or preset) -> lower + QAT -> export -> fp32 export -> ort-int8 -> verify.

    With ``resume`` a stage is skipped only when its outputs are what it would build now (same options, built
    from the current outputs of the stages before it, unchanged since); a stage that runs again makes every
    later stage whose inputs it changed run again. Without ``resume`` the run directory must be new or empty,
    so an earlier result is never overwritten.
    """
    rd = Path(cfg.run_dir)
    check_search_opset(cfg.opset)  # an opset the policy cannot be exported at: refused before anything is written
    if rd.exists() and not rd.is_dir():
        raise HirelcError(f"run directory {rd} is a file, not a directory")
    if rd.exists() and not runs.is_empty(rd) and not cfg.resume:
        raise HirelcError(f"{rd} is not empty: pass --resume to continue it, or choose a new --run-dir")
    with runs.locked(rd, "compress"):  # also clears what a killed earlier run left half-written
        return _compress(rd, cfg, progress, echo)


def _compress(rd: Path, cfg: CompressConfig, progress: bool, echo) -> dict:
    train_cfg, lower_cfg, verify_cfg = _compress_parts(cfg)
    if cfg.policy:
        get_policy(cfg.policy)  # a bad policy is an error before any training
    if cfg.pick and cfg.policy:
        raise HirelcError("--pick chooses among the search's front: give it without --policy")
    for i, stage in enumerate(STAGES, 1):
        why = stage_stale(rd, stage, cfg) if rd.is_dir() else "new run directory"
        if why is None:
            echo(f"[{i}/{len(STAGES)}] {stage}: done already, skipped")
            continue
        echo(f"[{i}/{len(STAGES)}] {stage}" + (f" (again: {why})" if cfg.resume and "missing" not in why
                                               and "new run" not in why else ""))
        if stage == "train":
            meta = train_stage(rd, cfg.model, cfg.data, train_cfg, progress=progress)
            echo(f"      data: {meta['data']['source']}; baseline test accuracy {meta['test_acc']:.2f} %")
        elif stage == "policy":
            if cfg.policy:
                get_policy(cfg.policy).save(rd / runs.POLICY)
                runs.record(rd, runs.POLICY, (), {"policy": get_policy(cfg.policy).to_dict()})
                echo(f"      policy: {cfg.policy}")
            else:
                # an interrupted search continues; one with other options starts afresh
                again = cfg.resume and "missing" in why
                res = search_stage(rd, target_ratio=cfg.target_ratio, preset=cfg.search_preset,
                                   max_size_mb=cfg.max_size_mb, max_latency_ms=cfg.max_latency_ms, seed=cfg.seed,
                                   resume=again, progress=progress, latency_budget=cfg.latency_budget,
                                   overrides=compress_overrides(cfg), echo=echo, workers=cfg.workers,
                                   ray_address=cfg.ray_address, opset=cfg.opset)
                echo(f"      search: {res['n_real_evals']} real evaluations, best val acc {res['best_acc']:.2f} %, "
                     f"effective ratio {res['effective_ratio']:.1f}x, {res['wall_s']:.0f} s")
        elif stage == "lower":
            policy = _lower_policy(rd, cfg)
            if cfg.pick:
                echo(f"      picked from the search's front ({cfg.pick}): {policy.name}")
            rep = lower_stage(rd, policy, lower_cfg, progress=progress)
            echo(f"      lowered: test accuracy {rep['accuracy']['lowered_test']:.2f} %, effective ratio "
                 f"{rep['effective_ratio']:.1f}x")
        elif stage == "export":
            export_stage(rd, opset=cfg.opset)
        elif stage == "fp32":
            export_stage(rd, fp32=True)
        elif stage == "ort-int8":
            ort_int8_stage(rd)
        elif stage == "verify":
            verify_stage(rd, verify_cfg)
    return runs.read_json(rd / runs.REPORT_JSON, "report")


FILE_BUDGET_MARGIN = 0.005  # size predictions (graph bytes measured) are within ~0.1 % of real files; keep room


LATENCY_REFERENCE = "latency_reference.json"


def ort_int8_reference(rd: Path, model, mcfg, bundle, runs_: int = 30) -> dict:
    """ONNX Runtime's own int8 of the baseline, timed at batch 1 and 8 here: the default latency budget.

    Saved in the run directory with the machine it was timed on, and measured again on another machine.
    """
    path = rd / LATENCY_REFERENCE
    if path.is_file():
        ref = runs.read_json(path, "latency reference")
        if ref.get("machine") == latency.machine_key() and isinstance(ref.get("b8_ms"), (int, float)):
            return ref
    shape = (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size)
    with tempfile.TemporaryDirectory(prefix="hirelc-ref-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "ort_int8.onnx"
        export_fp32(model, shape, fp32)
        calib = bundle.subset("train", min(256, len(bundle.train)), seed=0).x.numpy()
        ort_int8_baseline(fp32, int8, calib)
        t = benchmark_interleaved({"fp32": fp32, "ort-int8": int8}, shape, batch_sizes=(1, 8), runs=runs_)
    ref = {"source": "ort-int8", "b1_ms": t["ort-int8"][1]["median_ms"], "b8_ms": t["ort-int8"][8]["median_ms"],
           "fp32_b1_ms": t["fp32"][1]["median_ms"], "fp32_b8_ms": t["fp32"][8]["median_ms"], "runs": runs_,
           "machine": latency.machine_key()}
    runs.atomic_write_json(path, ref)
    return ref


def load_or_measure(run_dir: str | Path, model: nn.Module, topo: Topology, batch: int = 8,
                    progress: bool = True) -> dict:
    """The run directory's latency table, measured and saved on first use, or again when its format is older or
    it was measured on another machine (a run directory copied between hosts); batch 8 is the search's table,
    another batch has a file of its own (:func:`hirelc.latency.table_file`)."""
    path = Path(run_dir) / latency.table_file(batch)
    if path.exists():
        table = runs.read_json(path, "latency table")
        if latency.usable(table, topo, batch):
            return table
    table = latency.measure_latency_table(model, topo, batch=batch, progress=progress)
    runs.atomic_write_json(path, table)
    return table


def stored_prediction(run_dir: str | Path, topo: Topology, layers: dict[str, LayerPolicy]) -> dict | None:
    """``{"batch", "ms"}`` predicted from the run directory's latency table, None when it has no usable one."""
    path = Path(run_dir) / latency.LATENCY_TABLE
    if not path.is_file():
        return None
    table = runs.read_json(path, "latency table")
    if not latency.usable(table, topo):
        return None
    return {"batch": int(table["batch"]), "ms": latency.predict_latency(table, topo, layers)}


def fp32_file_bytes(run_dir, model: nn.Module, mcfg) -> int:
    """Bytes of the baseline's fp32.onnx, which a ratio budget promises the artifact is that many times smaller
    than: exported once to a scratch folder and kept in the run directory with the checkpoint's digest."""
    rd = Path(run_dir)
    path, digest = rd / runs.FP32_BYTES, runs.file_digest(rd / runs.BASELINE_CKPT)
    if path.is_file():
        d = runs.read_json(path, "fp32 file bytes")
        if d.get("baseline") == digest and isinstance(d.get("bytes"), int):
            return d["bytes"]
    with tempfile.TemporaryDirectory() as tmp:
        n = export_fp32(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size), Path(tmp) / runs.FP32_ONNX,
                        opset=DEFAULT_OPSET)["bytes"]
    runs.atomic_write_json(path, {"bytes": n, "baseline": digest})
    return n


def load_or_measure_graph_bytes(run_dir, model: nn.Module, topo: Topology) -> int:
    """The run directory's measured graph bytes (saved on first use, re-measured when the layers differ)."""
    path = Path(run_dir) / runs.GRAPH_BYTES
    if path.is_file():
        d = runs.read_json(path, "graph bytes")
        if d.get("layers") == list(topo.names) and isinstance(d.get("graph_bytes"), int):
            return d["graph_bytes"]
    n = measure_graph_bytes(model, topo)
    runs.atomic_write_json(path, {"graph_bytes": n, "layers": list(topo.names)})
    return n


def prepare_latency(rd: Path, model, mcfg, topo, reference: bool = True, progress: bool = True) -> None:
    """Measure the run directory's latency table (and ORT int8 reference) of its baseline ``model`` once, for
    studies that search in sub-directories: :func:`share_latency` then copies them into each, so every search
    predicts alike."""
    load_or_measure(rd, model, topo, batch=8, progress=progress)
    load_or_measure(rd, model, topo, batch=1, progress=progress)  # the front's batch-1 figures
    if reference:
        ort_int8_reference(rd, model, mcfg, run_bundle(rd))


def share_latency(rd: Path, sub: Path) -> None:
    """Copy the latency table and reference measured in ``rd`` into the study folder ``sub``."""
    for name in (latency.LATENCY_TABLE, latency.table_file(1), LATENCY_REFERENCE):
        if (rd / name).is_file() and not (sub / name).exists():
            runs.atomic_write_text(sub / name, (rd / name).read_text())


def check_sensitivity(sens, specs, path: Path) -> None:
    """A cached sensitivity.json must give a finite, non-negative score to every layer and block of the model."""
    def bad(why: str):
        raise HirelcError(f"{path} is corrupt ({why}); delete it and the search measures it again")

    if not isinstance(sens, dict) or not isinstance(sens.get("layer"), dict) or not isinstance(sens.get("block"), dict):
        bad('expected {"layer": {...}, "block": {...}}')
    for kind, names in (("layer", [s.name for s in specs]), ("block", sorted({s.block for s in specs}))):
        for n in names:
            v = sens[kind].get(n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{kind} {n!r} has no finite score")


FRONT_INPUTS = (runs.BASELINE_CKPT, runs.POLICY)  # the front belongs to the search that wrote this policy.json


def write_front(rd: Path, model, topo: Topology, history: list[dict], budget, fp32_bytes: float,
                progress: bool = True) -> dict:
    """front.json and front.png of a finished search (:mod:`hirelc.search.front`), batch-1 latencies predicted by
    the run directory's batch-1 table (measured on first use)."""
    table_b1 = load_or_measure(rd, model, topo, batch=1, progress=progress)
    front = front_report(history, dataclasses.asdict(budget), lambda lay: latency.predict_latency(table_b1, topo, lay),
                         fp32_bytes=fp32_bytes)
    runs.atomic_write_json(rd / runs.FRONT, front)
    runs.record(rd, runs.FRONT, FRONT_INPUTS)
    plot_front(history, front["entries"], rd / "front.png")
    return front


def load_front(run_dir: str | Path) -> list[dict]:
    """The checked entries of a run directory's front.json (written by `hirelc search`)."""
    path = Path(run_dir) / runs.FRONT
    if not path.is_file():
        raise HirelcError(f"{path} not found: run `hirelc search` (with --resume after a stopped one) first; "
                          "--pick chooses among its front")
    why = runs.stale(run_dir, runs.FRONT, FRONT_INPUTS, check_options=False)
    if why is not None:
        raise HirelcError(f"{path} is not the current search's front ({why}); run `hirelc search` again")
    return check_front(runs.read_json(path, "search front"), path)


def pick_policy(run_dir: str | Path, choice: str) -> Policy:
    """The policy ``--pick`` names on the run directory's front (:func:`hirelc.search.front.pick`)."""
    return picked_policy(pick(load_front(run_dir), choice))


def search_options(target_ratio, preset, max_size_mb, max_latency_ms, seed, overrides, latency_budget,
                   opset: int = DEFAULT_OPSET) -> dict:
    """What a searched policy.json depends on besides the baseline (its provenance record's options; the opset
    only when it is not the default, so a policy searched before the option existed stays current)."""
    opts = {"target_ratio": target_ratio, "preset": preset, "max_size_mb": max_size_mb,
            "max_latency_ms": max_latency_ms, "seed": seed, "overrides": overrides or {},
            "latency_budget": latency_budget}
    if opset != DEFAULT_OPSET:
        opts["opset"] = opset
    return opts


def search_stage(run_dir: str | Path, *, target_ratio: float | None = 8.0, preset: str = "quick",
                 max_size_mb: float | None = None, max_latency_ms: float | None = None, seed: int = 0,
                 resume: bool = False, progress: bool = True, fisher_samples: int = 50,
                 overrides: dict | None = None, latency_budget: bool = True, echo=None, workers: int = 1,
                 ray_address: str | None = None, opset: int = DEFAULT_OPSET, eval_cache: Path | None = None) -> dict:
    """The HiReLC search on a run directory's baseline -> policy.json, search.jsonl, plots, search.json.

    ``eval_cache``: a folder of real evaluations shared with other searches of the same baseline, data and seed
    (an ablation's variants share their warm-up); a policy evaluated there before is not evaluated again, and
    still counts the time it took (:class:`hirelc.evaluate.EvalCache`). Local evaluations only (not ``workers``).

    ``opset``: the one model.onnx will be exported at (``hirelc export`` takes it from search.json); from
    :data:`INT2_OPSET` 2-bit codes are stored four per byte, and the size budget counts them so.

    Latency-aware by default: without ``max_latency_ms`` the winner's predicted batch-8 latency must not exceed
    ONNX Runtime's own int8 of the same model, measured here (:func:`ort_int8_reference`);
    ``latency_budget=False`` drops that bound. The run directory's latency table also decides which weight
    formats the space offers (:func:`hirelc.latency.fast_formats`), unless ``overrides`` name ``formats``.
    ``workers`` > 1 runs each phase's real evaluations as tasks on a local Ray instance with that many CPUs,
    ``ray_address`` on that Ray cluster (:mod:`hirelc.parallel`); the policy is the same for any number.
    """
    needs_ray(workers, ray_address)  # a bad count or a missing Ray fails before anything is measured
    check_search_opset(opset)
    rd = runs.require_run_dir(run_dir, runs.BASELINE_META, runs.BASELINE_CKPT, runs.CONFIG)
    if preset not in PRESETS:
        raise HirelcError(f"unknown search preset {preset!r} (use {', '.join(PRESETS)})")
    if target_ratio is None and max_size_mb is None and max_latency_ms is None and not latency_budget:
        raise HirelcError("give a budget: --target-ratio, --max-size-mb or --max-latency-ms")
    set_threads()
    config = dataclasses.replace(PRESETS[preset], seed=seed, **(overrides or {}))
    # validated before anything is measured or written
    if max_size_mb is not None and not math.isfinite(max_size_mb):
        raise HirelcError(f"budget: max size must be a finite number, got {max_size_mb} MB")
    budget = Budget(target_ratio=target_ratio,
                    max_size_bytes=int(max_size_mb * 1e6) if max_size_mb is not None else None,
                    max_latency_ms=max_latency_ms, int2_storage=opset >= INT2_OPSET)
    model, mcfg, meta = load_baseline(rd)
    topo = build_topology(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    specs = list(topo.layers)
    # an impossible budget fails here, before any training; the graph's own bytes are measured once per run dir
    predictors = Predictors(model, topo, graph_bytes=load_or_measure_graph_bytes(rd, model, topo),
                            int2=budget.int2_storage)
    predictors.latency_table = load_or_measure(rd, model, topo, batch=8, progress=progress)
    if "formats" not in (overrides or {}):
        config = dataclasses.replace(config, formats=latency.fast_formats(predictors.latency_table))
    reference = None
    if max_latency_ms is None and latency_budget:
        reference = dict(ort_int8_reference(rd, model, mcfg, run_bundle(rd)))
        limit = reference["b8_ms"]
        # When no policy of the space is predicted that fast, the bound becomes the fastest one predicted, so the
        # search still runs; the report says so, and verify measures the artifact against ORT int8 either way.
        fastest = min(predictors.predict_latency_ms(p) for p in uniform_grid(specs, config))
        reference["relaxed_to_ms"] = None
        if fastest > limit:
            limit = fastest * (1 + 1e-6)
            reference["relaxed_to_ms"] = limit
        budget = dataclasses.replace(budget, max_latency_ms=limit)
        if echo is not None:
            echo(f"      latency budget: ONNX Runtime's int8 of this model, {reference['b8_ms']:.2f} ms at batch 8 "
                 f"({reference['b1_ms']:.2f} ms at batch 1), measured here; --no-latency-budget drops it")
            if reference["relaxed_to_ms"] is not None:
                echo(f"      no policy of the space is predicted that fast: the budget is the fastest predicted, "
                     f"{limit:.2f} ms")
    if echo is not None:
        echo(f"      weight formats offered (no slower than int8 here): {', '.join(config.formats or ('all',))}")
    # the predicted fp32 graph keeps BatchNorm apart; fp32.onnx has it folded, so the real file can be smaller
    fp32_bytes = min(predictors.predict_bytes(get_policy("fp32").resolve(specs)), fp32_file_bytes(rd, model, mcfg))
    if target_ratio is not None:
        # The ratio is also a promise about the artifact: the exported file must be that many times smaller than
        # fp32.onnx in real bytes (biases, scales and untouched tensors included), not only in weight bits.
        file_cap = int(fp32_bytes / target_ratio * (1 - FILE_BUDGET_MARGIN))
        cap = file_cap if budget.max_size_bytes is None else min(budget.max_size_bytes, file_cap)
        budget = dataclasses.replace(budget, max_size_bytes=cap)
    check_budget_feasible(specs, config, budget, predictors.predict_bytes, predictors.predict_latency_ms)

    bundle = run_bundle(rd)
    evaluator = RealEvaluator(model, topo, bundle, predictors, seed=seed)
    if eval_cache is not None:
        evaluator.use_cache(eval_cache, {"baseline": runs.file_digest(rd / runs.BASELINE_CKPT),
                                         "run": runs.read_json(rd / runs.CONFIG, "run config")})
    sens_path = rd / runs.SENSITIVITY
    if sens_path.exists():
        sens = runs.read_json(sens_path, "sensitivity")
        check_sensitivity(sens, specs, sens_path)
    else:
        torch.manual_seed(seed)
        loader = bundle.loader("train", 16, shuffle=True, seed=seed)
        sens = fisher_sensitivity(model, loader, topo.names, {s.name: s.block for s in specs}, n_samples=fisher_samples)
        runs.atomic_write_json(sens_path, sens)
    with distributed(evaluator, workers, ray_address) as scorer:
        result = run_search(specs, sens, scorer, config, budget, run_dir=rd, resume=resume, progress=progress)
    eval_seconds = scorer.eval_seconds
    policy = result.policy()
    policy.save(rd / runs.POLICY)
    runs.record(rd, runs.POLICY, (runs.BASELINE_CKPT,), search_options(
        target_ratio, preset, max_size_mb, max_latency_ms, seed, overrides, latency_budget, opset))
    plot_policy_heatmap(specs, result.layers, rd / "policy_heatmap.png")
    plot_progress(result.history, rd / "search_progress.png")
    plot_pareto(result.history, rd / "search_pareto.png")
    front = write_front(rd, model, topo, result.history, budget, fp32_bytes, progress=progress)
    pairs = [(surrogate_prediction(h), h["real_acc"]) for h in result.history if surrogate_prediction(h) is not None]
    if len(pairs) >= 2:
        plot_surrogate([p for p, _ in pairs], [r for _, r in pairs], rd / "surrogate.png")
    winner_bytes = evaluator.predict_bytes(result.layers)
    summary = {
        "preset": preset,
        "opset": opset,
        "config": dataclasses.asdict(config),
        "budget": dataclasses.asdict(budget),
        "baseline_val_subset_acc": evaluator.baseline_accuracy,
        "best_acc": result.accuracy,
        "effective_ratio": result.effective_ratio,
        "predicted_bytes": winner_bytes,
        "predicted_fp32_bytes": fp32_bytes,
        "predicted_file_ratio": fp32_bytes / winner_bytes,
        "predicted_latency_ms_b8": evaluator.predict_latency_ms(result.layers),
        "latency_budget_source": (reference["source"] if reference else
                                  ("user" if max_latency_ms is not None else None)),
        "latency_reference": reference,
        "formats": list(config.formats) if config.formats else None,
        "n_real_evals": result.n_real_evals,
        "n_final_fidelity_evals": len(competing(result.history)),  # without warm-ups superseded by a longer fine-tune
        "wall_s": result.wall_s,
        "mean_eval_s": (sum(eval_seconds) / len(eval_seconds)) if eval_seconds else None,
        # real evaluations taken from eval_cache, and the seconds they took when they ran (counted in wall_s)
        "cached_real_evals": evaluator.cache_hits, "cached_eval_s": evaluator.saved_seconds,
        "workers": workers,
        "surrogate_spearman": result.surrogate_spearman,
        "allocation": result.allocation,
        "cycles": result.cycles,
        "front": [e["eval"] for e in front["entries"]],
    }
    runs.atomic_write_json(rd / "search.json", summary)
    if echo is not None:
        for c in result.cycles:
            echo("      " + format_cycle(c))
    return summary


def format_cycle(c: dict) -> str:
    """One line of a search cycle's screening figures (``search.json``'s ``cycles``)."""
    if c["cycle"] == 0:
        line = f"warm-up: {c['real_evals']} real evaluations, {c['feasible']} within the budget"
        for why in c.get("fidelity_doubled_because") or ():
            line += f"; fine-tune doubled ({why})"
        if c.get("separated") is False:
            line += "; still not separated at the longest fine-tune"
        if c.get("proxy_drop"):
            lo, hi = c["proxy_drop"]
            line += (f"; the random ones are the proxy's best of {c['candidates'] - 1} (drop {lo:.1f}-{hi:.1f} points"
                     + (", saturated: ranked by mildness)" if c.get("proxy_saturated") else ")"))
        return line
    line = (f"cycle {c['cycle']}: {c['candidates']} candidates put together, {c['feasible']} distinct new within the "
            f"budget, screened by {c['screened_by']}, {c['real_evals']} really evaluated")
    if c.get("proxy_drop"):
        lo, hi = c["proxy_drop"]
        line += f"; proxy drop {lo:.1f}-{hi:.1f} points" + (" (saturated: it cannot rank them)"
                                                              if c.get("proxy_saturated") else "")
    if c.get("predicted_acc"):
        lo, hi = c["predicted_acc"]
        by = "calibrated proxy" if str(c.get("screened_by", "")).startswith("proxy calibrated") else "surrogate"
        line += f"; {by} {lo:.1f}-{hi:.1f} %"
    return line
