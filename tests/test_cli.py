"""Tests for the ``hirelc`` command line: help everywhere, train -> lower end to end, one-line user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _command_paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of a (Typer's own click) command tree: (), ("train",), ("baseline", "ort-int8") ..."""
    out = [prefix]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _command_paths(sub, prefix + (name,))
    return out


ALL_COMMANDS = _command_paths(typer.main.get_command(app))


def test_documented_commands_exist():
    for path in [("train",), ("lower",), ("export",), ("verify",), ("inspect",), ("presets",),
                 ("baseline", "ort-int8")]:
        assert path in ALL_COMMANDS


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "hirelc")
def test_help_works_for_every_command(path):
    res = invoke(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.stdout


def test_module_entry_point_help_in_a_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-m", "hirelc", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "lower" in proc.stdout


def test_help_into_a_closed_pipe_is_no_traceback():
    """`hirelc ablate --help | head -1`: the reader goes away before the help is written."""
    proc = subprocess.Popen([sys.executable, "-m", "hirelc", "ablate", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the interpreter has even started: its first write meets a broken pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 1)
    assert "Traceback" not in err and "AttributeError" not in err


def test_an_aborted_prompt_is_caught_by_the_right_exception_type():
    from hirelc.cli import _ABORT

    assert _ABORT is typer.Abort  # the class typer's click raises, whichever typer this is


def test_presets_lists_named_policies():
    res = invoke("presets")
    assert res.exit_code == 0
    names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"int8", "w4", "w4-prune50", "w8-prune30"} <= names


def test_inspect_json_lists_layer_specs():
    res = invoke("inspect", "--model", "test_resnet", "--json")
    assert res.exit_code == 0, res.output
    topo = json.loads(res.stdout)
    assert topo["classifier"] == "fc" and topo["input_shape"] == [1, 1, 32, 32]
    assert {"name", "kind", "prune_group", "prunable"} <= set(topo["layers"][0])


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run directory after `hirelc train` (1 epoch on 200 images) and `hirelc lower --policy w4-prune50`."""
    rd = tmp_path_factory.mktemp("cli") / "run"
    trained = invoke("train", "--data", "fashion-mnist-mini", "--model", "test_resnet", "--epochs", "1",
                     "--max-train", "200", "--run-dir", rd)
    assert trained.exit_code == 0, trained.output
    lowered = invoke("lower", "--run-dir", rd, "--policy", "w4-prune50", "--max-steps", "2")
    assert lowered.exit_code == 0, lowered.output
    return rd, trained, lowered


def test_train_then_lower_end_to_end(cli_run):
    rd, trained, lowered = cli_run
    for name in (runs.BASELINE_CKPT, runs.BASELINE_META, runs.CONFIG, runs.LOWERED_MODEL, runs.LOWER_REPORT):
        assert (rd / name).is_file(), name
    assert not [p.name for p in rd.iterdir() if p.name.endswith(".tmp")]

    assert trained.stdout.startswith("data: embedded Fashion-MNIST subset")
    train_out = json.loads(trained.stdout.split("\n", 1)[1])
    assert {"val_acc", "test_acc", "params", "train_wall_s", "reused"} <= set(train_out)
    assert train_out["reused"] is False

    lower_out = json.loads(lowered.stdout)
    assert {"accuracy", "params_before", "params_after", "effective_ratio", "qat_wall_s"} <= set(lower_out)
    assert lower_out["params_after"] < lower_out["params_before"]

    report = json.loads((rd / runs.LOWER_REPORT).read_text())
    assert {"model", "data", "policy", "lower_config", "accuracy", "effective_ratio", "predicted_effective_ratio",
            "layers", "removed_channels", "qat_steps"} <= set(report)
    assert {"baseline_val", "baseline_test", "lowered_val", "lowered_test", "test_drop"} <= set(report["accuracy"])
    assert report["qat_steps"] == 2
    assert report["model"]["name"] == "test_resnet"
    assert report["data"]["sizes"]["train"] == 200
    assert report["effective_ratio"] > 20
    assert report["policy"]["name"] == "w4-prune50"
    assert not (rd / runs.POLICY).exists()  # lowering with a preset never replaces a searched policy.json


def test_second_identical_train_is_reused(cli_run, copy_run):
    rd = copy_run(cli_run[0])  # reuse must not write, but a regression would: never into the shared run
    mtime = (rd / runs.BASELINE_CKPT).stat().st_mtime_ns
    res = invoke("train", "--data", "fashion-mnist-mini", "--model", "test_resnet", "--epochs", "1",
                 "--max-train", "200", "--run-dir", rd)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.split("\n", 1)[1])["reused"] is True
    assert (rd / runs.BASELINE_CKPT).stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- user errors: exit 2, one line, no traceback


def _assert_user_error(res, match: str) -> None:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hirelc: error: "), res.stderr
    assert match in lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "--model", "no_such_model_xyz", "--data", "fashion-mnist-mini", "--max-train", "50"],
         "unknown model 'no_such_model_xyz'"),
        (["train", "--model", "test_resnet", "--data", "{tmp}/no/such/data"], "dataset path does not exist"),
        (["train", "--model", "test_resnet", "--data", "fashion-mnist-mini", "--checkpoint", "{tmp}/none.pt"],
         "checkpoint not found"),
        (["train", "--model", "test_vit", "--data", "fashion-mnist-mini", "--patch-size", "5"],
         "patch size 5 does not divide the image size 32"),
        (["inspect", "--model", "no_such_model_xyz"], "unknown model"),
        (["export", "--run-dir", "{tmp}/missing"], "run directory not found"),
        (["verify", "--run-dir", "{tmp}/missing"], "run directory not found"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, args, match):
    res = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args], *(["--run-dir", tmp_path / "run"]
                                                                        if args[0] == "train" else []))
    _assert_user_error(res, match)
    assert not (tmp_path / "run").exists()  # nothing was created for a rejected run


def test_lower_on_missing_run_dir(tmp_path):
    _assert_user_error(invoke("lower", "--run-dir", tmp_path / "nope", "--policy", "int8"), "run directory not found")


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "policy, match",
    [
        (lambda d: "w3-prune99", "unknown policy 'w3-prune99'"),
        (lambda d: _write(d / "corrupt.json", "{ not json"), "is not valid JSON"),
        (lambda d: d / "absent.json", "policy file not found"),
        (lambda d: _write(d / "unknown_layer.json", json.dumps(
            {"version": 1, "default": {"bits": 8}, "rules": [{"pattern": "layer9.0.conv1", "bits": 4}]})),
         "policy names unknown layer 'layer9.0.conv1'"),
        (lambda d: _write(d / "not_prunable.json", json.dumps(
            {"version": 1, "rules": [{"pattern": "layer1.0.conv2", "keep_ratio": 0.5}]})),
         "layer 'layer1.0.conv2'"),
        (lambda d: _write(d / "old.json", json.dumps({"version": 0})), "unsupported version 0"),
    ],
    ids=["unknown-preset", "corrupt-json", "missing-file", "unknown-layer", "not-prunable", "wrong-version"],
)
def test_failed_lower_is_one_line_and_keeps_earlier_results(cli_run, tmp_path, policy, match):
    rd, _, _ = cli_run
    before = {n: (rd / n).read_bytes() for n in (runs.LOWER_REPORT, runs.LOWERED_MODEL)}
    res = invoke("lower", "--run-dir", rd, "--policy", policy(tmp_path), "--max-steps", "2")
    _assert_user_error(res, match)
    assert {n: (rd / n).read_bytes() for n in before} == before


def test_lower_with_an_unknown_importance_is_one_line_and_keeps_earlier_results(cli_run):
    rd, _, _ = cli_run
    before = {n: (rd / n).read_bytes() for n in (runs.LOWER_REPORT, runs.LOWERED_MODEL)}
    res = invoke("lower", "--run-dir", rd, "--policy", "w4-prune50", "--importance", "l3", "--max-steps", "2")
    _assert_user_error(res, "'l3' is not one of 'taylor', 'magnitude'")
    assert {n: (rd / n).read_bytes() for n in before} == before


def test_lower_records_the_importance_it_ranked_channels_by(cli_run):
    rd, _, _ = cli_run
    assert json.loads((rd / runs.LOWER_REPORT).read_text())["lower_config"]["importance"] == "taylor"


def test_lower_learning_rate_options_reach_the_fine_tune(cli_run, tmp_path):
    rd, _, _ = cli_run
    copy = tmp_path / "run"
    shutil.copytree(rd, copy)
    res = invoke("lower", "--run-dir", copy, "--policy", "int8", "--max-steps", "1", "--single-lr")
    assert res.exit_code == 0, res.output
    rep = json.loads((copy / runs.LOWER_REPORT).read_text())
    assert rep["lower_config"]["lr_also"] == [] and rep["qat_lr_tried"] is None
    res = invoke("lower", "--run-dir", copy, "--policy", "int8", "--max-steps", "1", "--lr-also", "1e-4")
    assert res.exit_code == 0, res.output
    rep = json.loads((copy / runs.LOWER_REPORT).read_text())
    assert [t["lr"] for t in rep["qat_lr_tried"]] == [rep["lower_config"]["lr"], 1e-4]
    before = (copy / runs.LOWER_REPORT).read_bytes()
    res = invoke("lower", "--run-dir", copy, "--policy", "int8", "--lr-also", "1e-4", "--single-lr")
    _assert_user_error(res, "give --lr-also or --single-lr, not both")
    res = invoke("lower", "--run-dir", copy, "--policy", "int8", "--lr-also", "-1")
    _assert_user_error(res, "--lr-also must be > 0")
    assert (copy / runs.LOWER_REPORT).read_bytes() == before
