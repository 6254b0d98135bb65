"""The README's results section, generated from finished `hirelc bench` and `hirelc ablate` runs.

``results_section`` reads bench.json / ablation.json files, restates the exact command that produced each
one (from its recorded config), the date and the machine, the tables, and checks the project's goal figures
against what was measured (met / not met, never asserted). ``write_into`` replaces the text between two
marker lines of a Markdown file, atomically, so the section can be regenerated at any time.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.machine import record
from hirelc.options import METHODS, REFERENCE_VARIANT
from hirelc.report import dominates, fmt
from hirelc.studies.ablate import ABLATION_JSON, format_ablation, format_mean_std, paired_cells
from hirelc.studies.bench import BENCH_JSON, format_bench

START, END = "<!-- hirelc-results:start -->", "<!-- hirelc-results:end -->"
UNIFORM = ("ort-int8", "uniform-w4", "uniform-int8", "prune-int8")  # the one-setting-for-all baselines


def load(path: str | Path) -> tuple[str, dict]:
    """``("bench" | "ablation", report)`` from a report file or the folder holding one."""
    p = Path(path)
    if p.is_dir():
        hits = [p / n for n in (BENCH_JSON, ABLATION_JSON) if (p / n).is_file()]
        if not hits:
            raise HirelcError(f"{p}: holds neither {BENCH_JSON} nor {ABLATION_JSON} (run `hirelc bench` or "
                              "`hirelc ablate` first)")
        p = hits[0]
    if not p.is_file():
        raise HirelcError(f"{p}: no such file")
    report = runs.read_json(p, "report")
    if isinstance(report, dict) and isinstance(report.get("methods"), dict):
        return "bench", report
    if isinstance(report, dict) and isinstance(report.get("summary"), dict) and "runs" in report:
        return "ablation", report
    raise HirelcError(f"{p}: not a bench.json or ablation.json report")


def bench_command(report: dict) -> str:
    c = report["config"]
    cmd = f"hirelc bench -r {report['run_dir']} --target-ratio {c['target_ratio']:g}"
    if c.get("max_latency_ms"):
        cmd += f" --max-latency-ms {c['max_latency_ms']:g}"
    if c.get("fill_budget"):
        cmd += " --fill-budget"
    cmd += f" --preset {c['preset']} --qat-epochs {c['qat_epochs']:g} --runs {c['runs']} --seed {c['seed']}"
    if c.get("methods") and list(c["methods"]) != list(METHODS):
        cmd += "".join(f" --method {m}" for m in c["methods"])
    if list(c.get("targets") or ["ort-cpu"]) != ["ort-cpu"]:
        cmd += "".join(f" --target {t}" for t in c["targets"])
    return cmd


def ablation_command(report: dict) -> str:
    c, ref = report["config"], (report.get("paired") or {}).get("reference")
    return (f"hirelc ablate -r {report['run_dir']} {' '.join(f'--seed {s}' for s in c['seeds'])} "
            f"{' '.join(f'--variant {v}' for v in c['variants'])} --target-ratio {c['target_ratio']:g} --preset {c['preset']} "
            f"--qat-epochs {c['qat_epochs']:g}" + (" --fill-budget" if c.get("fill_budget") else "")
            + "".join(f" --reuse {p}" for p in report.get("reused_from") or [])
            + (f" --reference {ref}" if ref not in (None, REFERENCE_VARIANT) else ""))


def bench_goals(report: dict) -> list[tuple[str, bool | None, str]]:
    """The goal figures of a comparison: ``(goal, met or None when not measurable, the measured figures)``."""
    rows = report["methods"]
    h = rows.get("hirelc")
    if h is None:
        return []
    goals: list[tuple[str, bool | None, str]] = []
    if "fp32" in rows:
        drop = rows["fp32"]["top1"] - h["top1"]
        goals.append(("≥ 10x effective storage at ≤ 1.0-point ORT top-1 drop",
                      h["effective_ratio"] >= 10.0 and drop <= 1.0,
                      f"{h['effective_ratio']:.2f}x at a drop of {drop:+.2f} points"))
    for axis, x, what, better in (("bytes", lambda r: r["bytes"], "file bytes", "smaller"),
                                  ("latency", lambda r: r["latency_ms"]["8"], "batch-8 latency", "faster")):
        if axis == "latency" and "8" not in h["latency_ms"]:
            continue
        others = [m for m in UNIFORM if m in rows]
        # accuracy up, x down
        beaten_by = [m for m in others if dominates((rows[m]["top1"], -x(rows[m])), (h["top1"], -x(h)))]
        goals.append((f"on or beyond the Pareto front of the uniform baselines ({what})", not beaten_by,
                      "dominated by " + ", ".join(beaten_by) if beaten_by else
                      f"no uniform baseline ({', '.join(others)}) is both {better} and more accurate"))
    if "ort-int8" in rows:
        o = rows["ort-int8"]
        sp = h["speedup_vs_ort_int8"]
        fast = all(v is not None and v >= 1.3 for v in sp.values())
        goals.append(("≥ 1.3x faster than ORT int8 on CPU at no worse accuracy",
                      fast and h["top1"] >= o["top1"],
                      ", ".join(f"b{b} {v:.2f}x" for b, v in sp.items()) +
                      f"; top-1 {h['top1']:.2f} vs {o['top1']:.2f} %"))
    if "random" in rows:
        r = rows["random"]
        # the same evaluations at the final fine-tune length (a warm-up scored again after a doubling not counted)
        same = (r.get("final_fidelity_evals", r.get("real_evals"))
                == h.get("final_fidelity_evals", h.get("real_evals")))
        goals.append(("beats random search at equal real evaluations",
                      (h["top1"] > r["top1"]) if same else None,
                      f"{h['top1']:.2f} vs {r['top1']:.2f} % ORT top-1 after "
                      f"{h.get('real_evals')} / {r.get('real_evals')} real evaluations"))
    return goals


def ablation_goals(report: dict) -> list[tuple[str, bool | None, str]]:
    """The search's goal against its baselines: ahead of each by >= 0.5 point at one-sided p < 0.05 (paired by seed),
    and the surrogate's rank correlation on unseen candidates >= 0.7."""
    paired = report.get("paired") or {}
    ref, tests = paired.get("reference"), paired.get("tests") or {}
    goals: list[tuple[str, bool | None, str]] = []
    for v in ("random", "random-time", "flat", "uniform"):
        t = tests.get(v)
        if t is None:
            continue
        # with n seeds the smallest one-sided p is 2^-n: below 5 seeds p < 0.05 cannot be reached at all
        ok = None if 2.0 ** -t["n"] >= 0.05 else (
            t["diff"] >= 0.5 and t["p_greater"] is not None and t["p_greater"] < 0.05)
        what = "random search at equal wall time" if v == "random-time" else v
        goals.append((f"{ref} ahead of {what} by ≥ 0.5 point ORT top-1 at p < 0.05", ok,
                      f"{fmt(t['diff'], '+.2f')} points over {t['n']} seeds, {t['wins']} ahead / {t['losses']} "
                      f"behind, one-sided p {fmt(t['p_greater'], '.3f')}"))
    rho = (report.get("surrogate") or {}).get("spearman")
    if rho is not None:
        goals.append(("surrogate Spearman ≥ 0.7 on unseen candidates", rho >= 0.7,
                      f"{rho:.2f} on {report['surrogate']['points']} points"))
    return goals


def _goal_lines(goals) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "not comparable"}
    return [f"- {g}: {mark[ok]} ({fig})" for g, ok, fig in goals]


def _demote(md: str) -> list[str]:
    """A report's own Markdown under this section: its title becomes a level-4 heading."""
    lines = md.rstrip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = "####" + lines[0][1:]
    return lines


def _report_file(path: str | Path) -> Path:
    p = Path(path)
    return next((p / n for n in (BENCH_JSON, ABLATION_JSON) if (p / n).is_file()), p) if p.is_dir() else p


def _folder_name(name: object) -> str:
    """A report's model name as one safe path component: only ``[A-Za-z0-9._-]`` (others become ``_``), no
    leading dot or dash (so never ``.``, ``..``, hidden or option-like), at most 100 characters, and ``model``
    when nothing is left."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".-")[:100]
    return safe if safe.strip("._-") else "model"


def _inside(folder: Path, dest: Path) -> Path:
    """``folder``, after checking that it resolves (symbolic links followed) to a place inside ``dest``."""
    if not folder.resolve().is_relative_to(dest.resolve()) or folder.resolve() == dest.resolve():
        raise HirelcError(f"{folder}: lies outside the plots folder {dest}; refusing to write there")
    return folder


def _holds_other_report(folder: Path, report: Path) -> bool:
    """True when ``folder`` already keeps a bench or ablation report that is not ``report``'s content."""
    for name in (BENCH_JSON, ABLATION_JSON):
        kept = folder / name
        if kept.is_file() and not (report.is_file() and kept.read_bytes() == report.read_bytes()):
            return True
    return False


def copy_plots(paths: list[str | Path], dest: str | Path, base: str | Path) -> dict[Path, list[Path]]:
    """Keep each report beside its figures in ``dest``: one folder per report, ``<model>-<kind>`` (numbered
    when that folder is taken in this call or keeps another report from an earlier one, which is never
    overwritten), holding the report file, its Markdown and its PNG plots, so the section can be rebuilt later
    from ``dest`` alone. Returns the plots' paths relative to ``base`` (where the Markdown file lies), per report
    file. A report already in a folder of its own directly under ``dest`` is used in place."""
    dest, out, used = Path(dest), {}, set()
    for p in paths:
        kind, rep = load(p)
        f = _report_file(p)
        model = rep.get("model")
        stem = f"{_folder_name(model.get('name', 'model') if isinstance(model, dict) else 'model')}-{kind}"
        if f.parent.parent.resolve() == dest.resolve() and f.parent not in used:
            folder = f.parent  # already kept in a folder of its own there: used in place
        else:  # a folder of that name holding another report (from this call or an earlier one) is never touched
            folder, n = dest / stem, 2
            while folder in used or _holds_other_report(folder, f):
                folder, n = dest / f"{stem}-{n}", n + 1
        used.add(folder)
        _inside(folder, dest)
        folder.mkdir(parents=True, exist_ok=True)
        _inside(folder, dest)  # again, now that it exists (a link planted there is followed)
        pngs = sorted(f.parent.glob("*.png"))
        for src in [f, f.with_suffix(".md"), *pngs]:
            target = _inside(folder / src.name, folder)
            if src.is_file() and not (target.exists() and target.samefile(src)):
                shutil.copyfile(src, target)
        out[f] = [Path(os.path.relpath(folder / png.name, base)) for png in pngs]
    return out


def _machine_line(m: dict) -> str:
    isa = f" ({', '.join(m['isa'])})" if m.get("isa") else ""
    return (f"{m['cpu']}{isa}, {m['cores']} cores, {m['system']}; ONNX Runtime {m['onnxruntime']}, "
            f"torch {m['torch']}")


def results_section(paths: list[str | Path], info: dict | None = None,
                    plots: dict[Path, list[Path]] | None = None) -> str:
    """The Markdown results section for the given bench / ablation reports (in the order given); ``plots``
    (from ``copy_plots``) adds each report's figures below its table."""
    if not paths:
        raise HirelcError("give at least one bench.json or ablation.json (or the folder holding it)")
    loaded = [load(p) for p in paths]
    figures = [(plots or {}).get(_report_file(p), []) for p in paths]
    # the machine each report recorded when it ran (this one, described once, for reports too old to say)
    here = info or (None if all(rep.get("machine") for _, rep in loaded) else record())
    recorded = [info or rep.get("machine") or here for _, rep in loaded]
    one = all(m == recorded[0] for m in recorded)
    lines = [
        "### Generated results (`hirelc results`)",
        "",
        (f"Machine: {_machine_line(recorded[0])}. " if one else "")
        + "Every table below is a report file rendered as it was written; rerun the command above a table to "
        "regenerate it, and `hirelc results` to rebuild this section.",
    ]
    for (kind, rep), pngs, m in zip(loaded, figures, recorded, strict=True):
        name = (rep.get("model") or {}).get("name", "?")
        data = (rep.get("data") or {}).get("name", "")
        lines += ["", f"#### {kind}: {name}{' on ' + data if data else ''} ({rep['created'][:10]})", "", "```bash",
                  bench_command(rep) if kind == "bench" else ablation_command(rep), "```", ""]
        body = _demote(format_bench(rep) if kind == "bench" else format_ablation(rep))
        if not one:
            lines += [f"Machine: {_machine_line(m)}.", ""]
        lines += body[2:]  # the report's own title repeats the heading above
        for png in pngs:
            lines += ["", f"![{png.stem}]({png.as_posix()})"]
        if kind == "bench":
            goals = bench_goals(rep)
            if goals:
                lines += ["", "Goal figures (measured, not asserted):", *_goal_lines(goals)]
        else:
            goals = ablation_goals(rep)
            if goals:
                lines += ["", "Goal figures (measured, not asserted):", *_goal_lines(goals)]
            lines += ["", "Per run: " + "; ".join(
                f"{r['variant']} s{r['seed']} {r['final_top1']:.2f} % ({r['effective_ratio']:.2f}x, "
                f"{r['search_wall_s']:.0f} s)" for r in rep["runs"])]
    return "\n".join(lines) + "\n"


def _when(rep: dict) -> str:
    created = str(rep.get("created", "?"))
    return f"{created[:10]} {created[11:16]} UTC" if len(created) >= 16 else created


def compact_section(paths: list[str | Path], title: str = "Results (generated by `hirelc results --compact`)") -> str:
    """A short section for a README: per report, in the order given, one line naming the model, the budget, when
    and by which command, then a small table: a seeded study's variants (mean ± std ORT top-1, the paired
    difference to the reference variant, wins / losses, Wilcoxon p) or a comparison's methods (top-1, bytes, size
    ratio, latencies, batch-8 speed against ORT int8)."""
    if not paths:
        raise HirelcError("give at least one bench.json or ablation.json (or the folder holding it)")
    loaded = [load(p) for p in paths]
    cpus = ", ".join(sorted({(r.get("machine") or {}).get("cpu", "?") for _, r in loaded}))
    lines = [f"### {title}", "", f"Measured on {cpus}; each table is one report, regenerated by the command above it."]
    for kind, rep in loaded:
        c, name = rep["config"], (rep.get("model") or {}).get("name", "?")
        if kind == "ablation":
            sur = rep.get("surrogate") or {}
            rho, prho = sur.get("spearman"), sur.get("proxy_spearman")
            lines += ["", f"**{name}** (fp32 {fmt(rep.get('baseline_test_acc'), '.2f')} %), {c['target_ratio']:g}x "
                      f"budget, `{c['preset']}` effort, {_when(rep)}"
                      + (f"; surrogate Spearman {rho:.2f} on {sur['points']} points" if rho is not None else "")
                      + (f" (the proxy on the same points: {prho:.2f})" if rho is not None and prho is not None
                         else "") + f": `{ablation_command(rep)}`", "",
                      "| variant | seeds | ORT top-1 % | reference − this | ahead / behind | p one-sided | "
                      "p two-sided |", "|---|---|---|---|---|---|---|"]
            paired = rep.get("paired") or {}
            ref, tests = paired.get("reference"), paired.get("tests") or {}
            for v in c["variants"]:
                summ = (rep["summary"].get(v) or {}).get("final_top1")
                t = tests.get(v)
                cells = paired_cells(t) if t else ["(reference)" if v == ref else "-", "-", "-", "-"]
                lines.append(f"| {v} | {(summ or {}).get('n', 0)} | {format_mean_std(summ, '.2f') if summ else '-'} | "
                             + " | ".join(cells) + " |")
        else:
            lines += ["", f"**{name}**, {c['target_ratio']:g}x budget, {_when(rep)}: `{bench_command(rep)}`", "",
                      "| method | ORT top-1 % | bytes | fp32/size | b1 ms | b8 ms | b8 ort-int8/x |",
                      "|---|---|---|---|---|---|---|"]
            for m, r in rep["methods"].items():
                lat = r.get("latency_ms") or {}
                sp = (r.get("speedup_vs_ort_int8") or {}).get("8")
                lines.append(f"| {m} | {r['top1']:.2f} | {r['bytes']:,} | {fmt(r.get('size_ratio'), '.2f', 'x')} | "
                             f"{fmt(lat.get('1'), '.3f')} | {fmt(lat.get('8'), '.3f')} | {fmt(sp, '.2f', 'x')} |")
    if any(k == "ablation" for k, _ in loaded):
        lines += ["", "Mean ± sample std over seeds; paired by seed against the reference variant (positive: the "
                  "reference ahead), Wilcoxon signed-rank p."]
    return "\n".join(lines) + "\n"


def write_into(path: str | Path, section: str) -> Path:
    """Replace what lies between the marker lines of a Markdown file (appending them at the end when absent)."""
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"{p}: no such file")
    text = p.read_text()
    block = f"{START}\n{section.rstrip()}\n{END}"
    if text.count(START) != text.count(END) or text.count(START) > 1:
        raise HirelcError(f"{p}: the markers {START} / {END} must appear once each, in that order")
    if START in text:
        head, rest = text.split(START, 1)
        if END not in rest:
            raise HirelcError(f"{p}: {START} without {END} after it")
        tail = rest.split(END, 1)[1]
        new = head + block + tail
    else:
        new = text.rstrip("\n") + "\n\n" + block + "\n"
    runs.atomic_write_text(p, new)  # keeps the file's permission bits (runs.atomic_path)
    return p


__all__ = ["START", "END", "load", "results_section", "compact_section", "bench_goals", "write_into", "copy_plots",
           "bench_command", "ablation_command", "ablation_goals"]
