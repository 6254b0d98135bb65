"""4-bit linear layers on ONNX Runtime: hirelc's folded INT4 QDQ form against ``MatMulNBits``.

One linear layer (K = N = 384, 520 rows: a ViT-tiny-sized projection at batch 8) with the same 4-bit codes, run
as: float ``MatMul`` on the dequantized weights (the reference), hirelc's default form (uint8 activations via
Q/DQ, INT4 codes widened by ``Cast(INT8)`` into ``DequantizeLinear``: ONNX Runtime fuses it into an integer
matmul), and ONNX Runtime's contrib ``MatMulNBits`` (float activations, 4-bit weights in blocks of 32 along K,
``accuracy_level`` 0: float compute, and 4: int8 compute of the activations). Per form: the weight bytes, the
largest error against the reference relative to its scale, and the interleaved median latency, printed and kept
in the benchmark's extra info. Every form must load and keep the error small.
"""

import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hirelc.kernels.pack import pack_int

K, N, ROWS, BLOCK = 384, 384, 520, 32


def _io(graph_nodes, inits, opsets):
    g = helper.make_graph(graph_nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 10
    return m


def _forms(codes: np.ndarray, scale: np.ndarray) -> dict[str, onnx.ModelProto]:
    """codes: (K, N) signed 4-bit, one scale per output column (symmetric)."""
    w = codes.astype(np.float32) * scale[None, :]
    out = {"float": _io([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                        [("", 21)])}
    raw = pack_int(torch.from_numpy(codes), 4).numpy().tobytes()
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("Cast", ["w4"], ["w8"], to=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["w8", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [helper.make_tensor("w4", TensorProto.INT4, codes.shape, raw, raw=True),
             numpy_helper.from_array(np.float32(8.0 / 255), "sx"), numpy_helper.from_array(np.uint8(0), "zx"),
             numpy_helper.from_array(scale, "sw"), numpy_helper.from_array(np.zeros(N, np.int8), "zw")]
    out["qdq-int4-fold"] = _io(nodes, inits, [("", 21)])
    # MatMulNBits: B is (N, K / BLOCK, BLOCK / 2) uint8, codes + 8 (unsigned, default zero point 8), one scale per
    # (column, block); here every block of a column shares the column's scale, so all forms hold the same weights
    u = (codes.T + 8).astype(np.uint8)  # (N, K)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(N, K // BLOCK, BLOCK // 2)
    scales = np.repeat(scale, K // BLOCK).astype(np.float32)
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=BLOCK, accuracy_level=level)
        out[f"matmulnbits-acc{level}"] = _io([node], [numpy_helper.from_array(packed, "b"),
                                                      numpy_helper.from_array(scales, "s")],
                                             [("", 21), ("com.microsoft", 1)])
    return out


def test_matmulnbits_against_the_folded_qdq_form(benchmark):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
    scale = (rng.random(N) * 0.01 + 0.002).astype(np.float32)
    x = (rng.random((ROWS, K)) * 8.0).astype(np.float32)  # within the Q/DQ form's activation range [0, 8]
    sessions, figures = {}, {}
    for name, model in _forms(codes, scale).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        try:
            sessions[name] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # a form this build of ONNX Runtime cannot run is reported, not hidden
            pytest.fail(f"{name}: ONNX Runtime cannot load it ({type(e).__name__}: {str(e)[:200]})")
        weights = [i for i in model.graph.initializer if i.name in ("w", "w4", "b")]
        figures[name] = {"weight_bytes": sum(len(i.raw_data) for i in weights)}
    ref = sessions["float"].run(None, {"x": x})[0]
    for name, s in sessions.items():
        err = float(np.abs(s.run(None, {"x": x})[0] - ref).max() / np.abs(ref).max())
        figures[name]["max_rel_error"] = round(err, 5)
        assert err < 0.02, (name, err)
    times = {name: [] for name in sessions}
    for _ in range(30):  # interleaved
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            times[name].append(time.perf_counter() - t0)
    for name in sessions:
        figures[name]["median_ms"] = round(1e3 * float(np.median(times[name])), 3)
        print(f"{name}: {figures[name]}")
    benchmark.extra_info.update(figures)
    benchmark(lambda: sessions["qdq-int4-fold"].run(None, {"x": x}))
