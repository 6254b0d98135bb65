"""End-to-end stages on tiny models: compress (with resume and atomicity), the search stage, latency budgets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.pipeline import CompressConfig, DataOptions, compress, fp32_file_bytes, search_stage
from hirelc.train import load_baseline

TINY_DATA = DataOptions(spec="fashion-mnist-mini", max_train=300)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A finished `compress` run (int8 preset), shared by this module: read it, or copy it before changing it."""
    rd = tmp_path_factory.mktemp("run") / "r"
    cfg = CompressConfig(run_dir=str(rd), model="test_resnet", data=TINY_DATA, train_epochs=1, policy="int8",
                         qat_epochs=0.1, verify_runs=3)
    lines: list[str] = []
    report = compress(cfg, progress=False, echo=lines.append)
    return rd, cfg, report, lines


@pytest.fixture(scope="module")
def searched(compressed, copy_run_module, tiny_search):
    """A copy of the compressed run whose policy.json the tiny search wrote (latency-aware by default), with the
    search's summary."""
    rd = copy_run_module(compressed[0], "searched")
    (rd / runs.POLICY).unlink()
    return rd, search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False)


def test_compress_writes_every_artifact_and_report(compressed):
    rd, _, report, _ = compressed
    for name in (runs.BASELINE_CKPT, runs.POLICY, runs.LOWERED_MODEL, runs.HIRELC_ONNX, runs.FP32_ONNX,
                 runs.ORT_INT8_ONNX, runs.REPORT_JSON, runs.REPORT_MD):
        assert (rd / name).is_file(), name
    assert set(report["artifacts"]) == {"fp32", "ort_int8", "hirelc"}
    assert report["artifacts"]["hirelc"]["bytes"] < report["artifacts"]["fp32"]["bytes"] / 3
    assert not list(rd.glob(".*.tmp"))


def test_compress_refuses_to_overwrite_without_resume(compressed, copy_run):
    rd, cfg = copy_run(compressed[0]), compressed[1]
    before = (rd / runs.REPORT_JSON).read_bytes()
    with pytest.raises(HirelcError, match="not empty"):
        compress(CompressConfig(**{**cfg.__dict__, "run_dir": str(rd)}), progress=False, echo=lambda s: None)
    assert (rd / runs.REPORT_JSON).read_bytes() == before


def test_compress_resume_skips_finished_stages(compressed, copy_run):
    rd, cfg = copy_run(compressed[0]), compressed[1]
    (rd / runs.REPORT_JSON).unlink()  # as if verify had been interrupted
    lines: list[str] = []
    compress(CompressConfig(**{**cfg.__dict__, "run_dir": str(rd), "resume": True}), progress=False,
             echo=lines.append)
    skipped = [ln for ln in lines if "skipped" in ln]
    assert len(skipped) == 6 and "verify" not in " ".join(skipped)
    assert (rd / runs.REPORT_JSON).is_file()


def test_int8_convs_all_fuse_into_integer_kernels(compressed):
    _, _, report, _ = compressed
    ops = report["artifacts"]["hirelc"]["fused_ops"]
    assert ops["QLinearConv"] > 0
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 0  # output quantizers leave no float conv behind


@pytest.mark.parametrize("args,code,needle", [
    (["--max-drop", "100", "--min-size-ratio", "1.5"], 0, None),
    (["--min-size-ratio", "1000"], 1, "size ratio"),
])
def test_verify_gate_exit_codes(compressed, copy_run, args, code, needle):
    rd = copy_run(compressed[0])  # verify rewrites the report
    res = CliRunner().invoke(app, ["verify", "-r", str(rd), "--runs", "2", *args])
    assert res.exit_code == code, res.output
    if needle:
        assert needle in res.output.lower() or needle in (res.stderr or "").lower()


def test_search_stage_tiny_end_to_end(searched, tiny_search):
    rd, s = searched
    lines = (rd / runs.SEARCH_LOG).read_text().splitlines()
    # every real evaluation is logged: the warm-up's, then each cycle's (a cycle whose proposals all miss the
    # latency budget measured on this machine may add none)
    assert len(lines) == s["n_real_evals"] == sum(c["real_evals"] for c in s["cycles"])
    assert s["n_real_evals"] >= tiny_search["warmup_real_evals"]
    assert s["cycles"][0]["cycle"] == 0 and len(s["cycles"]) == 1 + tiny_search["cycles"]
    assert s["effective_ratio"] >= 6.0
    # the ratio also binds the artifact's bytes: the predicted file is at least 6x smaller than fp32's
    assert s["budget"]["max_size_bytes"] <= s["predicted_fp32_bytes"] / 6.0
    # and it is counted against the real fp32.onnx (BatchNorm folded), which can be smaller than predicted
    assert s["budget"]["max_size_bytes"] <= (rd / runs.FP32_ONNX).stat().st_size / 6.0
    assert s["predicted_bytes"] <= s["budget"]["max_size_bytes"] and s["predicted_file_ratio"] >= 6.0
    policy = json.loads((rd / runs.POLICY).read_text())
    assert policy["version"] == 1 and policy["rules"]
    for png in ("policy_heatmap.png", "search_progress.png", "search_pareto.png"):
        assert (rd / png).stat().st_size > 1000
    # latency-aware by default: the budget is ONNX Runtime's own int8 of the model, timed in this run directory
    ref = json.loads((rd / "latency_reference.json").read_text())
    assert s["latency_budget_source"] == "ort-int8" and ref["source"] == "ort-int8"
    assert s["latency_reference"]["b8_ms"] == ref["b8_ms"] > 0 and ref["b1_ms"] > 0
    limit = ref["b8_ms"] if s["latency_reference"]["relaxed_to_ms"] is None else s["latency_reference"]["relaxed_to_ms"]
    assert s["budget"]["max_latency_ms"] == pytest.approx(limit)
    assert s["predicted_latency_ms_b8"] <= s["budget"]["max_latency_ms"] * (1 + 1e-9)
    assert s["formats"] and s["formats"][0] == "w8"  # the latency table picked the offered formats
    # per cycle: what was screened, by what, and how many went to a real evaluation
    assert [c["cycle"] for c in s["cycles"]] == list(range(len(s["cycles"])))
    assert sum(c["real_evals"] for c in s["cycles"]) == s["n_real_evals"]
    # the quick preset's warm-up really evaluates the proxy's pick of a pool of random feasible policies
    warm = s["cycles"][0]
    assert s["config"]["warmup_pool"] == 64 and "proxy" in warm["screened_by"]
    assert warm["candidates"] > tiny_search["warmup_real_evals"] and warm["proxy_drop"] is not None


def test_fp32_file_bytes_are_the_exported_files_and_kept(compressed, copy_run):
    rd = copy_run(compressed[0])
    (rd / runs.FP32_BYTES).unlink(missing_ok=True)
    model, mcfg, _ = load_baseline(rd)
    n = fp32_file_bytes(rd, model, mcfg)
    assert n == (rd / runs.FP32_ONNX).stat().st_size
    assert json.loads((rd / runs.FP32_BYTES).read_text())["bytes"] == n
    runs.atomic_write_json(rd / runs.FP32_BYTES, {"bytes": 1, "baseline": "another checkpoint"})
    assert fp32_file_bytes(rd, model, mcfg) == n  # a record of another baseline is measured again


def test_search_writes_its_pareto_front(searched):
    rd, s = searched
    front = json.loads((rd / runs.FRONT).read_text())
    log = [json.loads(x) for x in (rd / runs.SEARCH_LOG).read_text().splitlines()]
    entries = front["entries"]
    assert front["real_evals"] == len(log) and [e["eval"] for e in entries] == s["front"] and entries
    for e in entries:  # each entry is its evaluation's logged figures, within the budget, on no one's shadow
        h = log[e["eval"] - 1]
        assert h["meets_budget"] and e["real_acc"] == h["real_acc"] and e["policy"] == h["policy"]
        assert e["bytes"] == h["predicted_bytes"] and e["latency_ms"]["8"] == h["predicted_latency_ms"]
        assert e["latency_ms"]["1"] > 0 and e["file_ratio"] >= 6.0
        better = [g for g in log if g["meets_budget"] and g["real_acc"] > h["real_acc"]
                  and g["predicted_bytes"] < h["predicted_bytes"] and g["predicted_latency_ms"] < h["predicted_latency_ms"]]
        assert not better
    (winner,) = [e for e in entries if e["winner"]]
    assert winner["real_acc"] == s["best_acc"]
    assert (rd / "front.png").stat().st_size > 1000
    assert json.loads((rd / "latency_table_b1.json").read_text())["batch"] == 1


def test_lower_pick_lowers_the_named_front_entry(searched, copy_run):
    rd = copy_run(searched[0])
    front = json.loads((rd / runs.FRONT).read_text())["entries"]
    smallest = min(front, key=lambda e: (e["bytes"], -e["real_acc"], e["eval"]))
    res = CliRunner().invoke(app, ["lower", "-r", str(rd), "--pick", "smallest", "--epochs", "0"])
    assert res.exit_code == 0, res.output
    assert f"front-eval{smallest['eval']}" in res.output
    from hirelc.lower import load_lowered

    lowered = load_lowered(rd / runs.LOWERED_MODEL)
    assert lowered["layers"] == smallest["policy"]


@pytest.mark.parametrize("args,needle", [
    (["--pick", "999"], "real evaluation 999 is not on the front"),
    (["--pick", "best"], "--pick 'best'"),
    (["--pick", "1", "--policy", "int8"], "not both"),
])
def test_a_bad_pick_is_a_one_line_error_and_nothing_is_lowered(searched, copy_run, args, needle):
    rd = copy_run(searched[0])
    before = {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file() and p.name != runs.LOCK}
    res = CliRunner().invoke(app, ["lower", "-r", str(rd), *args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file() and p.name != runs.LOCK} == before


@pytest.mark.parametrize("change", ["policy", "front"])
def test_a_front_from_another_search_is_refused(searched, copy_run, change):
    """--pick reads front.json only while it belongs to the search that wrote policy.json (and is unchanged)."""
    rd = copy_run(searched[0])
    if change == "policy":  # another policy in the run directory, as a rerun with other options would leave
        from hirelc.policy import get_policy

        get_policy("int8").save(rd / runs.POLICY)
    else:
        front = json.loads((rd / runs.FRONT).read_text())
        front["entries"][0]["real_acc"] = 99.9
        (rd / runs.FRONT).write_text(json.dumps(front))
    res = CliRunner().invoke(app, ["lower", "-r", str(rd), "--pick", "accurate"])
    assert res.exit_code == 2 and "is not the current search's front" in res.output, res.output


def test_compress_lowers_the_picked_entry_and_reruns_lower_when_the_pick_changes(searched, copy_run):
    """compress's lower stage takes the front entry --pick names: lowered with it, the stage is current for that pick
    and stale for another; --pick with --policy, or a pick of nothing, is refused before anything runs."""
    from hirelc.lower import LowerConfig
    from hirelc.pipeline import lower_stage, pick_policy, stage_stale

    rd = copy_run(searched[0])
    cfg = CompressConfig(run_dir=str(rd), model="test_resnet", data=TINY_DATA, train_epochs=1, qat_epochs=0.0,
                         pick="smallest", resume=True)
    assert "options" in stage_stale(rd, "lower", cfg)  # lowered.pt holds the int8 preset of the first run
    lower_stage(rd, pick_policy(rd, "smallest"), LowerConfig(epochs=0.0, seed=0), progress=False)
    assert stage_stale(rd, "lower", cfg) is None
    front = json.loads((rd / runs.FRONT).read_text())["entries"]
    smallest = min(front, key=lambda e: (e["bytes"], -e["real_acc"], e["eval"]))
    assert stage_stale(rd, "lower", CompressConfig(**{**cfg.__dict__, "pick": str(smallest["eval"])})) is None
    other = next((e for e in front if e["eval"] != smallest["eval"]), None)
    if other is not None:  # another entry of the front: lower must run again
        assert stage_stale(rd, "lower", CompressConfig(**{**cfg.__dict__, "pick": str(other["eval"])})) is not None
    # a stopped search that wrote policy.json but no front: --pick says how to finish it
    (rd / runs.FRONT).unlink()
    with pytest.raises(HirelcError, match="with --resume after a stopped one"):
        stage_stale(rd, "lower", cfg)
    with pytest.raises(HirelcError, match="without --policy"):
        compress(CompressConfig(**{**cfg.__dict__, "policy": "int8"}), progress=False, echo=lambda s: None)
    with pytest.raises(HirelcError, match="--pick"):
        CompressConfig(pick="0")


# slow: the ablation tests search without the latency budget in the default run
@pytest.mark.slow
def test_search_stage_without_latency_budget(searched, tmp_path, tiny_search):
    from hirelc.pipeline import share_latency

    rd, sub = searched[0], tmp_path / "no-latency"
    runs.link_baseline(rd, sub)
    share_latency(rd, sub)  # the table is reused; the ORT int8 reference is not consulted
    (sub / "latency_reference.json").unlink(missing_ok=True)
    s = search_stage(sub, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False)
    assert s["budget"]["max_latency_ms"] is None and s["latency_budget_source"] is None
    assert s["latency_reference"] is None and not (sub / "latency_reference.json").exists()


@pytest.mark.parametrize("content", ['{"layer": {}, "block": {}}', '[1, 2]', '{"layer": {"x": NaN}, "block": {}}'])
def test_a_malformed_sensitivity_file_is_named_and_the_search_log_kept(searched, copy_run, content):
    rd = copy_run(searched[0])
    log = (rd / runs.SEARCH_LOG).read_bytes()
    (rd / runs.SENSITIVITY).write_text(content)
    res = CliRunner().invoke(app, ["search", "-r", str(rd), "--target-ratio", "6"])
    assert res.exit_code == 2, res.output
    assert "sensitivity" in res.output and "corrupt" in res.output and "Traceback" not in res.output
    assert (rd / runs.SEARCH_LOG).read_bytes() == log


def test_impossible_budget_fails_before_any_evaluation(searched, copy_run, tiny_search):
    rd = copy_run(searched[0])
    log_before = (rd / runs.SEARCH_LOG).read_bytes()
    with pytest.raises(HirelcError, match="impossible"):
        search_stage(rd, target_ratio=500.0, overrides=tiny_search, progress=False)
    assert (rd / runs.SEARCH_LOG).read_bytes() == log_before


@pytest.mark.parametrize("cmd,args,needle", [
    ("verify", ["--max-drop", "nan"], "--max-drop must be a finite number"),
    ("verify", ["--min-size-ratio", "nan"], "--min-size-ratio must be a finite number"),
    ("verify", ["--max-latency-ms", "inf"], "--max-latency-ms must be a finite number"),
    ("search", ["--max-latency-ms", "nan"], "max latency ms must be a finite number"),
    ("search", ["--target-ratio", "nan"], "target ratio must be a finite number"),
    ("search", ["--max-size-mb", "nan"], "max size must be a finite number"),
])
def test_non_finite_bounds_are_refused_and_nothing_is_touched(compressed, copy_run, cmd, args, needle):
    rd = copy_run(compressed[0])
    before = {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file() and p.name != runs.LOCK}
    res = CliRunner().invoke(app, [cmd, "-r", str(rd), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file() and p.name != runs.LOCK} == before


def test_latency_table_times_every_format_and_predicts_its_anchors(compressed, tmp_path, monkeypatch):
    from hirelc.latency import ANCHOR_KEEP, TABLE_VERSION, measure_latency_table, predict_latency
    from hirelc.policy import PRESETS
    from hirelc.search.space import uniform_policy
    from hirelc.topology import build_topology
    from hirelc.train import load_baseline

    model, mcfg, _ = load_baseline(compressed[0])
    topo = build_topology(model, (1, 1, 32, 32))
    table = measure_latency_table(model, topo, batch=8, runs_=5, progress=False)
    assert table["version"] == TABLE_VERSION and set(table["layers"]) == set(topo.names)
    for s in topo.layers:  # every format the search can pick ran on ONNX Runtime
        row = table["layers"][s.name]
        times = {k: v for k, v in row.items() if not k.startswith("keep_")}
        assert {"fp32", "w8", "w8-asym", "w4", "w4-asym"} <= set(times) and min(times.values()) > 0
        sides = (["keep_out"] if s.prunable and not s.grouped_tied else []) + (
            ["keep_in"] if s.input_group >= 0 and s.kind != "dwconv" and not s.grouped_tied else [])
        for side in sides:  # copies of the layer with that side's channels cut were timed too
            curve = row.get(side)
            assert curve and curve[-1] == [1.0, 1.0] and len(curve) >= 2, (s.name, side)
            xs = [x for x, _ in curve]
            assert xs == sorted(xs) and 0 < xs[0] < 1 and all(y > 0 for _, y in curve), curve
        assert set(k for k in row if k.startswith("keep_")) == set(sides), s.name
        assert ("w4-group" in row) == (s.in_features % 32 == 0 and s.kind != "dwconv"), s.name
        assert not any(k.startswith("w8") and k.endswith("-group") for k in row)  # masked: ORT cannot run it

    def predict(layers):
        return predict_latency(table, topo, layers)

    # the whole-model anchors are predicted exactly: the rest of the network is calibrated on them
    assert predict(PRESETS["fp32"].resolve(list(topo.layers))) == pytest.approx(table["fp32_model_ms"])
    assert predict(uniform_policy(list(topo.layers), 8, 1.0)) == pytest.approx(table["int8_model_ms"])
    assert predict(uniform_policy(list(topo.layers), 8, ANCHOR_KEEP)) == pytest.approx(table["pruned_int8_model_ms"])
    assert 0 < predict(PRESETS["w4-group32"].resolve(list(topo.layers)))

    # off the anchors the prediction follows the table: with one layer left in fp32 (nothing pruned) that layer's
    # fp32 time replaces its int8 time, and the rest of the network moves from the int8 towards the fp32 anchor by
    # the layer's share of the fp32 layer time
    from hirelc.policy import LayerPolicy

    specs = list(topo.layers)
    int8 = uniform_policy(specs, 8, 1.0)
    fp32_ms = {s.name: table["layers"][s.name]["fp32"] for s in specs}
    for name in dict.fromkeys([specs[0].name, max(fp32_ms, key=fp32_ms.get)]):
        row, share = table["layers"][name], fp32_ms[name] / sum(fp32_ms.values())
        expected = (table["int8_model_ms"] - row["w8"] + row["fp32"]
                    + share * (table["rest_ms"] - table["int8_rest_ms"]))
        assert predict({**int8, name: LayerPolicy(bits=None)}) == pytest.approx(expected, rel=1e-9), name
    # and a policy between the pruning anchors, lowered and timed the real way, runs about as fast as predicted,
    # relative to the int8 anchor timed beside it (a ratio of times taken together holds on a busy CPU, where
    # sub-millisecond medians taken minutes apart can differ several-fold; loosely, within 3x)
    from hirelc.latency import time_lowered

    mid = uniform_policy(specs, 8, (1.0 + ANCHOR_KEEP) / 2)
    measured = time_lowered(model, topo, mid, batch=8, runs_=20, path=tmp_path / "mid.onnx")
    measured_int8 = time_lowered(model, topo, int8, batch=8, runs_=20, path=tmp_path / "int8.onnx")
    ratio = (predict(mid) / predict(int8)) / (measured / measured_int8)
    assert 1 / 3 < ratio < 3, (predict(mid), predict(int8), measured, measured_int8)

    # lowering in a run directory with this table records the prediction; verify sets it beside the measurement
    from hirelc.export.verify import _latency_prediction
    from hirelc.latency import LATENCY_TABLE
    from hirelc.pipeline import load_or_measure, stored_prediction

    rd = tmp_path / "with_table"
    rd.mkdir()
    assert stored_prediction(rd, topo, uniform_policy(list(topo.layers), 8, 1.0)) is None
    runs.atomic_write_json(rd / LATENCY_TABLE, table)
    stored = stored_prediction(rd, topo, uniform_policy(list(topo.layers), 8, 1.0))
    assert stored == {"batch": 8, "ms": pytest.approx(table["int8_model_ms"])}
    lp = _latency_prediction({"predicted_latency": stored}, lambda k, b: 2 * stored["ms"] if b == 8 else None)
    assert lp["measured_over_predicted"] == pytest.approx(2.0) and lp["batch"] == 8
    assert _latency_prediction({}, lambda k, b: 1.0) is None

    # a table measured on another machine predicts nothing here, and the run directory measures its own
    import hirelc.latency as L

    assert table["machine"] == L.machine_key()
    runs.atomic_write_json(rd / LATENCY_TABLE, {**table, "machine": {**table["machine"], "cpu": "another CPU"}})
    assert stored_prediction(rd, topo, uniform_policy(list(topo.layers), 8, 1.0)) is None
    calls = []
    monkeypatch.setattr(L, "measure_latency_table", lambda *a, **k: calls.append(1) or table)
    assert load_or_measure(rd, model, topo, batch=8, progress=False) == table and calls == [1]
    assert runs.read_json(rd / LATENCY_TABLE, "t")["machine"] == L.machine_key()
    assert load_or_measure(rd, model, topo, batch=8, progress=False) == table and calls == [1]  # reused


def test_latency_formats():
    from hirelc.latency import variant
    from hirelc.policy import LayerPolicy, PerGroup, PerTensor, Scheme

    assert variant(LayerPolicy(bits=None)) == "fp32"
    assert variant(LayerPolicy(bits=6, granularity=PerTensor())) == "w8"
    assert variant(LayerPolicy(bits=5, scheme=Scheme.ASYMMETRIC)) == "w8-asym"
    assert variant(LayerPolicy(bits=3, scheme=Scheme.ASYMMETRIC, granularity=PerGroup(32))) == "w4-asym-group"


def test_predicted_onnx_bytes_match_the_exported_file(compressed):
    from hirelc.evaluate import Predictors
    from hirelc.policy import PRESETS
    from hirelc.topology import build_topology
    from hirelc.train import load_baseline

    rd = compressed[0]
    model, _, _ = load_baseline(rd)
    topo = build_topology(model, (1, 1, 32, 32))
    pred = Predictors(model, topo)
    for preset, artifact in (("int8", runs.HIRELC_ONNX), ("fp32", runs.FP32_ONNX)):
        predicted = pred.predict_bytes(PRESETS[preset].resolve(list(topo.layers)))
        actual = (rd / artifact).stat().st_size
        assert abs(predicted - actual) / actual < 0.05, (preset, predicted, actual)


def test_a_pruned_layer_is_predicted_from_its_keep_curves():
    from hirelc.latency import time_fraction

    row = {"w8": 2.0, "keep_out": [[0.25, 0.5], [0.5, 0.7], [1.0, 1.0]], "keep_in": [[0.5, 0.6], [1.0, 1.0]]}
    assert time_fraction(row, 1.0, 1.0) == 1.0
    assert time_fraction(row, 0.5) == pytest.approx(0.7)  # measured: not the 0.5 the MACs would say
    assert time_fraction(row, 0.75) == pytest.approx(0.85)  # interpolated between measured points
    assert time_fraction(row, 0.125) == pytest.approx(0.25)  # below the curve: proportional to its first point
    assert time_fraction(row, 0.5, 0.5) == pytest.approx(0.7 * 0.6)  # both sides cut: the product
    assert time_fraction({"w8": 2.0}, 0.3, 0.5) == pytest.approx(0.15)  # no curves: the MAC fraction


@pytest.mark.parametrize("argv,overrides", [
    ([], None),
    (["--screening", "proxy"], {"screening": "proxy"}),
    (["--screening", "proxy", "--fill-budget"], {"fill_budget": True, "screening": "proxy"}),
    (["--screening", "surrogate"], None),  # the default adds nothing, so earlier runs still match their record
    (["--surrogate-prior", "proxy"], {"surrogate_prior": "proxy"}),
    (["--surrogate-prior", "proxy", "--screening", "proxy"], {"screening": "proxy", "surrogate_prior": "proxy"}),
    (["--surrogate-prior", "none"], None),
    (["--warmup-pool", "64"], {"warmup_pool": 64}),
    (["--warmup-pool", "0", "--screening", "proxy"], {"screening": "proxy", "warmup_pool": 0}),
])
def test_search_cli_passes_screening_to_the_search(monkeypatch, tmp_path, argv, overrides):
    import hirelc.pipeline

    seen = {}

    def fake_search_stage(run_dir, **kw):
        seen.update(kw)
        raise HirelcError("stopped after the options were read")

    monkeypatch.setattr(hirelc.pipeline, "search_stage", fake_search_stage)
    res = CliRunner().invoke(app, ["search", "-r", str(tmp_path), *argv])
    assert res.exit_code == 2 and "stopped after the options were read" in res.output
    assert seen["overrides"] == overrides


@pytest.mark.parametrize("options,overrides", [
    ({"screening": "proxy"}, {"screening": "proxy"}), ({"screening": "surrogate"}, None),
    ({"surrogate_prior": "proxy"}, {"surrogate_prior": "proxy"}), ({"warmup_pool": 32}, {"warmup_pool": 32}),
])
def test_compress_passes_screening_to_its_search(compressed, copy_run, monkeypatch, options, overrides):
    """compress --screening / --surrogate-prior / --warmup-pool reach the search stage (the default adds no
    override, so a run directory searched before the option existed stays current)."""
    import hirelc.pipeline

    seen = {}

    def fake_search_stage(run_dir, **kw):
        seen.update(kw)
        raise HirelcError("stopped after the options were read")

    rd = copy_run(compressed[0])
    cfg = CompressConfig(**{**compressed[1].__dict__, "run_dir": str(rd), "policy": None, "resume": True,
                            **options})
    monkeypatch.setattr(hirelc.pipeline, "search_stage", fake_search_stage)
    with pytest.raises(HirelcError, match="stopped after the options were read"):
        compress(cfg, progress=False, echo=lambda s: None)
    assert seen["overrides"] == overrides  # the trained baseline was current: the search came next
    with pytest.raises(HirelcError, match="unknown screening 'oracle'"):
        CompressConfig(screening="oracle")
    with pytest.raises(HirelcError, match="unknown surrogate prior 'oracle'"):
        CompressConfig(surrogate_prior="oracle")
    with pytest.raises(HirelcError, match="--warmup-pool must be >= 0, got -1"):
        CompressConfig(warmup_pool=-1)


def test_search_cli_refuses_an_unknown_screening(tmp_path):
    res = CliRunner().invoke(app, ["search", "-r", str(tmp_path), "--screening", "oracle"])
    assert res.exit_code == 2 and "oracle" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())
