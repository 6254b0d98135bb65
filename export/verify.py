"""Verify a run directory's ONNX artifacts on ONNX Runtime and write ``report.json`` / ``report.md``.

Artifacts looked for (any subset, at least one): ``fp32.onnx`` (the float baseline), ``ort_int8.onnx``
(ONNX Runtime's own static int8 quantization: what a user would pick instead) and ``model.onnx`` (hirelc).

Keys of ``report.json`` (stable; sizes in bytes, accuracies in percent, times in milliseconds; batch sizes
appear as string keys, e.g. ``"1"``; a value that could not be measured is ``null``):

=============================  ===============================================================================
key                            meaning
=============================  ===============================================================================
``version``                    report format version (1)
``created``                    ISO-8601 time the report was made (UTC)
``run_dir``                    the run directory verified
``data``                       dataset ``name``, ``fingerprint``, ``test_samples`` used for accuracy
``machine``                    ``platform``, ``processor``, ``cpu`` (model name), ``isa`` (the int8-relevant
                               instruction sets it has: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8),
                               ``cpu_count``, ``cores``, ``system``, ``python``, ``onnxruntime``, ``torch``,
                               ``threads``,
                               ``intra_op_spinning`` (false: idle ORT threads do not busy-wait)
``providers``                  ONNX Runtime provider -> ``"used"`` (by a target measured), ``"available, not
                               used"`` or ``"unavailable"`` in this onnxruntime build
``gate_target``                the target (``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``, ``openvino``) whose
                               figures fill ``artifacts.*.top1`` / ``latency``, ``parity``, ``accuracy_drop``
                               and ``speedup``, and which the gate checks
``targets.<target>``           for each target measured: ``runtime`` (name, version, provider or device),
                               ``artifacts.<name>``: ``top1``, ``latency`` (as below, interleaved within the
                               target), ``what_ran`` (ONNX Runtime: ``provider``, ``kernels``, ``on_provider``,
                               ``share``, ``by_provider``, ``off_provider_ops`` from a profiled run, and for
                               TensorRT ``tensorrt_check``, ``int8_engine``, ``cached_engines``; OpenVINO:
                               ``layers`` with each compute layer's runtime ``precision``, ``activations``
                               type and ``integer`` (an integer kernel on integer activations), ``by_type``,
                               ``compute_layers``, ``integer_layers``, ``integer_share``); ``parity``,
                               ``accuracy_drop``, ``speedup`` on that target
``artifacts.<name>``           for each of ``fp32``, ``ort_int8``, ``hirelc`` present: ``file``, ``bytes``,
                               ``size_ratio`` (fp32 bytes / these bytes), ``top1`` (gate target, whole test split),
                               ``fused_ops`` (op counts after ORT optimisation, see
                               :func:`~hirelc.export.runtime.fused_op_counts`), ``latency`` (batch ->
                               ``median_ms``, ``p90_ms``, ``mean_ms``, ``runs``; interleaved), ``memory``
                               (null, or ``growth_mb``: resident-set growth in MiB of a fresh process after
                               creating the session and after running each batch size, ``peak_mb``, ``base_mb``)
``parity``                     hirelc ONNX vs the PyTorch lowered model: ``status`` (``"ok"`` or ``"skipped"``),
                               ``note``, ``samples``, ``top1_agreement`` (%), ``max_abs_diff``,
                               ``mean_abs_diff``, ``logit_scale`` (max |PyTorch logit|), ``pytorch_top1`` and
                               ``onnx_top1`` (% on the same samples)
``accuracy_drop``              fp32 ``top1`` - hirelc ``top1`` (points; ORT both)
``size_ratio``                 fp32 bytes / hirelc bytes
``effective_storage_ratio``    from ``lower_report.json`` (bits actually needed, e.g. 3-bit codes count 3)
``effective_bits_per_param``   from ``lower_report.json``
``speedup``                    ``fp32_over_hirelc`` / ``ort_int8_over_hirelc``: batch -> median latency ratio
``latency_prediction``         null, or when lowering had a latency table (``hirelc search --max-latency-ms``):
                               ``batch``, ``predicted_ms`` (per-layer table), ``measured_ms`` (hirelc median
                               here), ``measured_over_predicted``
``verify_config``              the :class:`VerifyConfig` used (batch sizes, runs, warm-up, threads, bounds)
``against``                    null, or (``--against``) ``report`` (the earlier release's report.json),
                               ``created``, ``rows``: per ``check`` (top-1, bytes, latency bN) ``old``, ``new``,
                               ``change``, ``unit``, ``bound``, ``verdict`` (ok / regressed / not compared /
                               -), ``note`` (why a latency was not compared: another machine or target)
``gate``                       ``passed`` (bool), ``failures`` (one line each), ``bounds`` (the limits checked)
=============================  ===============================================================================
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.export.runtime import (
    PROVIDERS,
    available_providers,
    fused_op_counts,
    make_session,
    session_memory,
)
from hirelc.export.targets import (
    ORT_TARGETS,
    TRT_CACHE,
    TargetSession,
    check_target,
    measure_artifacts,
    runtime_version,
)
from hirelc.machine import record
from hirelc.options import DEFAULT_MIN_PARITY, VerifyConfig  # noqa: F401 (VerifyConfig: part of this API)
from hirelc.report import fmt, md_table, utc_now

REPORT_VERSION = 1
ARTIFACTS = {"fp32": runs.FP32_ONNX, "ort_int8": runs.ORT_INT8_ONNX, "hirelc": runs.HIRELC_ONNX}
LABELS = {"fp32": "fp32", "ort_int8": "ort-int8", "hirelc": "hirelc"}






def _providers(targets: tuple[str, ...]) -> dict[str, str]:
    used = {PROVIDERS[ORT_TARGETS[t]] for t in targets if t in ORT_TARGETS}
    out = {}
    for name, have in available_providers().items():
        out[name] = "used" if name in used else ("available, not used" if have else "unavailable")
    return out


def _check_input(sess, path: Path, shape: tuple[int, ...]) -> None:
    """The model's (C, H, W) must match the data's; a symbolic dim matches anything."""
    want = sess.get_inputs()[0].shape[1:]
    if len(want) != len(shape) or any(isinstance(w, int) and w != s for w, s in zip(want, shape, strict=True)):
        raise HirelcError(f"{path} expects inputs of shape {tuple(want)}, the data gives {shape}")


Reference = Callable[[np.ndarray], np.ndarray]  # inputs -> the lowered PyTorch model's logits


def _parity(ref: np.ndarray | None, sess: TargetSession, x: np.ndarray, y: np.ndarray, eval_batch: int) -> dict:
    """hirelc ONNX on one target vs the lowered PyTorch model's logits ``ref`` on the same samples."""
    if ref is None:
        return {"status": "skipped", "note": f"no PyTorch reference ({runs.LOWERED_MODEL} missing, or none given)", "samples": 0,
                "top1_agreement": None, "max_abs_diff": None, "mean_abs_diff": None, "logit_scale": None,
                "pytorch_top1": None, "onnx_top1": None}
    got = sess.predict(x, eval_batch)
    if ref.shape != got.shape:
        raise HirelcError(f"{runs.HIRELC_ONNX} gives logits of shape {got.shape}, {runs.LOWERED_MODEL} "
                          f"{ref.shape}: they are not the same model")
    diff = np.abs(got - ref)
    return {"status": "ok", "note": "", "samples": int(len(x)),
            "top1_agreement": float(100.0 * (got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(ref).max()),
            "pytorch_top1": float(100.0 * (ref.argmax(1) == y).mean()),
            "onnx_top1": float(100.0 * (got.argmax(1) == y).mean())}


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b else None


def _measure_target(target: str, present: dict[str, Path], rd: Path, cfg: VerifyConfig, x, y, parity_set,
                    shape) -> dict:
    """Top-1, parity, interleaved latency and what really ran of every artifact on one target."""
    px, py, ref = parity_set

    def parity_of(sessions: dict) -> dict | None:
        return _parity(ref, sessions["hirelc"], px, py, cfg.eval_batch) if "hirelc" in sessions else None

    arts, parity = measure_artifacts(target, present, x, y, shape, cfg.batch_sizes, cfg.runs, cfg.warmup,
                                     cfg.threads, rd / TRT_CACHE, cfg.eval_batch, with_sessions=parity_of)
    for a in arts.values():
        a["latency"] = {str(b): v for b, v in a["latency"].items()}

    def median(k: str, b: int) -> float | None:
        return arts[k]["latency"][str(b)]["median_ms"] if k in arts and str(b) in arts[k]["latency"] else None

    h = arts.get("hirelc")
    return {
        "runtime": runtime_version(target),
        "artifacts": arts,
        "parity": parity,
        "accuracy_drop": arts["fp32"]["top1"] - h["top1"] if h and "fp32" in arts else None,
        "speedup": {
            "fp32_over_hirelc": {str(b): _ratio(median("fp32", b), median("hirelc", b)) for b in cfg.batch_sizes},
            "ort_int8_over_hirelc": {str(b): _ratio(median("ort_int8", b), median("hirelc", b))
                                     for b in cfg.batch_sizes},
        },
        "_median": median,
    }


def verify_run(run_dir: str | Path, bundle, cfg: VerifyConfig | None = None,
               reference: Reference | None = None) -> dict:
    """Measure every ONNX artifact of ``run_dir`` on each target of ``cfg``; write report.json + report.md.

    ``reference`` computes the lowered PyTorch model's logits for a batch of test inputs (the parity check of
    model.onnx against it); without one parity is reported as skipped and the parity bound fails. The report's
    top-level ``artifacts`` / ``parity`` / ``speedup`` figures are those of the gate's target; ``targets`` holds
    every target's.
    """
    cfg = cfg or VerifyConfig()
    rd = runs.require_run_dir(run_dir)
    for t in cfg.targets:  # a target this machine cannot run: exit 2 before anything is measured
        check_target(t)
    old = load_previous(cfg.against, bundle) if cfg.against else None  # unreadable or incompatible: exit 2 now
    present = {k: rd / f for k, f in ARTIFACTS.items() if (rd / f).is_file()}
    if not present:
        raise HirelcError(f"no ONNX artifacts in {rd}: expected one of {', '.join(ARTIFACTS.values())} "
                          f"(run `hirelc export` first)")
    shape = (bundle.in_chans, bundle.img_size, bundle.img_size)
    x, y = bundle.test.x.numpy(), bundle.test.y.numpy()
    for p in present.values():  # a corrupt file or one for other data: an error before anything is timed
        _check_input(make_session(p, threads=1), p, shape)
    fp32_bytes = present["fp32"].stat().st_size if "fp32" in present else None
    artifacts = {}
    for k, p in present.items():
        size = p.stat().st_size
        artifacts[k] = {"file": p.name, "bytes": size, "size_ratio": _ratio(fp32_bytes, size),
                        "fused_ops": fused_op_counts(p)}
    sub = None if cfg.parity_samples is None else bundle.subset("test", cfg.parity_samples)
    px, py = (x, y) if sub is None else (sub.x.numpy(), sub.y.numpy())
    ref = np.asarray(reference(px)) if reference is not None and "hirelc" in present else None
    targets = {t: _measure_target(t, present, rd, cfg, x, y, (px, py, ref), shape) for t in cfg.targets}
    for k in present:
        artifacts[k]["memory"] = (session_memory(present[k], shape, cfg.batch_sizes, cfg.threads)
                                  if cfg.memory else None)
    lower = runs.read_json(rd / runs.LOWER_REPORT, "lower report") if (rd / runs.LOWER_REPORT).is_file() else {}
    gate = targets[cfg.gated_target]
    for k, a in artifacts.items():
        a["top1"] = gate["artifacts"][k]["top1"]
        a["latency"] = gate["artifacts"][k]["latency"]
    median = gate["_median"]
    for t in targets.values():
        del t["_median"]

    h = artifacts.get("hirelc")
    report = {
        "version": REPORT_VERSION,
        "created": utc_now(),
        "run_dir": str(rd),
        "data": {"name": bundle.name, "fingerprint": bundle.fingerprint, "test_samples": int(len(y))},
        "machine": record(cfg.threads),
        "providers": _providers(cfg.targets),
        "gate_target": cfg.gated_target,
        "artifacts": artifacts,
        "targets": targets,
        "parity": gate["parity"],
        "accuracy_drop": gate["accuracy_drop"],
        "size_ratio": h["size_ratio"] if h else None,
        "effective_storage_ratio": lower.get("effective_ratio"),
        "effective_bits_per_param": lower.get("effective_bits_per_param"),
        "speedup": gate["speedup"],
        "latency_prediction": _latency_prediction(lower, median) if cfg.gated_target == "ort-cpu" else None,
        "verify_config": asdict(cfg),
        "against": None,
    }
    if old is not None:
        report["against"] = compare_with(old, report, cfg)
    failures = check_gate(report, cfg)
    report["gate"] = {"passed": not failures, "failures": failures, "bounds": cfg.bounds()}
    runs.atomic_write_json(rd / runs.REPORT_JSON, report)
    runs.atomic_write_text(rd / runs.REPORT_MD, format_markdown(report))
    return report


def load_previous(path: str | Path, bundle) -> dict:
    """The report.json of an earlier release, checked to be comparable with this run: a readable report of
    this format version, on the same data (fingerprint), with a hirelc artifact. Anything else is an error."""
    p = Path(path)
    if p.is_dir():
        p = p / runs.REPORT_JSON
    old = runs.read_json(p, "previous report")
    if not isinstance(old, dict) or "artifacts" not in old or not isinstance(old.get("artifacts"), dict):
        raise HirelcError(f"{p} is not a hirelc report.json")
    if old.get("version") != REPORT_VERSION:
        raise HirelcError(f"{p} has report version {old.get('version')!r}, this hirelc writes {REPORT_VERSION}: "
                          f"not comparable")
    fp = (old.get("data") or {}).get("fingerprint")
    if fp != bundle.fingerprint:
        raise HirelcError(f"{p} was measured on other data (fingerprint {fp}, this run {bundle.fingerprint}): "
                          f"not comparable")
    h = old["artifacts"].get("hirelc")
    if not isinstance(h, dict) or not isinstance(h.get("top1"), (int, float)) or not isinstance(h.get("bytes"), int):
        raise HirelcError(f"{p} holds no measured hirelc artifact to compare with")
    old["_path"] = str(p)
    return old


def _same_machine(a: dict, b: dict) -> str | None:
    """Why latencies measured on machine records ``a`` and ``b`` are not comparable, or None."""
    for key in ("cpu", "isa", "cpu_count", "threads", "onnxruntime"):
        if a.get(key) != b.get(key):
            return f"{key} differs ({a.get(key)} then, {b.get(key)} now)"
    return None


def compare_with(old: dict, report: dict, cfg: VerifyConfig) -> dict:
    """The new hirelc artifact beside the old release's: one row per compared quantity, with a verdict
    (``ok``, ``regressed``, ``not compared`` with the reason, or ``-`` when no bound was set)."""
    o, n = old["artifacts"]["hirelc"], report["artifacts"].get("hirelc")
    rows = []

    def row(check: str, old_v, new_v, change, unit: str, bound, note: str = "", why_not: str | None = None):
        if why_not:
            verdict = "not compared"
        elif bound is None:
            verdict = "-"
        else:
            verdict = "regressed" if change > bound else "ok"
        text = why_not or note or (f"{change:+.2f}{unit} (allowed {bound:+g}{unit})" if bound is not None
                                   else f"{change:+.2f}{unit}")
        rows.append({"check": check, "old": old_v, "new": new_v, "change": change, "unit": unit, "bound": bound,
                     "verdict": verdict, "note": text})

    if n is None:
        return {"report": old["_path"], "created": old.get("created"), "rows": [], "note": "no hirelc artifact now"}
    row("top-1", o["top1"], n["top1"], o["top1"] - n["top1"], " points lost", cfg.max_top1_regression)
    row("bytes", o["bytes"], n["bytes"], 100.0 * (n["bytes"] / o["bytes"] - 1), " %", cfg.max_size_regression)
    why = _same_machine(old.get("machine") or {}, report["machine"])
    why = f"measured on another machine: {why}" if why else None
    then, now = old.get("gate_target", "ort-cpu"), report.get("gate_target", "ort-cpu")
    if why is None and then != now:
        why = f"measured on another target ({then} then, {now} now)"
    for b in cfg.batch_sizes:
        ol = ((o.get("latency") or {}).get(str(b)) or {}).get("median_ms")
        nl = ((n.get("latency") or {}).get(str(b)) or {}).get("median_ms")
        missing = None if ol and nl else f"batch {b} not measured in both reports"
        change = 100.0 * (nl / ol - 1) if not (why or missing) else None
        row(f"latency b{b}", ol, nl, change, " %", cfg.max_latency_regression,
            why_not=why or missing)
    return {"report": old["_path"], "created": old.get("created"), "rows": rows}


def _latency_prediction(lower: dict, median) -> dict | None:
    """The lowering report's predicted latency beside this run's measured median at the same batch."""
    pred = lower.get("predicted_latency")
    if not pred:
        return None
    measured = median("hirelc", pred["batch"])
    return {"batch": pred["batch"], "predicted_ms": pred["ms"], "measured_ms": measured,
            "measured_over_predicted": _ratio(measured, pred["ms"])}


def check_gate(report: dict, cfg: VerifyConfig) -> list[str]:
    """One line per release-gate bound the report violates (empty list: the gate passes)."""
    out: list[str] = []
    h = report["artifacts"].get("hirelc")
    wanted = cfg.max_drop is not None or cfg.min_size_ratio is not None or cfg.max_latency_ms is not None
    if wanted and h is None:
        return [f"gate: {runs.HIRELC_ONNX} is missing, nothing to check"]
    if cfg.max_drop is not None:
        drop = report.get("accuracy_drop")
        if drop is None:
            out.append(f"gate: accuracy drop unknown ({runs.FP32_ONNX} missing)")
        elif drop > cfg.max_drop:
            out.append(f"gate: top-1 drop {drop:.2f} points > allowed {cfg.max_drop:g} "
                       f"(fp32 {report['artifacts']['fp32']['top1']:.2f}%, hirelc {h['top1']:.2f}%)")
    if cfg.min_size_ratio is not None:
        ratio = report.get("size_ratio")
        if ratio is None:
            out.append(f"gate: size ratio unknown ({runs.FP32_ONNX} missing)")
        elif ratio < cfg.min_size_ratio:
            out.append(f"gate: size ratio {ratio:.2f}x < required {cfg.min_size_ratio:g}x "
                       f"({h['bytes']} bytes vs fp32 {report['artifacts']['fp32']['bytes']})")
    if cfg.min_parity is not None and h is not None:
        p = report.get("parity") or {}
        agree = p.get("top1_agreement")
        if agree is None:
            out.append(f"gate: parity of {runs.HIRELC_ONNX} with {runs.LOWERED_MODEL} unknown "
                       f"({p.get('note') or 'not measured'}; --min-parity 0 skips this check)")
        elif agree < cfg.min_parity:
            out.append(f"gate: {runs.HIRELC_ONNX} agrees with {runs.LOWERED_MODEL} on {agree:.2f}% of top-1 "
                       f"predictions < required {cfg.min_parity:g}% (not the same model?)")
    if cfg.max_memory_mb is not None and h is not None:
        mem = (h.get("memory") or {}).get("peak_mb")
        if mem is None:
            out.append("gate: session memory was not measured")
        elif mem > cfg.max_memory_mb:
            out.append(f"gate: {runs.HIRELC_ONNX} session memory {mem:.1f} MiB > allowed {cfg.max_memory_mb:g} MiB")
    for row in (report.get("against") or {}).get("rows", []):
        if row["verdict"] == "regressed":
            out.append(f"gate: {row['check']} regressed vs {report['against']['report']}: {row['note']}")
    if cfg.max_latency_ms is not None:
        lat = h["latency"].get(str(cfg.latency_batch))
        if lat is None:
            out.append(f"gate: latency at batch {cfg.latency_batch} was not measured")
        elif lat["median_ms"] > cfg.max_latency_ms:
            out.append(f"gate: batch-{cfg.latency_batch} median latency {lat['median_ms']:.3f} ms on "
                       f"{report.get('gate_target', 'ort-cpu')} > allowed {cfg.max_latency_ms:g} ms")
    return out


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    batches = list(report["verify_config"]["batch_sizes"])
    head = ["artifact", "top-1 %", "bytes", "fp32/size", "mem MiB"]
    head += [f"b{b} ms" for b in batches] + [f"b{b}/hirelc" for b in batches]
    hl = report["artifacts"].get("hirelc", {}).get("latency", {})
    rows = []
    for k, a in report["artifacts"].items():
        row = [LABELS[k], fmt(a["top1"], ".2f"), f"{a['bytes']:,}", fmt(a["size_ratio"], ".2f", "x"),
               fmt((a.get("memory") or {}).get("peak_mb"), ".1f")]
        row += [fmt(a["latency"].get(str(b), {}).get("median_ms"), ".3f") for b in batches]
        # this artifact's median latency / hirelc's: > 1 means hirelc is that many times faster
        row += [fmt(_ratio(a["latency"].get(str(b), {}).get("median_ms"), hl.get(str(b), {}).get("median_ms")),
                     ".2f", "x") for b in batches]
        rows.append(row)
    return head, rows


def what_ran_summary(what: dict | None) -> str:
    """One phrase for a target's ``what_ran``: the share of kernels on the provider, or of integer layers."""
    if not what:
        return "-"
    if "integer_layers" in what:  # OpenVINO
        def kind(layer: dict) -> str:  # "u8", "f32", or "i8 weights on f32" (a weight-compressed float layer)
            act, prec = layer.get("activations", layer["precision"]), layer["precision"]
            return prec if layer.get("integer") or prec == act else f"{prec} weights on {act}"

        kinds = Counter(kind(layer) for layer in what["layers"])
        return (f"{what['integer_layers']}/{what['compute_layers']} conv/matmul integer ("
                + ", ".join(f"{p} {n}" for p, n in kinds.most_common()) + ")")
    share = what.get("share")
    text = f"{share:.0%} of {what['kernels']} kernels on {what['provider']}" if share is not None else "no kernels"
    if "int8_engine" in what:
        text += ", int8 engine" if what["int8_engine"] else ", not an int8 engine"
        if not what["tensorrt_check"]["ok"]:
            text += f" ({what['tensorrt_check']['problems'][0]})"
    return text


def _target_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    batches = list(report["verify_config"]["batch_sizes"])
    head = ["target", "artifact", "top-1 %"] + [f"b{b} ms" for b in batches] + [f"b{b}/hirelc" for b in batches]
    head += ["what ran"]
    rows = []
    for t, m in report.get("targets", {}).items():
        hl = m["artifacts"].get("hirelc", {}).get("latency", {})
        for k, a in m["artifacts"].items():
            med = [a["latency"].get(str(b), {}).get("median_ms") for b in batches]
            row = [t, LABELS[k], fmt(a["top1"], ".2f")] + [fmt(v, ".3f") for v in med]
            row += [fmt(_ratio(v, hl.get(str(b), {}).get("median_ms")), ".2f", "x") for v, b in zip(med, batches, strict=True)]
            rows.append(row + [what_ran_summary(a.get("what_ran"))])
    return head, rows


def _plain_table(head: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Aligned terminal lines: the columns in ``left`` (names) left-aligned, the others (figures) right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = tuple(i % len(head) for i in left)

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    return [line(head), line(["-" * w for w in widths]), *map(line, rows)]


def _several_targets(report: dict) -> bool:
    return list(report.get("targets", {})) not in ([], ["ort-cpu"])


def format_table(report: dict) -> str:
    """A one-screen terminal table of the report (``bN/hirelc``: that row's latency / hirelc's)."""
    out = _plain_table(*_rows(report))
    if _several_targets(report):
        out += ["", f"per target (the gate reads {report['gate_target']}):",
                *_plain_table(*_target_rows(report), left=(0, 1, -1))]
    p = report.get("parity")
    if p and p["status"] == "ok":
        out.append(f"parity ONNX vs PyTorch: top-1 agreement {p['top1_agreement']:.2f}% on {p['samples']} samples, "
                   f"max |logit diff| {p['max_abs_diff']:.2e} (logit scale {p['logit_scale']:.2f})")
    elif p:
        out.append(f"parity: skipped ({p['note']})")
    if report.get("effective_storage_ratio"):
        out.append(f"effective storage ratio {report['effective_storage_ratio']:.2f}x "
                   f"({report['effective_bits_per_param']:.2f} bits/param)")
    ag = report.get("against")
    if ag:
        out.append(f"against {ag['report']}: " + "; ".join(f"{r['check']} {r['verdict']} ({r['note']})"
                                                         for r in ag["rows"]))
    gate = report.get("gate", {})
    if gate.get("failures"):
        out += gate["failures"]
    return "\n".join(out)


def summary_line(report: dict) -> dict:
    """The few figures a CI log wants, as one JSON-able dict (``hirelc verify --json``)."""
    h = report["artifacts"].get("hirelc") or {}
    g = report.get("gate", {})
    return {"passed": g.get("passed"), "failures": g.get("failures", []), "top1": h.get("top1"),
            "accuracy_drop": report.get("accuracy_drop"), "bytes": h.get("bytes"), "size_ratio": report.get("size_ratio"),
            "latency_ms": {b: v.get("median_ms") for b, v in (h.get("latency") or {}).items()},
            "memory_mb": (h.get("memory") or {}).get("peak_mb"),
            "parity": (report.get("parity") or {}).get("top1_agreement"),
            "against": [{"check": r["check"], "verdict": r["verdict"]} for r in (report.get("against") or {}).get("rows", [])],
            "cpu": report["machine"].get("cpu"), "target": report.get("gate_target", "ort-cpu"),
            "report": str(Path(report["run_dir"]) / runs.REPORT_JSON)}


def format_markdown(report: dict) -> str:
    """report.md: the comparison table, parity, fused ops, providers, machine and gate."""
    head, rows = _rows(report)
    md = [f"# hirelc verification report\n\n{report['created']} - `{report['run_dir']}` - data "
          f"{report['data']['name']} ({report['data']['test_samples']} test samples)\n",
          *md_table(head, rows),
          f"\nLatency: {report.get('gate_target', 'ort-cpu')}, medians of interleaved runs; `bN/hirelc` = that row's "
          "latency / hirelc's (> 1: hirelc is faster).\n"]
    if _several_targets(report):
        md.append(f"## Targets\n\nThe table above and the gate use {report['gate_target']}. Each target's "
                  "latencies are interleaved medians within that target.\n")
        md += md_table(*_target_rows(report))
        md.append("")
        for t, m in report["targets"].items():
            md.append(f"- {t}: {m['runtime']}")
        md.append("")
    p = report.get("parity")
    if p:
        md.append("## Parity (hirelc ONNX vs PyTorch lowered model)\n")
        if p["status"] == "ok":
            md.append(f"- samples: {p['samples']}\n- top-1 agreement: {p['top1_agreement']:.2f} %\n"
                      f"- top-1 accuracy: PyTorch {p['pytorch_top1']:.2f} %, ONNX Runtime {p['onnx_top1']:.2f} %\n"
                      f"- max / mean abs logit diff: {p['max_abs_diff']:.3e} / {p['mean_abs_diff']:.3e} "
                      f"(logit scale {p['logit_scale']:.3f})\n")
        else:
            md.append(f"- skipped: {p['note']}\n")
    if report.get("effective_storage_ratio"):
        md.append(f"Effective storage ratio (from the lowering report): {report['effective_storage_ratio']:.2f}x, "
                  f"{report['effective_bits_per_param']:.2f} bits/param.\n")
    lp = report.get("latency_prediction")
    if lp and lp["measured_ms"] is not None:
        md.append(f"Latency at batch {lp['batch']}: predicted {lp['predicted_ms']:.3f} ms by the per-layer table, "
                  f"measured {lp['measured_ms']:.3f} ms (measured / predicted {lp['measured_over_predicted']:.2f}).\n")
    ag = report.get("against")
    if ag:
        md.append(f"## Against the previous release\n\n`{ag['report']}` ({ag.get('created')})\n")
        md += md_table(["check", "old", "new", "change", "bound", "verdict"], (
            [r["check"], fmt(r["old"], ",.3f" if isinstance(r["old"], float) else ","),
             fmt(r["new"], ",.3f" if isinstance(r["new"], float) else ","), r["note"], fmt(r["bound"], "g"),
             r["verdict"]] for r in ag["rows"]))
        md.append("")
    md.append("Memory: resident-set growth of a fresh process creating the ONNX Runtime session and running each "
              "batch size once (MiB); it includes the weights as the session holds them (low-bit codes widened to "
              "int8) and the activation arena.\n")
    md.append("## Fused ops after ONNX Runtime optimisation\n")
    for k, a in report["artifacts"].items():
        ops = ", ".join(f"{op} {n}" for op, n in a["fused_ops"].items() if n) or "none"
        md.append(f"- {LABELS[k]}: {ops}")
    md.append("\n## Providers\n")
    md += [f"- {k}: {v}" for k, v in report["providers"].items()]
    m = report["machine"]
    md.append(f"\n## Machine\n\n{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
              f"{m['threads']} ORT threads, onnxruntime {m['onnxruntime']}, Python {m['python']}\n")
    g = report.get("gate", {})
    md.append("## Release gate\n")
    b = g.get("bounds", {})
    limits = [f"max_drop {b['max_drop']:g} points" if b.get("max_drop") is not None else "",
              f"min_size_ratio {b['min_size_ratio']:g}x" if b.get("min_size_ratio") is not None else "",
              f"max_latency_ms {b['max_latency_ms']:g} (batch {b['latency_batch']})"
              if b.get("max_latency_ms") is not None else "",
              f"min_parity {b['min_parity']:g} %" if b.get("min_parity") is not None else "",
              f"max_memory_mb {b['max_memory_mb']:g}" if b.get("max_memory_mb") is not None else "",
              *(f"{k} {b[k]:g}" for k in ("max_top1_regression", "max_latency_regression", "max_size_regression")
                if b.get(k) is not None)]
    md.append(f"Bounds: {', '.join(x for x in limits if x) or 'none'}\n")
    md.append("passed" if g.get("passed") else "FAILED:\n" + "\n".join(f"- {f}" for f in g.get("failures", [])))
    return "\n".join(md) + "\n"
