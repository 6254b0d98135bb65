"""Bad input across the commands: each case exits 2 with one ``hirelc: error:`` line, no traceback, and leaves
the run directory's earlier files byte-for-byte as they were (sha256 before and after)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app

DATA = ["-d", "fashion-mnist-mini", "--max-train", "300"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """The shared finished tiny run (test_resnet, int8 preset) and a folder of crafted inputs."""
    rd = tiny_run
    x = tmp_path_factory.mktemp("bad") / "inputs"
    x.mkdir()
    (x / "not_json.json").write_text("{ not json")
    (x / "nan.json").write_text('{"version": 1, "default": {"bits": NaN}}')
    (x / "bits9.json").write_text(json.dumps({"version": 1, "default": {"bits": 9}}))
    (x / "keep0.json").write_text(json.dumps({"version": 1, "default": {"bits": 8, "keep_ratio": 0.0}}))
    (x / "unknown_layer.json").write_text(json.dumps({"version": 1, "default": {"bits": 8},
                                                      "rules": [{"pattern": "no.such.layer", "bits": 4}]}))
    (x / "corrupt.pt").write_bytes(b"PK\x03\x04 torn")
    sd = torch.load(rd / runs.BASELINE_CKPT, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
               x / "nan_weights.pt")
    torch.save({"conv.weight": torch.zeros(3)}, x / "wrong_arch.pt")
    z = np.zeros((10, 1, 0, 0), np.uint8)
    np.savez(x / "zero_images.npz", x_train=z, y_train=np.arange(10) % 2, x_test=z[:4], y_test=np.arange(4) % 2)
    (x / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    (x / "a_file").write_text("I am a file, not a run directory")
    (x / "bench.json").write_text(json.dumps({"kind": "bench", "rows": "not a list"}))
    (x / "empty_dir").mkdir()
    return rd, x


def _digests(rd: Path) -> dict[str, str]:
    if not rd.exists():
        return {}
    return {str(p.relative_to(rd)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(rd.rglob("*")) if p.is_file() and p.name != runs.LOCK}


R, X, NEW = "{run}", "{inputs}", "{new}"  # placeholders: the finished run, the crafted inputs, a fresh path

CASES = [
    # ---- train
    ("train", ["-m", "no_such_model", *DATA], "unknown model"),
    ("train", ["-m", "test_resnet", "--epochs", "0", *DATA], "--epochs must be >= 1"),
    ("train", ["-m", "test_resnet", "--epochs", "-1", *DATA], "--epochs must be >= 1"),
    ("train", ["-m", "test_resnet", "--batch-size", "0", *DATA], "--batch-size must be >= 1"),
    ("train", ["-m", "test_resnet", "--batch-size", "-5", *DATA], "--batch-size must be >= 1"),
    ("train", ["-m", "test_resnet", "--lr", "nan", *DATA], "--lr must be a finite number"),
    ("train", ["-m", "test_resnet", "--lr", "-1e-3", *DATA], "--lr must be > 0"),
    ("train", ["-m", "test_resnet", "--lr", "inf", *DATA], "--lr must be a finite number"),
    ("train", ["-m", "test_resnet", "--seed", "-1", *DATA], "--seed must be >= 0"),
    ("train", ["-m", "test_resnet", "--img-size", "0", *DATA], "--img-size must be >= 8"),
    ("train", ["-m", "test_resnet", "-d", "fashion-mnist-mini", "--max-train", "0"], "--max-train must be >= 1"),
    ("train", ["-m", "test_resnet", "--checkpoint", f"{X}/missing.pt", *DATA], "checkpoint not found"),
    ("train", ["-m", "test_resnet", "--checkpoint", f"{X}/corrupt.pt", *DATA], "is corrupt"),
    ("train", ["-m", "test_resnet", "--checkpoint", f"{X}/nan_weights.pt", *DATA], "non-finite"),
    ("train", ["-m", "test_resnet", "--checkpoint", f"{X}/wrong_arch.pt", *DATA], "does not fit"),
    ("train", ["-m", "test_resnet", "-d", f"{X}/zero_images.npz"], "C, H, W >= 1"),
    ("train", ["-m", "test_resnet", "-d", f"{X}/torn.npz"], "cannot read .npz"),
    ("train", ["-m", "test_resnet", "-d", f"{X}/nothing_here"], "does not exist"),
    ("train", ["-m", "resnet18", *DATA], "already holds"),
    ("train", ["-m", "test_resnet", "--patch-size", "4", *DATA], "only to Vision Transformers"),
    ("train-in", ["-m", "test_resnet", *DATA], "is a file"),
    # ---- lower
    ("lower", ["-p", "no-such-preset"], "policy"),
    ("lower", ["-p", f"{X}/not_json.json"], "not valid JSON"),
    ("lower", ["-p", f"{X}/nan.json"], "bits must be"),
    ("lower", ["-p", f"{X}/bits9.json"], "bits"),
    ("lower", ["-p", f"{X}/keep0.json"], "keep"),
    ("lower", ["-p", f"{X}/unknown_layer.json"], "unknown layer"),
    ("lower", ["-p", "int8", "--epochs", "-1"], "--epochs must be >= 0"),
    ("lower", ["-p", "int8", "--epochs", "nan"], "--epochs must be a finite number"),
    ("lower", ["-p", "int8", "--max-steps", "-1"], "--max-steps must be >= 0"),
    ("lower", ["-p", "int8", "--percentile", "200"], "--percentile must be <= 100"),
    ("lower", ["-p", "int8", "--percentile", "nan"], "--percentile must be a finite number"),
    ("lower", ["-p", "int8", "--lr", "0"], "--lr must be > 0"),
    ("lower", ["-p", "int8", "--importance", "coin-flip"], "is not one of"),
    ("lower-in", ["-p", "int8"], "run directory not found"),
    ("lower-empty", ["-p", "int8"], "is missing"),
    # ---- export
    ("export", ["--opset", "10"], "opset"),
    ("export", ["--opset", "99"], "opset"),
    ("export-in", [], "run directory not found"),
    ("export-empty", [], "lowered model not found"),
    # ---- baseline
    ("baseline", ["--calib-samples", "0"], "--calib-samples must be >= 1"),
    ("baseline-in", [], "run directory not found"),
    # ---- verify
    ("verify", ["--max-drop", "nan"], "--max-drop must be a finite number"),
    ("verify", ["--min-size-ratio", "nan"], "--min-size-ratio must be a finite number"),
    ("verify", ["--max-latency-ms", "nan"], "--max-latency-ms must be a finite number"),
    ("verify", ["--max-latency-ms", "-3"], "--max-latency-ms must be > 0"),
    ("verify", ["--min-size-ratio", "-1"], "--min-size-ratio must be > 0"),
    ("verify", ["--min-parity", "200"], "percentage"),
    ("verify", ["--min-parity", "nan"], "--min-parity must be a finite number"),
    ("verify", ["--runs", "0"], "runs must be >= 1"),
    ("verify-in", [], "run directory not found"),
    ("verify-empty", [], "run_config.json is missing"),
    # ---- search (all refused before anything is measured)
    ("search", ["--target-ratio", "nan"], "must be a finite number"),
    ("search", ["--max-latency-ms", "nan"], "must be a finite number"),
    ("search", ["--max-size-mb", "nan"], "must be a finite number"),
    ("search", ["--preset", "forever"], "'forever' is not one of 'quick', 'standard', 'thorough'"),
    ("search", ["--opset", "26"], "opset 26 is not supported"),
    ("search", ["--opset", "17"], "need opset 21 or later"),
    ("compress-new", ["--opset", "16"], "opset 16 is not supported"),
    ("compress-new", ["--opset", "19"], "need opset 21 or later"),
    ("compress-new", ["--preset", "forever"], "is not one of"),
    ("export", ["--opset", "many"], "Invalid value for '--opset'"),
    ("nosuch", [], "No such command"),
    ("search-in", [], "run directory not found"),
    ("search-empty", [], "is missing"),
    # ---- compress (a fresh run directory: refused before it is made)
    ("compress-new", ["-m", "no_such_model"], "unknown model"),
    ("compress-new", ["--epochs", "0"], "--epochs must be >= 1"),
    ("compress-new", ["--target-ratio", "nan"], "--target-ratio must be a finite number"),
    ("compress-new", ["--target-ratio", "0.5"], "--target-ratio must be >= 1"),
    ("compress-new", ["--qat-epochs", "-1"], "--qat-epochs must be >= 0"),
    ("compress-new", ["--runs", "0"], "--runs must be >= 1"),
    ("compress-new", ["--seed", "-2"], "--seed must be >= 0"),
    ("compress-new", ["-p", "no-such-preset"], "policy"),
    ("compress-new", ["--max-latency-ms", "nan"], "--max-latency-ms must be a finite number"),
    ("compress-new", ["--img-size", "2"], "--img-size must be >= 8"),
    ("compress", [], "not empty"),
    ("compress-in", [], "is a file"),
    # ---- bench / ablate
    ("bench", ["--runs", "0"], "--runs must be >= 1"),
    ("bench", ["--method", "magic"], "'magic' is not one of"),
    ("bench", ["--target-ratio", "nan"], "--target-ratio must be a finite number"),
    ("bench", ["--qat-epochs", "-1"], "--qat-epochs must be >= 0"),
    ("bench-in", [], "run directory not found"),
    ("ablate", ["--seed", "a"], "Invalid value for '--seed'"),
    ("ablate", ["--seed", "1", "--seed", "1"], "distinct"),
    ("ablate", ["--seed", "-1"], "--seed must be >= 0"),
    ("ablate", ["--variant", "magic"], "'magic' is not one of"),
    ("ablate", ["--target-ratio", "nan"], "--target-ratio must be a finite number"),
    # ---- results / inspect
    ("results", [f"{X}/missing.json"], "no such file"),
    ("results", [f"{X}/bench.json"], "bench"),
    ("results", [f"{X}/empty_dir"], "empty_dir"),
    ("inspect", ["-m", "no_such_model"], "unknown model"),
]


def _argv(kind: str, args: list[str], rd: Path, inputs: Path, new: Path) -> list[str]:
    args = [a.replace(X, str(inputs)) for a in args]
    cmd, _, where = kind.partition("-")
    command = ["baseline", "ort-int8"] if cmd == "baseline" else [cmd]
    if cmd in ("results", "inspect"):
        return [*command, *args]
    target = {"": rd, "in": inputs / ("a_file" if cmd in ("train", "compress") else "no_such_run"),
              "empty": inputs / "empty_dir", "new": new}[where]
    return [*command, "-r", str(target), *args]


@pytest.mark.parametrize("kind,args,needle", CASES, ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run, tmp_path, kind, args, needle):
    rd, inputs = run
    new = tmp_path / "fresh-run"
    argv = _argv(kind, args, rd, inputs, new)
    before, before_inputs = _digests(rd), _digests(inputs)
    res = CliRunner().invoke(app, argv)
    out = res.output
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\n{out}\n{res.exception!r}"
    errors = [ln for ln in out.splitlines() if ln.startswith("hirelc: error:")]
    assert len(errors) == 1, out
    assert needle.lower() in errors[0].lower(), out
    assert "Traceback" not in out
    assert _digests(rd) == before  # no earlier file touched, nothing added
    assert _digests(inputs) == before_inputs
    assert not new.exists()  # a run directory refused at once is not made


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


# ---------------------------------------------------------------- crafted and stale run directories


@pytest.fixture
def copy(run, tmp_path):
    rd = tmp_path / "copy"
    shutil.copytree(run[0], rd)
    return rd


def _invoke_refused(argv: list[str], rd: Path, needle: str) -> None:
    before = _digests(rd)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("hirelc: error:")]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output
    assert _digests(rd) == before


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("cmd", ["export", "verify"])
def test_a_crafted_lowered_file_runs_no_code(copy, tmp_path, cmd):
    marker = tmp_path / "code-ran"
    torch.save({"format": "hirelc-lowered", "version": 2, "state_dict": _Payload(marker)}, copy / runs.LOWERED_MODEL)
    needle = "holds more than tensors" if cmd == "export" else "changed after it was built"
    _invoke_refused([cmd, "-r", str(copy)], copy, needle)
    assert not marker.exists()


def test_verify_refuses_a_model_onnx_not_exported_from_the_current_lowered_model(copy):
    res = CliRunner().invoke(app, ["lower", "-r", str(copy), "-p", "w8-prune30", "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    _invoke_refused(["verify", "-r", str(copy)], copy, "model.onnx was not built from the current lowered.pt")


def test_verify_refuses_a_replaced_artifact(copy):
    (copy / runs.FP32_ONNX).write_bytes((copy / runs.FP32_ONNX).read_bytes() + b"\0")
    _invoke_refused(["verify", "-r", str(copy)], copy, "fp32.onnx was changed after it was built")


def test_verify_refuses_an_ort_int8_of_another_fp32(copy):
    prov = json.loads((copy / runs.PROVENANCE).read_text())
    prov[runs.ORT_INT8_ONNX]["inputs"][runs.FP32_ONNX] = "0" * 64
    (copy / runs.PROVENANCE).write_text(json.dumps(prov))
    _invoke_refused(["verify", "-r", str(copy)], copy, "ort_int8.onnx was not built from the current fp32.onnx")


def test_corrupt_provenance_is_named(copy):
    (copy / runs.PROVENANCE).write_text("{ torn")
    _invoke_refused(["verify", "-r", str(copy)], copy, "provenance")


def test_reports_are_strict_json(run):
    rd = run[0]
    for name in (runs.REPORT_JSON, runs.LOWER_REPORT, runs.PROVENANCE, runs.BASELINE_META):
        json.loads((rd / name).read_text(), parse_constant=lambda c, name=name: pytest.fail(f"{name} holds {c}"))
