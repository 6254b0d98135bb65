"""`hirelc verify --against`: the gate relative to an earlier release, session memory, the --json summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.pipeline import CompressConfig, DataOptions, compress

pytestmark = pytest.mark.ort

BASE = CompressConfig(model="test_resnet", data=DataOptions(spec="fashion-mnist-mini", max_train=300),
                      train_epochs=1, policy="int8", qat_epochs=0.05, verify_runs=2)


@pytest.fixture(scope="module")
def releases(tiny_run, tmp_path_factory):
    """Two releases of one baseline: ``int8`` (the old one, the shared tiny run) and ``w4`` (the new one,
    fewer bytes); both copies, as verify rewrites their reports."""
    root = tmp_path_factory.mktemp("rel")
    old, new = root / "old", root / "new"
    shutil.copytree(tiny_run, old)
    shutil.copytree(tiny_run, new)
    compress(CompressConfig(**{**BASE.__dict__, "run_dir": str(new), "policy": "w4", "resume": True}),
             progress=False, echo=lambda s: None)
    return old, new


def _verify(rd: Path, *args: str):
    return CliRunner().invoke(app, ["verify", "-r", str(rd), "--runs", "2", *args])


def test_a_release_no_worse_than_the_last_passes(releases):
    old, new = releases
    res = _verify(new, "--against", str(old / runs.REPORT_JSON), "--max-size-regression", "0", "--json")
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert line["passed"] is True and {"check": "bytes", "verdict": "ok"} in line["against"]
    assert line["target"] == "ort-cpu"  # the target the gate read
    report = json.loads((new / runs.REPORT_JSON).read_text())
    rows = {r["check"]: r for r in report["against"]["rows"]}
    assert rows["bytes"]["new"] < rows["bytes"]["old"] and rows["bytes"]["change"] < 0
    assert "Against the previous release" in (new / runs.REPORT_MD).read_text()


def test_a_regression_is_caught_with_exit_1(releases):
    old, new = releases
    # the int8 artifact is bigger than the w4 one: gated against the w4 release, its size regressed
    res = _verify(old, "--against", str(new), "--max-size-regression", "0")
    assert res.exit_code == 1, res.output
    assert "hirelc: gate failed: gate: bytes regressed" in res.output


def test_top1_regression_bound_follows_the_measured_change(releases):
    old, new = releases
    a = json.loads((old / runs.REPORT_JSON).read_text())["artifacts"]["hirelc"]["top1"]
    b = json.loads((new / runs.REPORT_JSON).read_text())["artifacts"]["hirelc"]["top1"]
    loss = a - b  # points the new release lost against the old one (same test split)
    res = _verify(new, "--against", str(old), "--max-top1-regression", f"{loss + 0.5:.4f}")
    assert res.exit_code == 0, res.output
    res = _verify(new, "--against", str(old), "--max-top1-regression", f"{loss - 0.5:.4f}")
    assert res.exit_code == 1 and "top-1 regressed" in res.output


def test_latency_is_not_compared_across_machines(releases, tmp_path):
    old, new = releases
    rep = json.loads((old / runs.REPORT_JSON).read_text())
    rep["machine"]["cpu"] = "Some Other CPU 9000"
    (tmp_path / "other.json").write_text(json.dumps(rep))
    res = _verify(new, "--against", str(tmp_path / "other.json"), "--max-latency-regression", "-100")
    assert res.exit_code == 0, res.output  # an impossible bound, but nothing comparable to check it on
    rows = json.loads((new / runs.REPORT_JSON).read_text())["against"]["rows"]
    lat = [r for r in rows if r["check"].startswith("latency")]
    assert lat and all(r["verdict"] == "not compared" and "another machine: cpu differs" in r["note"] for r in lat)


def _doctored(old: Path, tmp_path: Path, change) -> Path:
    rep = json.loads((old / runs.REPORT_JSON).read_text())
    change(rep)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(rep))
    return path


@pytest.mark.parametrize("change, needle", [
    (lambda r: r.update(version=99), "report version 99"),
    (lambda r: r["data"].update(fingerprint="0123abcd"), "measured on other data"),
    (lambda r: r["artifacts"].pop("hirelc"), "no measured hirelc artifact"),
    (lambda r: r.clear(), "not a hirelc report.json"),
])
def test_an_incompatible_old_report_is_exit_2_before_measuring(releases, tmp_path, change, needle):
    old, new = releases
    before = (new / runs.REPORT_JSON).read_bytes()
    res = _verify(new, "--against", str(_doctored(old, tmp_path, change)), "--max-top1-regression", "1")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("hirelc: error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output
    assert (new / runs.REPORT_JSON).read_bytes() == before


def test_unreadable_old_report_and_bounds_without_against(releases, tmp_path):
    _, new = releases
    (tmp_path / "torn.json").write_text("{ torn")
    assert "not valid JSON" in _verify(new, "--against", str(tmp_path / "torn.json")).output
    res = _verify(new, "--max-size-regression", "0")
    assert res.exit_code == 2 and "need --against" in res.output


def test_memory_is_reported_and_gated(releases):
    _, new = releases
    rep = json.loads((new / runs.REPORT_JSON).read_text())
    for a in rep["artifacts"].values():
        m = a["memory"]
        assert m["peak_mb"] > 0 and set(m["growth_mb"]) == {"session", "1", "8"}
    res = _verify(new, "--max-memory-mb", "0.001")
    assert res.exit_code == 1 and "session memory" in res.output


def test_session_memory_grows_with_the_model(tmp_path):
    from hirelc.export import export_fp32
    from hirelc.export.runtime import session_memory
    from hirelc.models import build_model, model_config

    peaks = {}
    for name in ("test_resnet", "resnet18"):
        path = tmp_path / f"{name}.onnx"
        export_fp32(build_model(model_config(name, 10, 1, 32)).eval(), (1, 1, 32, 32), path)
        peaks[name] = session_memory(path, (1, 32, 32))["peak_mb"]
    # resnet18 holds ~45 MB of fp32 weights, test_resnet well under 1 MB
    assert peaks["resnet18"] > peaks["test_resnet"] + 20
