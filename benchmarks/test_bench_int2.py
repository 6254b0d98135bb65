"""Can 2-bit weights be stored as INT2 (four codes per byte, ONNX opset 25) and still run on an integer kernel?

One QDQ conv (128 -> 128 channels, 3x3, 16x16, batch 8) with the same 2-bit codes stored three ways: INT8,
INT4 + ``Cast(INT8)`` (what ``hirelc export`` writes for 2..4 bits at opset 21) and INT2 + ``Cast(INT8)`` (what
``hirelc export --opset 25`` writes for 2 bits).
Each must load in the installed ONNX Runtime, fold and fuse into ``QLinearConv`` and give the INT8 graph's
outputs bit for bit; the initializer bytes and the interleaved median latency of each are printed and kept in
the benchmark's extra info. Skipped where the installed onnx has no INT2 type.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hirelc.export.runtime import benchmark_runners
from hirelc.kernels.pack import pack_int

C, HW, BATCH = 128, 16, 8
FORMATS = {"int8": (TensorProto.INT8, 8, 21), "int4": (TensorProto.INT4, 4, 21),
           "int2": (getattr(TensorProto, "INT2", None), 2, 25)}


def _model(codes: np.ndarray, scale: np.ndarray, fmt: str) -> onnx.ModelProto:
    dtype, bits, opset = FORMATS[fmt]
    if fmt == "int8":
        weight = numpy_helper.from_array(codes, "w")
    else:
        raw = pack_int(torch.from_numpy(codes), bits).numpy().tobytes()
        weight = helper.make_tensor("w", dtype, codes.shape, raw, raw=True)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    src = "w"
    if fmt != "int8":
        nodes.append(helper.make_node("Cast", ["w"], ["w8"], to=TensorProto.INT8))
        src = "w8"
    nodes += [helper.make_node("DequantizeLinear", [src, "sw", "zw"], ["wd"], axis=0),
              helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("QuantizeLinear", ["c", "sc", "zc"], ["cq"]),
              helper.make_node("DequantizeLinear", ["cq", "sc", "zc"], ["y"])]
    inits = [weight, numpy_helper.from_array(np.float32(0.03), "sx"), numpy_helper.from_array(np.uint8(128), "zx"),
             numpy_helper.from_array(scale, "sw"), numpy_helper.from_array(np.zeros(C, np.int8), "zw"),
             numpy_helper.from_array(np.float32(0.05), "sc"), numpy_helper.from_array(np.uint8(128), "zc")]
    shape = [BATCH, C, HW, HW]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11 if opset >= 25 else 10
    return model


@pytest.mark.skipif(FORMATS["int2"][0] is None, reason="this onnx has no INT2 tensor type")
def test_int2_weights_fuse_into_integer_convs(benchmark, tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    codes = rng.integers(-2, 2, size=(C, C, 3, 3)).astype(np.int8)  # 2-bit signed codes
    scale = (rng.random(C) * 0.01 + 0.001).astype(np.float32)
    x = rng.standard_normal((BATCH, C, HW, HW)).astype(np.float32)
    sessions, figures = {}, {}
    for fmt in FORMATS:
        model = _model(codes, scale, fmt)
        onnx.checker.check_model(model, full_check=True)
        path, opt = tmp_path / f"{fmt}.onnx", tmp_path / f"{fmt}.opt.onnx"
        onnx.save(model, path)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(opt)
        so.intra_op_num_threads = 1
        sessions[fmt] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opt).graph.node]
        assert "QLinearConv" in ops and "Conv" not in ops, (fmt, ops)
        figures[fmt] = {"weight_bytes": next(len(i.raw_data) for i in model.graph.initializer if i.name == "w"),
                        "opset": FORMATS[fmt][2]}
    ref = sessions["int8"].run(None, {"x": x})[0]
    for s in sessions.values():
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ref)
    runners = {fmt: (lambda batch, s=s: s.run(None, {"x": batch})) for fmt, s in sessions.items()}
    timed = benchmark_runners(runners, (C, HW, HW), batch_sizes=(BATCH,), runs=30)  # interleaved rounds
    for fmt in sessions:
        figures[fmt]["median_ms"] = round(timed[fmt][BATCH]["median_ms"], 3)
        print(f"{fmt}: {figures[fmt]}")
    assert figures["int2"]["weight_bytes"] * 4 == figures["int8"]["weight_bytes"]
    benchmark.extra_info.update(figures)
    benchmark(lambda: sessions["int2"].run(None, {"x": x}))
