"""Graph structure of the exported QDQ model: containers, qparam shapes, axes, block sizes, node counts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_toys import TOY_QUANT, TOY_SHAPE, toy_model
from onnx import TensorProto, numpy_helper

from hirelc.export import export_lowered, make_session, ort_predict
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, PerTensor, Scheme
from hirelc.qmodules import QLinear, quant_layers

pytestmark = pytest.mark.ort

GRANULARITIES = {"per-tensor": PerTensor(), "per-channel": PerChannel(), "per-group:16": PerGroup(16)}
CONTAINER = {(True, True): TensorProto.INT4, (True, False): TensorProto.UINT4,
             (False, True): TensorProto.INT8, (False, False): TensorProto.UINT8}


def _weight_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes reading an initializer (weights), in graph order (= layer execution order)."""
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


@pytest.mark.parametrize("scheme", [Scheme.SYMMETRIC, Scheme.ASYMMETRIC], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", list(GRANULARITIES), ids=list(GRANULARITIES))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_qdq_structure(tmp_path, bits, gran, scheme):
    """The ``plain`` weight format: codes (and zero points) in their narrowest container straight into DQ."""
    model = toy_model(LayerPolicy(bits=bits, scheme=scheme, granularity=GRANULARITIES[gran]))
    summary = export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", weight_format="plain")
    m = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: t for t in m.graph.initializer}
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("DequantizeLinear") == 2 * len(TOY_QUANT)  # one per weight + one per activation
    assert ops.count("QuantizeLinear") == len(TOY_QUANT)  # each quantized layer's calibrated input
    assert summary["dequantize_linear"] == 6 and summary["quantize_linear"] == 3 and summary["opset"] == 21

    narrow, signed = bits <= 4, scheme is Scheme.SYMMETRIC
    dqs = _weight_dqs(m)
    assert len(dqs) == len(TOY_QUANT)
    for name, dq in zip(TOY_QUANT, dqs, strict=True):
        q = quant_layers(model)[name]
        assert summary["layers"][name]["container"] == ("int" if signed else "uint") + ("4" if narrow else "8")
        w, s = inits[dq.input[0]], inits[dq.input[1]]
        zp = inits[dq.input[2]]
        assert w.data_type == zp.data_type == CONTAINER[(narrow, signed)]
        assert s.data_type == TensorProto.FLOAT
        linear = isinstance(q, QLinear)
        codes = q.qweight.numpy().T if linear else q.qweight.numpy()  # linear weights feed MatMul as (I, O)
        assert list(w.dims) == list(codes.shape)
        np.testing.assert_array_equal(numpy_helper.to_array(w).astype(np.int16), codes.astype(np.int16))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        out_ch, in_ch = q.qweight.shape[:2]
        if gran == "per-tensor":
            assert list(s.dims) == [] and attrs.get("block_size", 0) == 0
        elif gran == "per-channel":
            assert list(s.dims) == [out_ch] and attrs["axis"] == (1 if linear else 0)
            assert attrs.get("block_size", 0) == 0
        else:
            assert attrs["block_size"] == 16 and attrs["axis"] == (0 if linear else 1)
            assert list(s.dims) == ([in_ch // 16, out_ch] if linear else [out_ch, in_ch // 16, 3, 3])
        assert list(zp.dims) == list(s.dims)
        if narrow:  # two codes per byte on disk
            assert len(w.raw_data) == (int(np.prod(w.dims)) + 1) // 2
    # the file runs on ORT and computes what PyTorch computes, up to activation rounding ties: a float
    # difference of 1 ulp before a QuantizeLinear can flip a code by one step, which moves a logit by
    # (activation scale x weight scale x code), well under 1 % of the logit range here
    x = torch.randn(32, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    diff = np.abs(ort_predict(make_session(tmp_path / "m.onnx"), x.numpy()) - ref)
    assert diff.max() <= 1e-2 * np.abs(ref).max() and diff.mean() <= 2e-3 * np.abs(ref).max()


def test_float_layer_stays_float_and_activation_dtypes(tmp_path):
    model = toy_model(LayerPolicy(bits=8))
    export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    inits = {t.name: t for t in m.graph.initializer}
    conv0 = next(n for n in m.graph.node if n.op_type == "Conv")  # the float first conv
    assert inits[conv0.input[1]].data_type == TensorProto.FLOAT and list(inits[conv0.input[1]].dims) == [32, 1, 3, 3]
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in q)  # uint8 activations by default


def test_signed_activations_and_shared_zero_points(tmp_path):
    """int8 activations; the exporter de-duplicates the identical scalar zero-points (int8 0) of activations
    and of per-tensor weights of different widths, so narrowing must give each 4-bit layer its own tensor."""
    pt = PerTensor()
    model = toy_model(LayerPolicy(bits=4, granularity=pt), act_signed=True,
                      overrides={"6": LayerPolicy(bits=8, granularity=pt)})
    s = export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", weight_format="plain")
    assert [s["layers"][n]["container"] for n in TOY_QUANT] == ["int4", "int8", "int4"]
    m = onnx.load(tmp_path / "m.onnx")
    inits = {t.name: t for t in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 3 and all(inits[n.input[2]].data_type == TensorProto.INT8 for n in q)
    dqs = _weight_dqs(m)
    assert [inits[n.input[2]].data_type for n in dqs] == [TensorProto.INT4, TensorProto.INT8, TensorProto.INT4]
    x = torch.randn(8, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ort_predict(make_session(tmp_path / "m.onnx"), x.numpy()) - ref).max() <= 1e-2 * np.abs(ref).max()


def test_weight_only_has_no_quantize_linear(tmp_path):
    model = toy_model(LayerPolicy(bits=4, granularity=PerGroup(16)))
    before = [a.scale.clone() for a in model.modules() if hasattr(a, "observing")]
    s = export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", weight_only=True)
    assert s["quantize_linear"] == 0 and s["dequantize_linear"] == 3 and s["weight_only"]
    after = [a.scale for a in model.modules() if hasattr(a, "observing")]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and all(a > 0 for a in after)
    # a model lowered without activation quantization exports the same way
    s2 = export_lowered(toy_model(LayerPolicy(bits=4), act_quant=False), TOY_SHAPE, tmp_path / "m2.onnx")
    assert s2["quantize_linear"] == 0 and s2["dequantize_linear"] == 3


def test_unfrozen_model_is_refused(tmp_path):
    from hirelc.errors import HirelcError
    from hirelc.lower import swap_quantized

    m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    swap_quantized(m, {"0": LayerPolicy(bits=8)})
    with pytest.raises(HirelcError, match="not frozen"):
        export_lowered(m, (1, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
