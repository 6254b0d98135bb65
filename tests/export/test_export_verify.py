"""verify_run on a hand-made run directory, the release gate, bad inputs and interrupted exports."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.export import VerifyConfig, check_gate, export_fp32, export_lowered, format_table, verify_run
from hirelc.pipeline import lowered_reference

pytestmark = pytest.mark.ort

QUICK = VerifyConfig(runs=3, warmup=1, parity_samples=200)
KEYS = {"version", "created", "run_dir", "data", "machine", "providers", "artifacts", "parity", "accuracy_drop",
        "size_ratio", "effective_storage_ratio", "effective_bits_per_param", "speedup", "latency_prediction",
        "verify_config", "against", "gate", "gate_target", "targets"}


@pytest.fixture(scope="module")
def verified(run_dir, bundle, tmp_path_factory):
    """(a copy of the shared run directory, its report): verify writes report.json and report.md into it."""
    rd = tmp_path_factory.mktemp("verified") / "run"
    shutil.copytree(run_dir, rd)
    return rd, verify_run(rd, bundle, QUICK, reference=lowered_reference(rd))


@pytest.fixture(scope="module")
def report(verified):
    return verified[1]


def test_report_has_documented_keys_and_files(verified, report, bundle, onnx_top1):
    run_dir = verified[0]
    on_disk = json.loads((run_dir / runs.REPORT_JSON).read_text())
    assert set(on_disk) == KEYS == set(report)
    assert set(report["artifacts"]) == {"fp32", "ort_int8", "hirelc"}
    assert report["machine"]["cpu"] and isinstance(report["machine"]["isa"], list)
    for a in report["artifacts"].values():
        assert {"file", "bytes", "size_ratio", "top1", "fused_ops", "latency"} <= set(a)
        assert set(a["latency"]) == {"1", "8"} and a["latency"]["1"]["runs"] == 3
    assert report["artifacts"]["fp32"]["size_ratio"] == pytest.approx(1.0)
    assert report["size_ratio"] > 3  # int8 weights: about a quarter of the fp32 bytes
    assert report["providers"]["CPUExecutionProvider"] == "used"
    assert report["providers"]["TensorrtExecutionProvider"] in ("unavailable", "available, not used")
    assert report["effective_storage_ratio"] > 3
    assert report["latency_prediction"] is None  # no latency table in this run directory
    p = report["parity"]
    assert p["status"] == "ok" and p["samples"] == 200 and p["top1_agreement"] >= 99.0
    assert p["max_abs_diff"] <= 0.05 * p["logit_scale"]
    # parity's ONNX top-1 is model.onnx's on the same 200 test images the report names
    sub = bundle.subset("test", 200)
    assert p["onnx_top1"] == pytest.approx(onnx_top1(run_dir / runs.HIRELC_ONNX, sub.x.numpy(), sub.y.numpy()),
                                           abs=1e-9)
    assert set(report["speedup"]["fp32_over_hirelc"]) == {"1", "8"}
    md = (run_dir / runs.REPORT_MD).read_text()
    assert "| hirelc |" in md and "| ort-int8 |" in md and "| fp32 |" in md
    table = format_table(report)
    assert len(table.splitlines()) < 25 and "hirelc" in table


def test_gate_passes_loose_and_fails_tight(report):
    loose = VerifyConfig(max_drop=100.0, min_size_ratio=1.0, max_latency_ms=1e5)
    assert check_gate(report, loose) == []
    tight = VerifyConfig(max_drop=-200.0, min_size_ratio=1e3, max_latency_ms=1e-6, latency_batch=8)
    reasons = check_gate(report, tight)
    assert len(reasons) == 3 and all("\n" not in r for r in reasons)
    assert "drop" in reasons[0] and "size ratio" in reasons[1] and "batch-8" in reasons[2]
    with pytest.raises(HirelcError, match="latency batch 64 is not among"):  # a bound on a batch never timed
        VerifyConfig(max_latency_ms=1.0, latency_batch=64)
    assert report["gate"]["passed"] is True  # QUICK has no bounds


def _negated_logits(src, dst) -> None:
    """``src`` with its output negated: the same weights, every prediction turned into its least likely class."""
    m = onnx.load(src)
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [o if o != out else "logits_before_neg" for o in node.output]
    m.graph.node.append(onnx.helper.make_node("Neg", ["logits_before_neg"], [out], name="perturb_neg"))
    onnx.save(m, dst)


def test_a_model_onnx_that_is_not_the_lowered_model_fails_parity(tmp_path, run_dir, bundle, report):
    rd = tmp_path / "run"
    rd.mkdir()
    shutil.copy(run_dir / runs.LOWERED_MODEL, rd / runs.LOWERED_MODEL)
    _negated_logits(run_dir / runs.HIRELC_ONNX, rd / runs.HIRELC_ONNX)
    rep = verify_run(rd, bundle, VerifyConfig(runs=1, warmup=0, batch_sizes=(1,), parity_samples=200, memory=False),
                     reference=lowered_reference(rd))
    p, ok = rep["parity"], report["parity"]
    assert p["status"] == "ok" and p["samples"] == 200
    assert p["top1_agreement"] < 50.0 <= ok["top1_agreement"]
    assert p["max_abs_diff"] > 0.5 * p["logit_scale"]
    assert p["pytorch_top1"] == ok["pytorch_top1"]  # the reference side is the same lowered model
    assert "agrees with lowered.pt on" in " ".join(check_gate(rep, VerifyConfig()))


def test_parity_skipped_without_lowered_model(tmp_path, run_dir, bundle):
    rd = tmp_path / "run"
    rd.mkdir()
    shutil.copy(run_dir / runs.HIRELC_ONNX, rd / runs.HIRELC_ONNX)
    rep = verify_run(rd, bundle, VerifyConfig(runs=1, warmup=0, batch_sizes=(1,)))
    assert rep["parity"]["status"] == "skipped" and "lowered.pt" in rep["parity"]["note"]
    assert rep["accuracy_drop"] is None and rep["size_ratio"] is None
    assert "fp32.onnx missing" in check_gate(rep, VerifyConfig(max_drop=1.0))[0]


def test_missing_run_dir_and_no_artifacts(tmp_path, bundle):
    with pytest.raises(HirelcError, match="run directory not found"):
        verify_run(tmp_path / "nope", bundle, QUICK)
    with pytest.raises(HirelcError, match="no ONNX artifacts"):
        verify_run(tmp_path, bundle, QUICK)


def test_corrupt_onnx_is_named(tmp_path, run_dir, bundle):
    shutil.copy(run_dir / runs.FP32_ONNX, tmp_path / runs.FP32_ONNX)
    (tmp_path / runs.HIRELC_ONNX).write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(HirelcError, match=r"model\.onnx"):
        verify_run(tmp_path, bundle, QUICK)
    assert not (tmp_path / runs.REPORT_JSON).exists()


def test_wrong_input_shape_is_a_user_error(tmp_path, run_dir, bundle):
    from hirelc.data import load_data

    shutil.copy(run_dir / runs.FP32_ONNX, tmp_path / runs.FP32_ONNX)
    other = load_data("fashion-mnist-mini", img_size=28, max_train=50)
    with pytest.raises(HirelcError, match="expects inputs of shape"):
        verify_run(tmp_path, other, QUICK)


def test_interrupted_export_leaves_no_file(tmp_path, lower, monkeypatch):
    low = lower("test_resnet", "int8")
    target = tmp_path / "model.onnx"

    def half_save(model, path, *a, **k):
        with open(path, "wb") as f:
            f.write(model.SerializeToString()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", half_save)
    with pytest.raises(KeyboardInterrupt):
        export_lowered(low.model, (1, 1, 32, 32), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_checker_failure_is_an_error_and_writes_nothing(tmp_path, lower, monkeypatch):
    def bad(*a, **k):
        raise onnx.checker.ValidationError("broken graph")

    monkeypatch.setattr(onnx.checker, "check_model", bad)
    with pytest.raises(HirelcError, match="invalid ONNX graph"):
        export_fp32(lower("test_resnet", "int8").built.model, (1, 1, 32, 32), tmp_path / "fp32.onnx")
    assert list(tmp_path.iterdir()) == []


def test_parity_is_gated_by_default(report):
    import copy

    assert VerifyConfig().min_parity == 98.0 and check_gate(report, VerifyConfig()) == []
    low = copy.deepcopy(report)
    low["parity"]["top1_agreement"] = 50.0
    assert "agrees with lowered.pt on 50.00%" in check_gate(low, VerifyConfig())[0]
    assert check_gate(low, VerifyConfig(min_parity=None)) == []
    skipped = copy.deepcopy(report)
    skipped["parity"] = {"status": "skipped", "note": "lowered.pt missing", "top1_agreement": None}
    assert "parity of model.onnx with lowered.pt unknown" in check_gate(skipped, VerifyConfig())[0]
