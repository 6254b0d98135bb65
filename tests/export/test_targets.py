"""Deploy targets: option checks, errors for targets this machine cannot run, OpenVINO's per-layer precision,
ONNX Runtime's kernel placement, the static TensorRT check, and the per-target report of verify and bench."""

from __future__ import annotations

import builtins
import hashlib
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.export import VerifyConfig, export_lowered, format_table, verify_run
from hirelc.export.runtime import available_providers
from hirelc.export.targets import check_target, open_target, ort_placement, tensorrt_check
from hirelc.export.verify import compare_with
from hirelc.options import BenchConfig
from hirelc.pipeline import lowered_reference

pytestmark = pytest.mark.ort
QUICK = VerifyConfig(runs=2, warmup=1, parity_samples=200, memory=False)
HAVE = available_providers()
needs_openvino = pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed (the dev extra has it)")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_target_options_are_checked():
    assert VerifyConfig().targets == ("ort-cpu",) and VerifyConfig().gated_target == "ort-cpu"
    assert VerifyConfig(targets=("openvino", "ort-cpu")).gated_target == "openvino"
    with pytest.raises(HirelcError, match="unknown target.*ort-gpu"):
        VerifyConfig(targets=("ort-gpu",))
    with pytest.raises(HirelcError, match="given twice"):
        VerifyConfig(targets=("ort-cpu", "ort-cpu"))
    with pytest.raises(HirelcError, match="--gate-target openvino is not among the targets"):
        VerifyConfig(gate_target="openvino")
    with pytest.raises(HirelcError, match="bench: unknown target"):
        BenchConfig(targets=("tpu",))
    with pytest.raises(HirelcError, match="unknown target"):
        check_target("tpu")


@pytest.mark.skipif(HAVE["CUDAExecutionProvider"] and HAVE["TensorrtExecutionProvider"],
                    reason="this onnxruntime has the GPU providers")
@pytest.mark.parametrize("target", ["ort-cuda", "ort-tensorrt"])
def test_gpu_target_without_the_provider_is_exit_2_and_writes_nothing(tiny_run, copy_run, target):
    rd = copy_run(tiny_run)
    before = _sha(rd / runs.REPORT_JSON)
    res = CliRunner().invoke(app, ["verify", "-r", str(rd), "--target", "ort-cpu", "--target", target])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hirelc: error: target " + target), res.output
    assert "ExecutionProvider is unavailable" in lines[0] and "onnxruntime-gpu" in lines[0]
    assert _sha(rd / runs.REPORT_JSON) == before  # the earlier report is untouched
    assert not (rd / "trt_cache").exists()


def test_unknown_target_on_the_command_line_is_exit_2(tiny_run):
    res = CliRunner().invoke(app, ["verify", "-r", str(tiny_run), "--target", "tpu"])
    assert res.exit_code == 2 and "hirelc: error:" in res.output and "tpu" in res.output


def test_openvino_missing_names_the_extra(monkeypatch):
    real = builtins.__import__

    def no_openvino(name, *a, **k):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(HirelcError, match=r'openvino package is not installed \(pip install -e "\.\[openvino\]"\)'):
        check_target("openvino")


def test_ort_cpu_runs_every_kernel_on_the_cpu_provider(run_dir):
    p = ort_placement(run_dir / runs.HIRELC_ONNX, "cpu", [1, 1, 32, 32])
    assert p["provider"] == "CPUExecutionProvider" and p["kernels"] > 10
    assert p["share"] == 1.0 and p["on_provider"] == p["kernels"] and p["off_provider_ops"] == {}


@needs_openvino
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("preset", ["int8", "w4"])
def test_openvino_runs_every_conv_and_matmul_on_integers(lower, bundle, tmp_path, name, preset):
    low = lower(name, preset)
    path = tmp_path / "model.onnx"
    export_lowered(low.model, (1, 1, 32, 32), path)
    ov = open_target("openvino", path, threads=1)
    what = ov.what_ran()
    assert what["compute_layers"] >= len(low.layers) - 1  # every quantized conv/linear shows up as a layer
    assert what["integer_share"] == 1.0, [la for la in what["layers"] if la["precision"] not in ("u8", "i8")]
    assert set(what["by_type"]) <= {"Convolution", "FullyConnected", "MatMul", "GroupConvolution"}
    # the same model as on ONNX Runtime: logits close relative to their scale, top-1 mostly equal
    x = bundle.test.x[:200].numpy()
    a, b = ov.predict(x), open_target("ort-cpu", path, threads=1).predict(x)
    assert a.shape == b.shape == (200, 10)
    assert np.abs(a - b).mean() < 0.05 * np.abs(b).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.85


@needs_openvino
def test_openvino_reports_float_layers_of_the_fp32_model(run_dir):
    what = open_target("openvino", run_dir / runs.FP32_ONNX, threads=1).what_ran()
    assert what["compute_layers"] > 0 and what["integer_layers"] == 0 and what["integer_share"] == 0.0


@needs_openvino
def test_openvino_cannot_load_a_corrupt_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(HirelcError, match="OpenVINO cannot load"):
        open_target("openvino", bad)
    with pytest.raises(HirelcError, match="ONNX model not found"):
        open_target("openvino", tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def two_targets(run_dir, bundle, tmp_path_factory):
    """verify_run on ort-cpu and openvino, the gate on each in turn: {gate target: (run dir, report)}."""
    pytest.importorskip("openvino")
    out = {}
    for gate in ("ort-cpu", "openvino"):
        rd = tmp_path_factory.mktemp(f"verify-{gate}") / "run"
        shutil.copytree(run_dir, rd)
        cfg = VerifyConfig(runs=2, warmup=1, parity_samples=200, memory=False, targets=("ort-cpu", "openvino"),
                           gate_target=gate)
        out[gate] = (rd, verify_run(rd, bundle, cfg, reference=lowered_reference(rd)))
    return out


def test_verify_reports_every_target_and_gates_on_one(two_targets):
    for gate, (rd, rep) in two_targets.items():
        assert rep["gate_target"] == gate and list(rep["targets"]) == ["ort-cpu", "openvino"]
        assert rep["gate"]["bounds"]["gate_target"] == gate
        for t, m in rep["targets"].items():
            assert set(m["artifacts"]) == {"fp32", "ort_int8", "hirelc"}
            assert m["runtime"].startswith("onnxruntime" if t == "ort-cpu" else "openvino")
            assert m["parity"]["status"] == "ok" and m["parity"]["top1_agreement"] >= 90.0
            for a in m["artifacts"].values():
                assert set(a["latency"]) == {"1", "8"} and a["latency"]["1"]["median_ms"] > 0
        # the top-level figures are the gate target's
        g = rep["targets"][gate]
        for k, a in rep["artifacts"].items():
            assert a["top1"] == g["artifacts"][k]["top1"] and a["latency"] == g["artifacts"][k]["latency"]
        assert rep["parity"] == g["parity"] and rep["speedup"] == g["speedup"]
        assert rep["targets"]["openvino"]["artifacts"]["hirelc"]["what_ran"]["integer_share"] == 1.0
        assert rep["targets"]["ort-cpu"]["artifacts"]["hirelc"]["what_ran"]["share"] == 1.0
        md = (rd / runs.REPORT_MD).read_text()
        assert "## Targets" in md and f"The table above and the gate use {gate}" in md
        assert "conv/matmul integer" in md and "kernels on CPUExecutionProvider" in md
        assert f"per target (the gate reads {gate})" in format_table(rep)


def test_latency_is_not_compared_across_gate_targets(two_targets):
    old = dict(two_targets["ort-cpu"][1], _path="old/report.json")
    new = two_targets["openvino"][1]
    rows = {r["check"]: r for r in compare_with(old, new, VerifyConfig(targets=("ort-cpu", "openvino"),
                                                                       gate_target="openvino"))["rows"]}
    assert rows["latency b1"]["verdict"] == "not compared"
    assert "another target (ort-cpu then, openvino now)" in rows["latency b1"]["note"]
    assert rows["top-1"]["verdict"] == "-"  # top-1 and bytes are still compared


# ---------------------------------------------------------------- the static TensorRT check


def test_tensorrt_check_passes_signed_int8_activations(lower, tmp_path):
    path = tmp_path / "m.onnx"
    export_lowered(lower("test_resnet", "w4", act_signed=True).model, (1, 1, 32, 32), path)
    res = tensorrt_check(path)
    assert res["ok"], res["problems"]
    assert res["int32_biases"] > 0  # ORT's own bias quantization, counted apart


def test_tensorrt_check_names_uint8_activations(run_dir):
    res = tensorrt_check(run_dir / runs.HIRELC_ONNX)  # the default export: uint8 activations (ORT CPU's fast path)
    assert not res["ok"] and any("QuantizeLinear with UINT8 codes" in p for p in res["problems"])
    assert tensorrt_check(run_dir / runs.FP32_ONNX)["ok"]


def test_tensorrt_check_names_each_construct_tensorrt_rejects(tmp_path):
    """A hand-made graph with a non-zero int8 zero point, a Cast to INT8 on a graph input and a contrib op."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    c = helper.make_tensor_value_info("c", TensorProto.INT8, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"]),
             helper.make_node("Gelu", ["d"], ["y"], domain="com.microsoft"),
             helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT8)]
    graph = helper.make_graph(nodes, "g", [x], [y, c], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    problems = " | ".join(tensorrt_check(path)["problems"])
    assert "QuantizeLinear with a non-zero zero point" in problems
    assert "DequantizeLinear with a non-zero zero point" in problems
    assert "Cast to INT8 left in the graph" in problems
    assert "Gelu (domain com.microsoft) is not a standard ONNX op" in problems


# ---------------------------------------------------------------- GPU targets (skipped without a device)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE["CUDAExecutionProvider"], reason="no CUDAExecutionProvider in this onnxruntime")
def test_verify_on_cuda(run_dir, bundle, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    rep = verify_run(rd, bundle, VerifyConfig(**{**QUICK.__dict__, "targets": ("ort-cpu", "ort-cuda")}),
                     reference=lowered_reference(rd))
    what = rep["targets"]["ort-cuda"]["artifacts"]["fp32"]["what_ran"]
    assert what["provider"] == "CUDAExecutionProvider" and what["on_provider"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE["TensorrtExecutionProvider"], reason="no TensorrtExecutionProvider in this onnxruntime")
def test_verify_on_tensorrt_builds_int8_engines_and_caches_them(lower, bundle, run_dir, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    export_lowered(lower("test_resnet", "w4", act_signed=True).model, (1, 1, 32, 32), rd / runs.HIRELC_ONNX)
    cfg = VerifyConfig(runs=2, warmup=1, parity_samples=200, memory=False, targets=("ort-tensorrt",),
                       min_parity=None)
    rep = verify_run(rd, bundle, cfg)
    what = rep["targets"]["ort-tensorrt"]["artifacts"]["hirelc"]["what_ran"]
    assert what["tensorrt_check"]["ok"] and what["int8_engine"], what
    assert what["cached_engines"] and (rd / "trt_cache").is_dir()


def test_ort_int8_with_int8_activations_is_what_tensorrt_takes(run_dir, bundle, tmp_path):
    from hirelc.export import ort_int8_baseline

    out = tmp_path / "ort_int8.onnx"
    info = ort_int8_baseline(run_dir / runs.FP32_ONNX, out, bundle.train.x[:32].numpy(), act_int8=True)
    assert info["act_int8"] and tensorrt_check(out)["ok"], tensorrt_check(out)["problems"]
    assert not tensorrt_check(run_dir / runs.ORT_INT8_ONNX)["ok"]  # the default: uint8 activations
