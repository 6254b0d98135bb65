"""`hirelc bench` on a tiny model: every method built, measured side by side, reported in JSON, Markdown, plots."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.pipeline import run_bundle
from hirelc.studies.bench import METHODS, BenchConfig, bench, uniform_keep_for_params

# one searched method in the default run (random and flat share its code path, and the engine tests cover
# their search behaviour); the slow test runs all eight
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
FAST_METHODS = ("fp32", "ort-int8", "uniform-w4", "uniform-int8", "prune-int8", "hirelc")


@pytest.fixture(scope="module")
def tiny(tiny_search) -> BenchConfig:
    # one agent per level keeps the searches cheap (the ensemble's search is tested in tests/search)
    # measured on OpenVINO too where it is installed (the dev extra has it), so the per-target report is tested
    return BenchConfig(target_ratio=6.0, qat_epochs=0.0, runs=2, search_overrides={**tiny_search, "ensemble": False},
                       methods=FAST_METHODS, targets=("ort-cpu", "openvino") if HAVE_OPENVINO else ("ort-cpu",))


@pytest.fixture(scope="module")
def benched(tiny_baseline, copy_run_module, tiny):
    rd = copy_run_module(tiny_baseline, "bench")
    lines: list[str] = []
    report = bench(rd, tiny, progress=False, echo=lines.append)
    return rd, report, lines


def test_every_method_is_built_and_measured(benched, tiny_search, onnx_top1):
    rd, report, _ = benched
    rows = report["methods"]
    assert list(rows) == list(FAST_METHODS)
    test = run_bundle(rd).test
    assert report["data"]["test_samples"] == len(test.y)
    for m, r in rows.items():
        assert (rd / "bench" / r["file"]).is_file(), m
        assert r["bytes"] == (rd / "bench" / r["file"]).stat().st_size
        # top-1 is that very file's accuracy on the whole test split
        assert r["top1"] == pytest.approx(onnx_top1(rd / "bench" / r["file"], test.x.numpy(), test.y.numpy()),
                                          abs=1e-9), m
        assert set(r["latency_ms"]) == {"1", "8"}
        assert all(v > 0 for v in r["latency_ms"].values())
    # the exported baseline is the trained PyTorch model: the same test accuracy (ties apart)
    meta = runs.read_json(rd / runs.BASELINE_META)
    assert rows["fp32"]["top1"] == pytest.approx(meta["test_acc"], abs=0.5)
    assert report["machine"]["cpu"] and isinstance(report["machine"]["isa"], list)
    assert rows["fp32"]["size_ratio"] == 1.0 and rows["fp32"]["speedup_vs_fp32"]["1"] == 1.0
    h = rows["hirelc"]  # the searched method: its budget holds in storage and in file bytes
    assert h["real_evals"] == tiny_search["warmup_real_evals"] + tiny_search["real_evals_per_cycle"]
    assert h["effective_ratio"] >= 6.0 and h["size_ratio"] >= 6.0 and h["search_wall_s"] > 0
    assert all(rows[m]["real_evals"] is None for m in FAST_METHODS if m != "hirelc")
    assert rows["ort-int8"]["speedup_vs_ort_int8"]["8"] == 1.0


@pytest.mark.slow
def test_searched_methods_spend_the_same_real_evaluations_and_meet_the_budget(tiny_baseline, copy_run, tiny,
                                                                               tiny_search):
    rd = copy_run(tiny_baseline)
    report = bench(rd, BenchConfig(**{**tiny.__dict__, "methods": METHODS}), progress=False, echo=lambda s: None)
    rows = report["methods"]
    assert list(rows) == list(METHODS)
    n = {rows[m]["real_evals"] for m in ("random", "flat", "hirelc")}
    assert n == {tiny_search["warmup_real_evals"] + tiny_search["real_evals_per_cycle"]}
    for m in ("random", "flat", "hirelc"):
        assert rows[m]["effective_ratio"] >= 6.0 and rows[m]["size_ratio"] >= 6.0, m
        assert rows[m]["search_wall_s"] > 0
        kinds = [json.loads(x)["kind"] for x in (rd / "bench" / m / runs.SEARCH_LOG).read_text().splitlines()]
        assert ("random" in kinds) is (m == "random"), (m, kinds)
    for m in ("fp32", "ort-int8", "uniform-w4", "uniform-int8", "prune-int8"):
        assert rows[m]["real_evals"] is None


def test_uniform_baselines_are_what_they_say(benched):
    rd, report, _ = benched
    rows = report["methods"]
    assert rows["uniform-w4"]["effective_ratio"] > 6 and rows["uniform-int8"]["effective_ratio"] == pytest.approx(
        rows["ort-int8"]["effective_ratio"], rel=0.02)
    low = json.loads((rd / "bench" / "uniform-w4" / runs.LOWER_REPORT).read_text())
    assert low["lower_config"]["act_quant"] is False  # weight-only
    # prune-int8 keeps about as many parameters as hirelc, with one keep ratio everywhere
    hl = json.loads((rd / "bench" / "hirelc" / runs.LOWER_REPORT).read_text())
    pl = json.loads((rd / "bench" / "prune-int8" / runs.LOWER_REPORT).read_text())
    assert 0 < rows["prune-int8"]["keep_ratio"] <= 1
    assert pl["compressible_params_after"] <= hl["compressible_params_after"] * 1.1
    assert {lp["bits"] for lp in pl["layers"].values()} == {8}
    assert len({lp["keep_ratio"] for lp in pl["layers"].values()} - {1.0}) <= 1


def test_outputs_and_refusal_to_overwrite(benched):
    rd, report, lines = benched
    out = rd / "bench"
    assert json.loads((out / "bench.json").read_text())["methods"].keys() == report["methods"].keys()
    md = (out / "bench.md").read_text()
    assert all(f"| {m} |" in md for m in FAST_METHODS)
    assert "pred b8 ms" in md  # latency-aware by default (ORT int8's time): the predicted-latency column is shown
    for png in ("bench_accuracy_vs_bytes.png", "bench_accuracy_vs_latency.png"):
        assert (out / png).stat().st_size > 1000
    assert any("searching" in ln for ln in lines)
    before = (out / "bench.json").read_bytes()
    res = CliRunner().invoke(app, ["bench", "-r", str(rd), "--runs", "1"])
    assert res.exit_code == 2 and "already holds a finished comparison" in res.output
    assert (out / "bench.json").read_bytes() == before


def test_an_interrupted_bench_resumed_with_other_options_is_refused(benched, tiny, copy_run):
    rd = copy_run(benched[0])
    out = rd / "bench"
    (out / "bench.json").unlink()  # interrupted before its summary
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(HirelcError, match="unfinished comparison made with other options \\(qat_epochs 0.0 there, 1.0 now"):
        bench(rd, BenchConfig(**{**tiny.__dict__, "qat_epochs": 1.0}), progress=False, echo=lambda s: None)
    res = CliRunner().invoke(app, ["bench", "-r", str(rd), "--target-ratio", "12"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "target_ratio 6.0 there, 12.0 now" in res.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or rebuilt


def test_uniform_keep_matches_a_parameter_budget(benched):
    from hirelc.cost import policy_storage
    from hirelc.policy import LayerPolicy, Policy
    from hirelc.topology import build_topology
    from hirelc.train import load_baseline

    model, _, _ = load_baseline(benched[0])
    specs = list(build_topology(model, (1, 1, 32, 32)).layers)
    full = policy_storage(specs, Policy(default=LayerPolicy(bits=8)).resolve(specs))["kept_params"]
    k = uniform_keep_for_params(specs, 8, full // 3)
    kept = policy_storage(specs, Policy(default=LayerPolicy(bits=8, keep_ratio=k)).resolve(specs))["kept_params"]
    assert 0.8 * full // 3 <= kept <= full // 3


@pytest.mark.parametrize("kw,match", [
    ({"methods": ("fp32", "tflite")}, "unknown bench method"),
    ({"methods": ("prune-int8",)}, "include the hirelc method"),
    ({"runs": 0}, "--runs must be >= 1"),
    ({"max_latency_ms": 0.0}, "--max-latency-ms must be > 0"),
    ({"target_ratio": float("nan")}, "--target-ratio must be a finite number"),
])
def test_bad_bench_options_are_one_line_errors(kw, match):
    with pytest.raises(HirelcError, match=match):
        BenchConfig(**kw)


# slow: one more full bench; the latency budget's search path is tested in test_pipeline
@pytest.mark.slow
def test_a_latency_budget_reaches_every_searched_method(tiny_baseline, copy_run, tiny):
    rd = copy_run(tiny_baseline)
    cfg = BenchConfig(**{**tiny.__dict__, "methods": ("fp32", "hirelc"), "max_latency_ms": 50.0,
                         "fill_budget": True})
    report = bench(rd, cfg, progress=False, echo=lambda s: None)
    summary = runs.read_json(rd / "bench" / "hirelc" / "search.json", "search summary")
    assert summary["budget"]["max_latency_ms"] == 50.0 and summary["predicted_latency_ms_b8"] <= 50.0
    assert summary["config"]["fill_budget"] is True
    assert report["config"]["max_latency_ms"] == 50.0
    md = (rd / "bench" / "bench.md").read_text()
    assert "and 50.0 ms at batch 8" in md
    # the prediction is kept beside the measurement, in the report and as a table column
    assert report["methods"]["hirelc"]["predicted_latency_ms_b8"] == summary["predicted_latency_ms_b8"]
    assert report["methods"]["fp32"]["predicted_latency_ms_b8"] is None
    assert "| pred b8 ms |" in md and f"| {summary['predicted_latency_ms_b8']:.3f} |" in md
    # the table is measured once, in the run directory, and every searched method predicts from that copy
    table = (rd / "latency_table.json").read_text()
    assert (rd / "bench" / "hirelc" / "latency_table.json").read_text() == table


def test_bench_without_a_baseline_exits_2(tmp_path):
    res = CliRunner().invoke(app, ["bench", "-r", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "hirelc: error:" in res.output and "Traceback" not in res.output


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed (the dev extra has it)")
def test_every_method_is_measured_on_every_target(benched):
    rd, report, lines = benched
    assert report["config"]["targets"] == ["ort-cpu", "openvino"]
    assert any("on openvino" in ln for ln in lines)
    for m, r in report["methods"].items():
        assert list(r["targets"]) == ["ort-cpu", "openvino"]
        cpu, ov = r["targets"]["ort-cpu"], r["targets"]["openvino"]
        assert r["top1"] == cpu["top1"] and r["latency_ms"] == cpu["latency_ms"]  # the first target fills the table
        assert set(ov["latency_ms"]) == {"1", "8"} and ov["latency_ms"]["8"] > 0
        assert cpu["what_ran"]["share"] == 1.0
        ints = ov["what_ran"]["integer_share"]
        # fp32 and the weight-only int4 artifact run in float on OpenVINO; every other artifact on integers
        assert ints == (0.0 if m in ("fp32", "uniform-w4") else 1.0), (m, ov["what_ran"]["by_type"])
    md = (rd / "bench" / "bench.md").read_text()
    assert "## Per target" in md and "| openvino | hirelc |" in md and "conv/matmul integer" in md


def test_bench_on_a_target_this_machine_lacks_exits_2_before_building(tiny_baseline, copy_run):
    from hirelc.export.runtime import available_providers

    if available_providers()["TensorrtExecutionProvider"]:
        pytest.skip("this onnxruntime has TensorRT")
    rd = copy_run(tiny_baseline)
    res = CliRunner().invoke(app, ["bench", "-r", str(rd), "--method", "fp32", "--target", "ort-tensorrt"])
    assert res.exit_code == 2 and res.output.startswith("hirelc: error: target ort-tensorrt:"), res.output
    assert not (rd / "bench" / "fp32.onnx").exists()
