"""`hirelc results`: the README section rebuilt from bench / ablation reports, with the goal figures checked."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.studies.results import (
    END,
    START,
    ablation_command,
    bench_command,
    bench_goals,
    compact_section,
    copy_plots,
    load,
    results_section,
    write_into,
)

INFO = {"cpu": "Test CPU", "cores": 2, "system": "Linux", "onnxruntime": "1.0", "torch": "2.0"}


def _goals(report) -> dict:
    return {g: ok for g, ok, _ in bench_goals(report)}


def test_goals_are_judged_from_the_measured_rows(bench_report):
    rep = bench_report()
    g = _goals(rep)
    assert g["≥ 10x effective storage at ≤ 1.0-point ORT top-1 drop"] is True  # 11.5x at -0.8
    assert g["≥ 1.3x faster than ORT int8 on CPU at no worse accuracy"] is False  # 89.2 < 89.8 (speed is there)
    assert g["beats random search at equal real evaluations"] is True
    assert all(ok for name, ok in g.items() if "Pareto" in name)

    worse = copy.deepcopy(rep)
    worse["methods"]["prune-int8"].update(top1=89.5, bytes=3_800_000)  # smaller and more accurate than hirelc
    worse["methods"]["hirelc"]["effective_ratio"] = 9.0
    worse["methods"]["random"]["real_evals"] = 12
    goals = bench_goals(worse)
    g = {name: ok for name, ok, _ in goals}
    assert g["≥ 10x effective storage at ≤ 1.0-point ORT top-1 drop"] is False
    assert g["on or beyond the Pareto front of the uniform baselines (file bytes)"] is False
    assert "dominated by prune-int8" in dict((n, f) for n, _, f in goals)[
        "on or beyond the Pareto front of the uniform baselines (file bytes)"]
    assert g["beats random search at equal real evaluations"] is None  # unequal budgets: no verdict

    faster = copy.deepcopy(rep)
    faster["methods"]["hirelc"]["top1"] = 89.9
    assert _goals(faster)["≥ 1.3x faster than ORT int8 on CPU at no worse accuracy"] is True


def test_section_restates_command_machine_tables_and_verdicts(tmp_path, bench_report, ablation_report):
    b, a = tmp_path / "bench.json", tmp_path / "ablation.json"
    b.write_text(json.dumps(bench_report()))
    a.write_text(json.dumps(ablation_report()))
    text = results_section([b, a], info=INFO)
    assert "hirelc bench -r runs/r18 --target-ratio 8 --max-latency-ms 4.93 --preset quick" in text
    assert "hirelc ablate -r runs/r18_abl --seed 0 --seed 1 --seed 2 --variant full --variant no-surrogate" in text
    assert "Test CPU, 2 cores" in text and "ONNX Runtime 1.0" in text
    assert "| hirelc | 89.20 |" in text and "| full | 86.00 ± 1.00 |" in text
    assert "1.3x faster than ORT int8 on CPU at no worse accuracy: **not met**" in text
    assert text.index("bench: resnet18") < text.index("ablation: resnet18")  # the order given


def test_section_names_the_machine_each_report_recorded(tmp_path, bench_report, ablation_report):
    here = {**INFO, "cpu": "CPU A", "isa": ["avx2", "avx512_vnni"]}
    b, a = tmp_path / "bench.json", tmp_path / "ablation.json"
    b.write_text(json.dumps({**bench_report(), "machine": here}))
    a.write_text(json.dumps({**ablation_report(), "machine": here}))
    text = results_section([b, a])
    assert text.count("Machine: CPU A (avx2, avx512_vnni), 2 cores") == 1  # one machine: said once, at the top
    a.write_text(json.dumps({**ablation_report(), "machine": {**here, "cpu": "CPU B", "isa": []}}))
    text = results_section([b, a])
    assert "Machine: CPU A (avx2, avx512_vnni)" in text and "Machine: CPU B, 2 cores" in text
    assert text.index("bench: resnet18") < text.index("CPU A") < text.index("ablation: resnet18") < text.index(
        "CPU B")  # each under its own heading


def test_machine_record_names_the_cpu_and_its_int8_instruction_sets(monkeypatch, tmp_path):
    from hirelc import machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 avx512_vnni amx_int8\n"
                    "processor\t: 1\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 avx512_vnni amx_int8\n")
    real = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert machine.cpu() == {"model": "Some CPU 9000", "isa": ["avx2", "avx512_vnni", "amx_int8"]}
    d = machine.describe()
    assert d["cpu"] == "Some CPU 9000" and d["cores"] >= 1 and {"system", "onnxruntime", "torch"} <= set(d)


def test_bench_command_restates_the_options_used(bench_report, ablation_report):
    rep = bench_report()
    assert "--fill-budget" not in bench_command(rep)
    rep["config"].update(max_latency_ms=None, fill_budget=True)
    assert "--max-latency-ms" not in bench_command(rep) and "--fill-budget" in bench_command(rep)
    assert "--method " not in bench_command(rep) and "--target " not in bench_command(rep)  # the defaults
    rep["config"].update(methods=["fp32", "ort-int8", "hirelc"], targets=["ort-cpu", "openvino"])
    assert bench_command(rep).endswith("--method fp32 --method ort-int8 --method hirelc "
                                       "--target ort-cpu --target openvino")
    abl = ablation_report()
    assert "--fill-budget" not in ablation_command(abl)
    abl["config"]["fill_budget"] = True
    assert ablation_command(abl).endswith("--qat-epochs 0.1 --fill-budget")
    # runs taken from earlier reports: the command names them, as it was given them
    abl["reused_from"] = ["docs/results/a/ablation.json", "b/ablation.json"]
    assert ablation_command(abl).endswith(" --fill-budget --reuse docs/results/a/ablation.json --reuse b/ablation.json")
    abl["paired"] = {**(abl.get("paired") or {}), "reference": "random"}  # paired with another variant: named
    assert ablation_command(abl).endswith(" --reuse b/ablation.json --reference random")


def test_write_into_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    write_into(readme, "first")
    assert readme.read_text() == f"# title\n\nintro\n\n{START}\nfirst\n{END}\n"
    readme.write_text(readme.read_text() + "\n## after\n")
    write_into(readme, "second\nsection")
    assert readme.read_text() == f"# title\n\nintro\n\n{START}\nsecond\nsection\n{END}\n\n## after\n"


def test_broken_markers_leave_the_file_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{START}\nold\n")
    with pytest.raises(HirelcError, match="markers"):
        write_into(readme, "new")
    assert readme.read_text() == f"x\n{START}\nold\n"


def test_load_tells_reports_apart_and_refuses_others(tmp_path, bench_report):
    (tmp_path / "bench.json").write_text(json.dumps(bench_report()))
    assert load(tmp_path)[0] == "bench"
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(HirelcError, match="not a bench.json or ablation.json"):
        load(tmp_path / "other.json")
    with pytest.raises(HirelcError, match="no such file"):
        load(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HirelcError, match="holds neither"):
        load(tmp_path / "empty")


def test_cli_writes_the_readme_and_bad_input_exits_2(tmp_path, bench_report):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bench.json").write_text(json.dumps(bench_report()))
    readme = tmp_path / "README.md"
    readme.write_text("# r\n")
    res = CliRunner().invoke(app, ["results", str(tmp_path / "b"), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    assert START in readme.read_text() and "| hirelc | 89.20 |" in readme.read_text()
    (tmp_path / "bad.json").write_text("{not json")
    res = CliRunner().invoke(app, ["results", str(tmp_path / "bad.json"), "--readme", str(readme)])
    assert res.exit_code == 2 and "hirelc: error:" in res.output and "Traceback" not in res.output
    assert "| hirelc | 89.20 |" in readme.read_text()  # the earlier section is untouched


def test_plots_are_copied_and_linked_relative_to_the_readme(tmp_path, bench_report):
    run = tmp_path / "runs" / "bench"
    run.mkdir(parents=True)
    (run / "bench.json").write_text(json.dumps(bench_report()))
    (run / "bench_accuracy_vs_bytes.png").write_bytes(b"\x89PNG fake")
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# r\n")
    res = CliRunner().invoke(app, ["results", str(run), "--readme", str(readme),
                                   "--plots", str(tmp_path / "repo" / "docs" / "results")])
    assert res.exit_code == 0, res.output
    kept = tmp_path / "repo" / "docs" / "results" / "resnet18-bench"
    assert (kept / "bench_accuracy_vs_bytes.png").read_bytes() == b"\x89PNG fake"
    assert json.loads((kept / "bench.json").read_text()) == bench_report()  # the report is kept beside them
    text = readme.read_text()
    assert "](docs/results/resnet18-bench/bench_accuracy_vs_bytes.png)" in text
    # rebuilt later from the kept folder alone: same section, nothing copied over itself
    res = CliRunner().invoke(app, ["results", str(kept), "--readme", str(readme),
                                   "--plots", str(tmp_path / "repo" / "docs" / "results")])
    assert res.exit_code == 0, res.output
    assert readme.read_text() == text and sorted(p.name for p in kept.iterdir()) == [
        "bench.json", "bench_accuracy_vs_bytes.png"]


def test_two_reports_of_one_model_and_kind_get_their_own_folders(tmp_path, bench_report):
    paths = []
    for i in range(2):
        run = tmp_path / f"b{i}"
        run.mkdir()
        (run / "bench.json").write_text(json.dumps(bench_report()))
        (run / "bench_accuracy_vs_bytes.png").write_bytes(bytes([i]))
        paths.append(run)
    figs = copy_plots(paths, tmp_path / "kept", tmp_path)
    assert [[str(p) for p in v] for v in figs.values()] == [["kept/resnet18-bench/bench_accuracy_vs_bytes.png"],
                                                           ["kept/resnet18-bench-2/bench_accuracy_vs_bytes.png"]]
    assert (tmp_path / "kept" / "resnet18-bench-2" / "bench_accuracy_vs_bytes.png").read_bytes() == b"\x01"


def _paired(report: dict) -> dict:
    report["paired"] = {"reference": "full", "metric": "final_top1", "tests": {"no-surrogate": {
        "seeds": [0, 1, 2], "n": 3, "diff": 0.4, "wins": 2, "losses": 1, "p_greater": 0.25, "p_two_sided": 0.5}}}
    report["surrogate"] = {"points": 12, "spearman": 0.55}
    return report


def test_compact_section_holds_one_row_per_variant_and_method_and_the_commands(tmp_path, bench_report,
                                                                               ablation_report):
    b, a = tmp_path / "bench.json", tmp_path / "ablation.json"
    b.write_text(json.dumps(bench_report()))
    a.write_text(json.dumps(_paired(ablation_report())))
    text = compact_section([a, b])
    # one line per report: model, baseline, budget, effort, when, surrogate, and the command
    assert ("**resnet18** (fp32 87.41 %), 8x budget, `quick` effort, 2026-11-25 19:00 UTC; surrogate Spearman 0.55 "
            f"on 12 points: `{ablation_command(json.loads(a.read_text()))}`") in text
    assert "| full | 3 | 86.00 ± 1.00 | (reference) | - | - | - |" in text
    assert "| no-surrogate | 3 | 86.00 ± 1.00 | +0.40 | 2 / 1 of 3 | 0.250 | 0.500 |" in text
    assert f"`{bench_command(bench_report())}`" in text
    # the bench rows: top-1, bytes, size against fp32, latencies and batch-8 speed against ORT int8
    assert "| hirelc | 89.20 | 3,900,000 | 10.26x | 1.100 | 4.400 | 2.18x |" in text
    assert "| fp32 | 90.00 | 40,000,000 | 1.00x | 2.000 | 8.000 | 1.20x |" in text
    assert text.index("**resnet18** (fp32") < text.index("| hirelc | 89.20")  # the order given
    assert "Per run:" not in text and "Goal figures" not in text  # the full section's detail stays out
    assert len(text) < len(results_section([a, b], info=INFO))
    # a report that also holds the proxy's Spearman on the same points shows it beside the surrogate's
    with_proxy = _paired(ablation_report())
    with_proxy["surrogate"].update(proxy_points=12, proxy_spearman=0.71)
    a.write_text(json.dumps(with_proxy))
    assert "surrogate Spearman 0.55 on 12 points (the proxy on the same points: 0.71): `" in compact_section([a])


def test_cli_compact_writes_the_readme_and_refuses_plots(tmp_path, ablation_report):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ablation.json").write_text(json.dumps(_paired(ablation_report())))
    readme = tmp_path / "README.md"
    readme.write_text("# r\n")
    res = CliRunner().invoke(app, ["results", str(tmp_path / "a"), "--readme", str(readme), "--compact"])
    assert res.exit_code == 0, res.output
    assert START in readme.read_text() and "| no-surrogate | 3 | 86.00 ± 1.00 | +0.40 |" in readme.read_text()
    before = readme.read_text()
    res = CliRunner().invoke(app, ["results", str(tmp_path / "a"), "--readme", str(readme), "--compact",
                                   "--plots", str(tmp_path / "p")])
    assert res.exit_code == 2 and "--plots goes with the full section" in res.output
    assert readme.read_text() == before and not (tmp_path / "p").exists()
