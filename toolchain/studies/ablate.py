"""`hirelc ablate`: what each part of the HiReLC search buys, and whether it beats the baselines, over seeds.

Every variant runs on the same baseline, budget, effort and, except ``uniform`` and ``random-time``, the same
number of real evaluations:

=======================  =============================================================================
full                     the search as shipped (with the ``quick`` preset, its warm-up screened by the proxy)
no-surrogate             the logit-MSE proxy shapes rewards throughout; no surrogate is trained
uniform-sensitivity      no Fisher guidance: every layer and block gets the same neutral sensitivity
single-agent             one PPO agent per level instead of an ensemble of three with voting
random                   random valid policies repaired into the budget (no agents, no surrogate, no
                         screening: its warm-up's random policies are evaluated as drawn)
random-time              random search given the wall time the full search took on the same seed (more
                         real evaluations: as many as that time holds at the full search's cost per one)
flat                     one PPO agent over every layer with the global target (no high level): HAQ-like
proxy-screen             the full search, but each cycle's promising candidates are ranked by the logit-MSE
                         proxy mapped to accuracy by a line fitted to the real results, not by the surrogate
proxy-screen-pool        proxy-screen, with 8 random policies repaired into the budget added to each cycle's
                         candidates, so the screening also weighs policies the agents would not propose
proxy-prior              the full search, but the surrogate learns a correction to the logit-MSE proxy mapped
                         to accuracy by a line through the real results, instead of accuracy from scratch
screened-warmup          the full search, but the warm-up's random policies are the ones the logit-MSE proxy
                         ranks best among 64 random policies repaired into the budget (``quick`` does so itself)
plain-warmup             the full search, but the warm-up's random policies are evaluated as drawn (no proxy)
random-screened          random search where each real evaluation is the proxy's best of 64 random policies
                         repaired into the budget (warm-up and cycles): the proxy without agents or surrogate
uniform                  the mildest uniform policy (one bit-width, one keep ratio) meeting the budget
=======================  =============================================================================

For each (variant, seed) the winner is lowered (``qat_epochs`` of fine-tuning), exported and scored on the
full test split with ONNX Runtime. Reported per run: final ORT top-1, the best real validation accuracy of
the search, effective storage ratio, real evaluations spent and the evaluation at which the winner was
found, search wall time, surrogate rank correlation. Per variant: mean and sample standard deviation over
seeds, and, against ``full`` (or the ``reference`` variant named) on the seeds both ran, the mean paired
difference of final top-1 with a Wilcoxon signed-rank test (exact for small samples): the one-sided p that the
reference is better, and the two-sided p. With 5 seeds the smallest one-sided p is 1/32 and the smallest two-sided p 1/16. Also a scatter
of surrogate-predicted against real accuracy pooled over every run whose screening the surrogate does, with
its Spearman correlation, beside the Spearman of the logit-MSE proxy (its negated drop) on the same points. Outputs in ``<out>``: ``ablation.json``, ``ablation.md``, ``ablation.png``,
``surrogate_scatter.png``; one folder per run (finished runs are reused, so an interrupted call resumes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from scipy.stats import wilcoxon

from hirelc import pipeline, runs
from hirelc.errors import HirelcError
from hirelc.export.runtime import make_session, ort_accuracy
from hirelc.lower import LowerConfig
from hirelc.machine import record
from hirelc.options import EQUAL_TIME, REFERENCE_VARIANT, VARIANTS, AblateConfig  # noqa: F401 (part of this API)
from hirelc.report import fmt, md_table
from hirelc.search import PRESETS
from hirelc.search.engine import surrogate_prediction
from hirelc.search.front import competing
from hirelc.search.plots import plot_ablation, plot_surrogate
from hirelc.search.surrogate import spearman
from hirelc.studies import report_header
from hirelc.topology import build_topology
from hirelc.train import load_baseline, set_threads

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
METRICS = ("final_top1", "best_val", "effective_ratio", "evals_to_best", "search_wall_s")
EVAL_CACHE = "eval-cache"  # real evaluations the runs share (the same warm-up policies of a seed, above all)
# what a run's figures depend on besides the study's options: a run reused from another report must share them
SAME_MACHINE = ("cpu", "isa", "cores", "threads", "onnxruntime", "torch")




def evals_to_best(history: list[dict]) -> int | None:
    """1-based index of the first real evaluation that reached the best accuracy within the budget (among those
    at the final fine-tune length, :func:`hirelc.search.front.competing`)."""
    ok = [(i, history[i]["real_acc"]) for i in competing(history) if history[i].get("meets_budget", True)]
    if not ok:
        return None
    best = max(a for _, a in ok)
    return next(i for i, a in ok if a == best) + 1


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of the values that exist."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def paired_test(reference: dict[int, float], other: dict[int, float]) -> dict:
    """The reference against another variant on the seeds both ran (``{seed: final top-1}`` each).

    ``diff`` is reference minus other, averaged; ``wins`` counts seeds where the reference is ahead, ``losses``
    behind; ``p_greater`` is the one-sided Wilcoxon signed-rank p that the reference is better and
    ``p_two_sided`` the two-sided one (None when fewer than two seeds are paired or every difference is 0).
    """
    seeds = sorted(set(reference) & set(other))
    d = [float(reference[s]) - float(other[s]) for s in seeds]
    out = {"seeds": seeds, "n": len(d), "diff": statistics.fmean(d) if d else None,
           "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "p_greater": None, "p_two_sided": None}
    if len(d) >= 2 and any(x != 0 for x in d):
        out["p_greater"] = float(wilcoxon(d, alternative="greater").pvalue)
        out["p_two_sided"] = float(wilcoxon(d).pvalue)
    return out


def _read_history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _share_graph_bytes(rd: Path, reference: bool = True) -> None:
    """Measure the baseline's graph bytes, fp32 file bytes and latency table (and the ORT int8 budget when
    ``reference``) once in ``rd``; every run's folder links or copies them."""
    model, mcfg, _ = load_baseline(rd)
    topo = build_topology(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    pipeline.load_or_measure_graph_bytes(rd, model, topo)
    pipeline.fp32_file_bytes(rd, model, mcfg)
    pipeline.prepare_latency(rd, model, mcfg, topo, reference=reference)


def equal_time_cycles(reference_run: Path, cfg: AblateConfig) -> int:
    """Cycles of random search that spend about the wall time the reference search of the same seed took: as many
    real evaluations as its wall time holds at its own mean cost per evaluation (never fewer than it spent).

    When the reference doubled its fine-tune (adaptive fidelity), the cost per evaluation is that of its
    evaluations at the final length (from its log), and its shorter warm-ups count as time spent, not as
    evaluations the random search can make at that cost."""
    ref = runs.read_json(reference_run / "search.json", "search summary")
    search = dataclasses.replace(PRESETS[cfg.preset], **cfg.search_overrides)
    n_ref, per_eval = ref["n_real_evals"], ref.get("mean_eval_s") or ref["wall_s"] / max(1, ref["n_real_evals"])
    log = reference_run / "search.jsonl"
    if log.is_file():
        history = _read_history(log)
        final = [history[i]["eval_s"] for i in competing(history)]
        if final and len(final) < len(history):
            n_ref, per_eval = len(final), max(statistics.fmean(final), 1e-9)
    n = max(n_ref, int(ref["wall_s"] // per_eval))
    per_cycle = max(1, search.real_evals_per_cycle)
    return max(search.cycles, math.ceil((n - search.warmup_real_evals) / per_cycle))


# what a search configuration recorded before a field existed did (that field's behaviour before it was added)
_BEFORE_THE_FIELD = {"screening": "surrogate", "surrogate_prior": "none", "warmup_pool": 0}


def _check_searched_as_now(sub: Path, variant: str, preset: str, overrides: dict) -> None:
    """A finished run is reused only when its search ran with the configuration this study gives it; one made
    by a build with other defaults, or with other switches, would otherwise be mixed in silently."""
    now = _search_config(preset, overrides)
    was = runs.read_json(sub / "search.json", "search summary").get("config", {})
    changed = _search_changes(was, now)
    if changed:
        diff = "; ".join(f"{k} {was.get(k, _BEFORE_THE_FIELD.get(k))!r} there, {now[k]!r} now" for k in changed)
        raise HirelcError(f"{sub}: searched with another configuration than this study's {variant} runs use "
                          f"({diff}); give another --out, or remove that folder to search it again")


def _finished(sub: Path) -> bool:
    return all((sub / name).exists() for name in ("search.json", runs.POLICY, runs.HIRELC_ONNX))


def _search_config(preset: str, overrides: dict) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(PRESETS[preset], **overrides))))


def _search_changes(was: dict, now: dict) -> list[str]:
    """The search settings (not the seed, nor the formats the machine offered) in which ``was`` differs from
    ``now``; a field ``was`` predates counts as what the search did before the field existed."""
    return [k for k in now if k not in ("seed", "formats") and was.get(k, _BEFORE_THE_FIELD.get(k, now[k])) != now[k]]


def _run_overrides(cfg: AblateConfig, variant: str) -> dict:
    return {"fill_budget": cfg.fill_budget, **cfg.search_overrides, **VARIANTS[variant]}


def reusable_runs(rd: Path, cfg: AblateConfig, sources, echo=print) -> dict[tuple[str, int], dict]:
    """The finished runs of earlier ablation reports (``ablation.json`` files or the folders holding them) that
    this study asks for, by ``(variant, seed)``: a study split over sessions or machines of one kind continues
    from its committed reports instead of its run folders.

    A report is taken only when it was made on this baseline (model and test top-1), with this study's options
    (everything but seeds and variants), on a machine like this one (:data:`SAME_MACHINE`: the latency budget is
    measured where the study runs, so another CPU or runtime finds other winners), and each of its runs with the
    search configuration this study gives that variant; anything else is a one-line error naming what differs.
    Two reports disagreeing about one run are refused. A report's runs carry ``reused_from`` in the new report.
    """
    if not sources:
        return {}
    meta = runs.read_json(rd / runs.BASELINE_META, "baseline metadata")
    here, now = record(), json.loads(json.dumps(study_options(cfg)))
    found: dict[tuple[str, int], dict] = {}
    for src in sources:
        path = Path(src) / ABLATION_JSON if Path(src).is_dir() else Path(src)
        if not path.is_file():
            raise HirelcError(f"--reuse: no ablation report at {path}")
        rep = runs.read_json(path, "ablation report")
        if not isinstance(rep.get("runs"), list) or not isinstance(rep.get("config"), dict):
            raise HirelcError(f"--reuse: {path} is not an ablation report (no runs or config)")
        if rep.get("model") != meta.get("model") or rep.get("baseline_test_acc") != meta.get("test_acc"):
            raise HirelcError(f"--reuse: {path} was made on another baseline (test top-1 "
                              f"{rep.get('baseline_test_acc')} there, {meta.get('test_acc')} here)")
        was = {k: v for k, v in rep["config"].items() if k not in ("seeds", "variants")}
        if not any(k.startswith("lower.") for k in was):
            raise HirelcError(f"--reuse: {path} was made by a build that did not record its lowering settings "
                              f"(before BatchNorm re-estimation and the 2e-5 fine-tune): its winners were lowered "
                              f"otherwise, so its runs are not comparable with runs made here")
        diff = runs.differences(was, now, now_word="here")
        if diff:
            raise HirelcError(f"--reuse: {path} was made with other study options ({diff})")
        machine = rep.get("machine") if isinstance(rep.get("machine"), dict) else {}
        diff = runs.differences(machine, here, SAME_MACHINE, now_word="here")
        if diff:
            raise HirelcError(f"--reuse: {path} was measured on another kind of machine ({diff}); its runs are "
                              f"not comparable with runs made here")
        untold = 0
        for row in rep["runs"]:
            if not isinstance(row, dict):
                raise HirelcError(f"--reuse: {path} holds a run that is not an object")
            key = (row.get("variant"), row.get("seed"))
            if key[0] not in cfg.variants or key[1] not in cfg.seeds:
                continue
            top1 = row.get("final_top1")
            if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
                raise HirelcError(f"--reuse: {path}: {key[0]} seed {key[1]} has no finite final_top1")
            missing = [k for k in (*METRICS, "real_evals", "surrogate_points") if k not in row]
            if missing or not isinstance(row["surrogate_points"], list):
                raise HirelcError(f"--reuse: {path}: {key[0]} seed {key[1]} lacks "
                                  f"{', '.join(missing) or 'a list of surrogate_points'}")
            searched = row.get("search_config")
            if searched is None:
                untold += 1
            elif not isinstance(searched, dict):
                raise HirelcError(f"--reuse: {path}: {key[0]} seed {key[1]} has a search_config that is not an object")
            else:
                diff = _search_changes(searched, _search_config(cfg.preset, _run_overrides(cfg, key[0])))
                if diff:
                    raise HirelcError(f"--reuse: {path}: {key[0]} seed {key[1]} was searched with another "
                                      f"configuration ({', '.join(diff)})")
            if key in found and found[key]["final_top1"] != top1:
                raise HirelcError(f"--reuse: {key[0]} seed {key[1]} scored {found[key]['final_top1']} in "
                                  f"{found[key]['reused_from']} and {top1} in {path}: not the same study")
            found[key] = {**row, "reused_from": str(path)}
        if untold:
            echo(f"  {path}: {untold} run(s) made before reports kept their search configuration, reused on the "
                 f"study's options alone")
    return found


def _one_run(rd: Path, sub: Path, variant: str, seed: int, cfg: AblateConfig, bundle, progress: bool,
             echo) -> dict:
    runs.link_baseline(rd, sub)
    pipeline.share_latency(rd, sub)
    overrides = _run_overrides(cfg, variant)
    searched = (sub / "search.json").exists() and (sub / runs.POLICY).exists()
    reference = sub.parent / f"{REFERENCE_VARIANT}-seed{seed}"
    if variant == EQUAL_TIME and (not searched or (reference / "search.json").is_file()):
        overrides["cycles"] = equal_time_cycles(reference, cfg)
        # a reference run done again (its folder removed) takes another time: the equal-time run follows it
        before = (runs.read_json(sub / "search.json", "search summary").get("config", {}).get("cycles")
                  if searched else None)
        if searched and before != overrides["cycles"]:
            echo(f"  {variant} seed {seed}: the {REFERENCE_VARIANT} run now holds {overrides['cycles']} cycles' "
                 f"time (not {before}): searching again")
            (sub / runs.HIRELC_ONNX).unlink(missing_ok=True)  # built from the stale winner
            searched = False
    if searched:
        _check_searched_as_now(sub, variant, cfg.preset, overrides)
    if not searched:
        echo(f"  {variant} seed {seed}: searching")
        pipeline.search_stage(sub, target_ratio=cfg.target_ratio, preset=cfg.preset, seed=seed, progress=progress,
                              latency_budget=cfg.latency_budget, overrides=overrides,
                              eval_cache=sub.parent / EVAL_CACHE)
    summary = runs.read_json(sub / "search.json", "search summary")
    if not (sub / runs.HIRELC_ONNX).exists():
        echo(f"  {variant} seed {seed}: lowering the winner")
        pipeline.lower_stage(sub, str(sub / runs.POLICY),
                    LowerConfig(epochs=cfg.qat_epochs, max_steps=cfg.lower_max_steps, seed=seed), progress=progress)
        pipeline.export_stage(sub)
    top1 = ort_accuracy(make_session(sub / runs.HIRELC_ONNX), bundle.test.x.numpy(), bundle.test.y.numpy())
    history = _read_history(sub / "search.jsonl")
    report = runs.read_json(sub / runs.LOWER_REPORT, "lower report")
    found = evals_to_best(history)
    return {
        "variant": variant, "seed": seed, "final_top1": top1, "best_val": summary["best_acc"],
        "effective_ratio": report["effective_ratio"], "real_evals": summary["n_real_evals"],
        "evals_to_best": found, "search_wall_s": summary["wall_s"], "search_config": summary.get("config"),
        # of real_evals, those another run of the study had made (the shared cache); their time is in search_wall_s
        "cached_real_evals": summary.get("cached_real_evals", 0),
        # whether the search itself found the winner, or it was one of the warm-up's (shared) policies
        "winner_after_warmup": None if found is None else history[found - 1].get("cycle", 0) > 0,
        "surrogate_spearman": summary.get("surrogate_spearman"),
        # the surrogate's own prediction of each real evaluation it saw before (whatever screened it), and the
        # proxy's ranking of the same evaluations: minus its predicted drop
        "surrogate_points": [[surrogate_prediction(h), h["real_acc"]] for h in history if _by_surrogate(h, variant)],
        "proxy_points": [[-h["proxy_drop"], h["real_acc"]] for h in history
                         if _by_surrogate(h, variant) and h.get("proxy_drop") is not None],
    }


def ablate(run_dir: str | Path, cfg: AblateConfig | None = None, out_dir: str | Path | None = None,
           progress: bool = True, echo=print, reuse=()) -> dict:
    """Run every (variant, seed), then write ablation.json, ablation.md and the plots into ``out_dir``.

    ``reuse``: earlier ablation reports whose runs of this study are taken as they are (see
    :func:`reusable_runs`) wherever ``out_dir`` holds no finished run of that variant and seed."""
    cfg = cfg or AblateConfig()
    if reuse:  # checked before the output folder is made
        runs.require_run_dir(run_dir, runs.BASELINE_META, runs.BASELINE_CKPT, runs.CONFIG)
    reused = reusable_runs(Path(run_dir), cfg, reuse, echo)
    rd, out = runs.open_study_dir(run_dir, out_dir, "ablation", ABLATION_JSON, "ablation",
                                  options=study_options(cfg))
    for s in cfg.seeds:  # an equal-time run needs its reference's search folder
        ref, eq = out / f"{REFERENCE_VARIANT}-seed{s}", out / f"{EQUAL_TIME}-seed{s}"
        if (EQUAL_TIME in cfg.variants and (REFERENCE_VARIANT, s) in reused and (EQUAL_TIME, s) not in reused
                and not _finished(eq) and not (ref / "search.json").is_file()):
            raise HirelcError(f"{EQUAL_TIME} seed {s} spends the wall time of the {REFERENCE_VARIANT} run, which "
                              f"is reused from a report and has no search folder here: reuse {EQUAL_TIME} seed "
                              f"{s} too, or run {REFERENCE_VARIANT} here")
    set_threads()
    t0 = time.time()
    bundle = pipeline.run_bundle(rd)
    _share_graph_bytes(rd, reference=cfg.latency_budget)
    # seed by seed, so that a study stopped part-way already holds complete pairs; reported variant by variant
    order = sorted(cfg.variants, key=lambda v: v == EQUAL_TIME)  # it needs the reference's time of the same seed
    done = {}
    for s in cfg.seeds:
        for v in order:
            sub = out / f"{v}-seed{s}"
            if (v, s) in reused and not _finished(sub):
                echo(f"  {v} seed {s}: reused from {reused[v, s]['reused_from']}")
                done[v, s] = reused[v, s]
            else:
                done[v, s] = _one_run(rd, sub, v, s, cfg, bundle, progress, echo)
    rows = [done[v, s] for v in cfg.variants for s in cfg.seeds]
    summary = {v: {m: mean_std([r[m] for r in rows if r["variant"] == v]) for m in (*METRICS, "real_evals")}
               for v in cfg.variants}
    paired = {}
    if cfg.reference in cfg.variants:
        ref = {r["seed"]: r["final_top1"] for r in rows if r["variant"] == cfg.reference}
        paired = {v: paired_test(ref, {r["seed"]: r["final_top1"] for r in rows if r["variant"] == v})
                  for v in cfg.variants if v != cfg.reference}
    pooled = [p for r in rows if _uses_surrogate(r["variant"]) for p in r["surrogate_points"]]
    pred, real = [p for p, _ in pooled], [r for _, r in pooled]
    proxy = [p for r in rows if _uses_surrogate(r["variant"]) for p in r.get("proxy_points", [])]
    report = {
        **report_header(rd),
        "config": {**study_options(cfg), "seeds": list(cfg.seeds), "variants": list(cfg.variants)},
        "wall_s": round(time.time() - t0, 1),
        # the earlier reports some runs were taken from (each such run names its own in reused_from)
        "reused_from": sorted({r["reused_from"] for r in rows if r.get("reused_from")}),
        "runs": rows,
        "summary": summary,
        "paired": {"reference": cfg.reference if paired else None, "metric": "final_top1", "tests": paired},
        "surrogate": {"points": len(pooled), "spearman": spearman(pred, real) if len(pooled) >= 2 else None,
                      "proxy_points": len(proxy),
                      "proxy_spearman": spearman(*zip(*proxy, strict=True)) if len(proxy) >= 2 else None},
    }
    plot_ablation(summary, out / "ablation.png")
    if len(pooled) >= 2:
        plot_surrogate(pred, real, out / "surrogate_scatter.png")
    runs.atomic_write_json(out / ABLATION_JSON, report)
    runs.atomic_write_text(out / ABLATION_MD, format_ablation(report))
    return report


def study_options(cfg: AblateConfig) -> dict:
    """What every run of a study depends on: its options (seeds and variants may be added when it is resumed)
    and this build's lowering settings (:func:`hirelc.pipeline.lowering_record`)."""
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seeds", "variants", "reference")},
            **pipeline.lowering_record()}


def _uses_surrogate(variant: str) -> bool:
    """Whether the variant's searches have a surrogate (and cycles for it to predict in)."""
    sw = VARIANTS[variant]
    return sw.get("use_surrogate", True) and sw.get("mode", "hierarchical") != "random" and sw.get("cycles", 1) > 0


def _by_surrogate(rec: dict, variant: str) -> bool:
    """Whether a logged real evaluation holds the surrogate's prediction (a log written before ``surrogate_acc``
    existed holds only the screening's, which under proxy screening is not the surrogate's)."""
    if "surrogate_acc" in rec:
        return rec["surrogate_acc"] is not None
    return rec.get("predicted_acc") is not None and VARIANTS[variant].get("screening", "surrogate") == "surrogate"


def paired_cells(t: dict) -> list[str]:
    """A paired test's table cells: mean difference, wins / losses of n, one- and two-sided p."""
    return [fmt(t["diff"], "+.2f"), f"{t['wins']} / {t['losses']} of {t['n']}", fmt(t["p_greater"], ".3f"),
            fmt(t["p_two_sided"], ".3f")]


def format_mean_std(d: dict, spec: str) -> str:
    """``mean ± std`` of a :func:`mean_std` summary in ``spec``; ``-`` when it holds no value."""
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:{spec}} ± {d['std']:{spec}}"


def format_ablation(report: dict) -> str:
    """The ablation as a Markdown table of mean ± std over seeds."""
    c = report["config"]
    name = report["model"]["name"] if report.get("model") else ""
    lines = [
        f"# hirelc ablate - {name}",
        "",
        f"{report['created']} - budget {c['target_ratio']}x, search effort {c['preset']}, seeds "
        f"{', '.join(map(str, c['seeds']))}, {c['qat_epochs']} fine-tuning epochs per winner"
        f"{', budget filled after repair' if c.get('fill_budget') else ''}; baseline test "
        f"{report.get('baseline_test_acc')} %",
        "",
    ]
    tests = (report.get("paired") or {}).get("tests") or {}
    ref = (report.get("paired") or {}).get("reference")
    n = max((t["n"] for t in tests.values()), default=0)
    head = ["variant", "final ORT top-1 %", "best search val %", "effective ratio", "real evals",
            "winner found at eval", "winner after warm-up", "search s"]
    if tests:
        head += [f"{ref} − this (paired)", f"{ref} ahead / behind", "p one-sided", "p two-sided"]

    def cols(v: str) -> list[str]:
        if not tests:
            return []
        t = tests.get(v)
        return ["-"] * 4 if t is None else paired_cells(t)

    def after_warmup(v: str) -> str:  # seeds whose winner the search found after the warm-up (older reports: -)
        found = [r.get("winner_after_warmup") for r in report.get("runs", []) if r["variant"] == v]
        return "-" if not found or None in found else f"{sum(found)} of {len(found)}"

    specs = (("final_top1", ".2f"), ("best_val", ".2f"), ("effective_ratio", ".2f"), ("real_evals", ".1f"),
             ("evals_to_best", ".1f"))
    lines += md_table(head, ([v, *(format_mean_std(s[m], spec) for m, spec in specs), after_warmup(v),
                              format_mean_std(s["search_wall_s"], ".0f"), *cols(v)]
                             for v, s in report["summary"].items()))
    sur = report["surrogate"]
    rho = fmt(sur["spearman"], ".2f")
    lines += ["", f"Mean ± sample std over seeds. Surrogate predicted vs real accuracy, pooled over the runs that "
              f"use it: Spearman {rho} on {sur['points']} points (each predicted before the surrogate saw it)."]
    if sur.get("proxy_points"):
        lines[-1] += (f" The logit-MSE proxy on the same points: Spearman {fmt(sur.get('proxy_spearman'), '.2f')} "
                      f"on {sur['proxy_points']}.")
    if tests:
        lines += ["", f"Paired by seed against {ref}: the mean difference of final ORT top-1 in points ({ref} minus "
                  f"the variant; positive: {ref} ahead) and Wilcoxon signed-rank p-values, one-sided for {ref} "
                  f"being better and two-sided. With {n} paired seeds the smallest possible one-sided p is "
                  f"{2.0 ** -n:.3f}, two-sided {min(1.0, 2.0 ** (1 - n)):.3f}."]
    return "\n".join(lines) + "\n"
