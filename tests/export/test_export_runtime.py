"""ORT's own int8 baseline, sessions and providers, fused-op counts, interleaved benchmark."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.export import (
    available_providers,
    benchmark_interleaved,
    fused_op_counts,
    make_session,
    ort_accuracy,
    ort_predict,
    unfused_layers,
)

pytestmark = pytest.mark.ort


def test_ort_int8_baseline_is_loadable_and_quantized(run_dir, bundle):
    path = run_dir / runs.ORT_INT8_ONNX
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ format
    fused = fused_op_counts(path)
    assert fused["QLinearConv"] > 0 and fused["Conv"] == 0
    sess = make_session(path)
    assert ort_predict(sess, bundle.test.x[:5].numpy()).shape == (5, 10)
    assert path.stat().st_size < 0.5 * (run_dir / runs.FP32_ONNX).stat().st_size
    assert not list(run_dir.glob(".*.tmp"))


def test_ort_int8_baseline_bad_input(tmp_path):
    from hirelc.export import ort_int8_baseline

    with pytest.raises(HirelcError, match="not found"):
        ort_int8_baseline(tmp_path / "none.onnx", tmp_path / "o.onnx", np.zeros((2, 1, 8, 8), np.float32))


def test_providers_are_reported_and_never_faked():
    prov = available_providers()
    assert prov["CPUExecutionProvider"] is True
    assert set(prov) == {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
    if not prov["CUDAExecutionProvider"]:
        with pytest.raises(HirelcError, match="unavailable"):
            make_session(b"", provider="cuda")
    with pytest.raises(HirelcError, match="unknown provider"):
        make_session(b"", provider="tpu")


def test_sessions_do_not_spin_unless_asked(run_dir):
    # Idle spinning threads of one session slow the next one down when artifacts are timed side by side.
    key = "session.intra_op.allow_spinning"
    assert make_session(run_dir / runs.FP32_ONNX).get_session_options().get_session_config_entry(key) == "0"
    assert make_session(run_dir / runs.FP32_ONNX, spin=True).get_session_options().get_session_config_entry(key) == "1"


def test_accuracy_of_hirelc_model_is_its_top1(run_dir, bundle, lower):
    sess = make_session(run_dir / runs.HIRELC_ONNX, threads=1)
    x, y = bundle.test.x[:100].numpy(), bundle.test.y[:100].numpy()
    acc = ort_accuracy(sess, x, y)
    logits = ort_predict(sess, x)
    assert acc == pytest.approx(100.0 * np.count_nonzero(logits.argmax(1) == y) / 100, abs=1e-9)
    # the lowered PyTorch model it was exported from scores the same within a sample or two
    import torch

    with torch.no_grad():
        ref = lower("test_resnet", "int8").model.eval()(torch.from_numpy(x)).numpy()
    assert abs(acc - 100.0 * np.count_nonzero(ref.argmax(1) == y) / 100) <= 2.0
    assert ort_accuracy(sess, x[:0], y[:0]) == 0.0  # no samples: nothing to score


def _convs(path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)


def test_fused_op_counts_count_what_ort_runs(run_dir):
    n_conv = _convs(run_dir / runs.FP32_ONNX)
    assert n_conv > 0 and _convs(run_dir / runs.HIRELC_ONNX) == n_conv  # the exported graph keeps every conv
    fp32 = fused_op_counts(run_dir / runs.FP32_ONNX)
    assert fp32["Conv"] + fp32["FusedConv"] == n_conv  # ORT may fuse Conv + ReLU, still float
    assert fp32["QLinearConv"] == fp32["QuantizeLinear"] == fp32["DequantizeLinear"] == 0
    hirelc = fused_op_counts(run_dir / runs.HIRELC_ONNX)
    assert hirelc["QLinearConv"] == n_conv  # every conv's output is re-quantized: each one fuses
    assert hirelc["MatMulIntegerToFloat"] == fp32["Gemm"] == 1  # the classifier: integer weights, float output
    assert sum(hirelc[op] for op in ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul")) == 0
    assert hirelc["QuantizeLinear"] > 0  # the float input still enters through a QuantizeLinear
    # at ORT's basic level no QDQ group fuses: the counts are of the graph ORT runs, not of the file
    plain = fused_op_counts(run_dir / runs.HIRELC_ONNX, level="basic")
    assert plain["QLinearConv"] == 0 and plain["Conv"] == n_conv and plain["DequantizeLinear"] > 0


def test_unfused_layers_are_the_convs_feeding_residual_adds(lower):
    names = unfused_layers(lower("test_resnet", "int8", fuse_outputs=False).model, (1, 1, 32, 32))
    assert "layer1.0.conv2" in names  # its output goes to the residual Add, not to a QuantizeLinear
    assert "layer1.0.conv1" not in names  # conv -> ReLU -> next conv's QuantizeLinear: QLinearConv
    assert unfused_layers(lower("test_resnet", "int8").model, (1, 1, 32, 32)) == []  # output quantizers fix it


def test_residual_adds_run_in_integer_when_block_inputs_are_quantized(lower):
    from hirelc.export import integer_adds

    shape = (1, 1, 32, 32)
    with_adds = lower("test_resnet", "int8")
    without = lower("test_resnet", "int8", fuse_adds=False)
    assert integer_adds(without.model, shape) == 0
    assert with_adds.info["input_quantized_blocks"] > 0
    assert integer_adds(with_adds.model, shape) == 4  # layer1.0 .. layer4.0: every residual add
    assert unfused_layers(with_adds.model, shape) == []  # the convs still fuse
    names = {n for n, _ in with_adds.model.named_modules()}
    assert "layer1.0.hirelc_in_act" in names and "layer1.0.conv1" in names  # layer names unchanged


def test_block_quantizers_are_undone_where_ort_fuses_no_add(lower):
    low = lower("test_vit", "int8")  # the attention/MLP outputs stay float: quantized inputs would buy nothing
    assert low.info["input_quantized_blocks"] == 0
    assert not [n for n, _ in low.model.named_modules() if n.endswith(("hirelc_in_act", "hirelc_out_act"))]
    assert not any(m._forward_pre_hooks for m in low.model.modules())


def test_benchmark_interleaved_reports_every_model_and_batch(run_dir):
    paths = {k: run_dir / f for k, f in (("fp32", runs.FP32_ONNX), ("hirelc", runs.HIRELC_ONNX))}
    res = benchmark_interleaved(paths, (1, 32, 32), batch_sizes=(1, 2), runs=3, warmup=1)
    assert set(res) == {"fp32", "hirelc"}
    for per_batch in res.values():
        assert set(per_batch) == {1, 2}
        for r in per_batch.values():
            assert r["runs"] == 3 and 0 < r["median_ms"] <= r["p90_ms"] * 1.0001
            assert r["mean_ms"] > 0
    with pytest.raises(HirelcError):
        benchmark_interleaved({}, (1, 32, 32))
