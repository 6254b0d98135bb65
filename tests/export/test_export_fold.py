"""The ``fold`` weight format: every per-tensor / per-channel format runs on ONNX Runtime's integer kernels.

Each quantized layer's codes stay packed in the file (INT4/UINT4 for 2..4 bits) and are widened to int8 by
nodes that read constants only, which ORT folds at session creation before it fuses QDQ groups.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from export_toys import FAST, TOY_QUANT, TOY_SHAPE, toy_model
from onnx import TensorProto

from hirelc.export import ORT_PROBE, export_lowered, fused_op_counts, make_session, ort_predict, unfused_layers
from hirelc.export.runtime import optimized_graph
from hirelc.lower import lower_model
from hirelc.policy import LayerPolicy, PerChannel, PerTensor, Scheme

pytestmark = pytest.mark.ort

BITS = (2, 3, 4, 5, 6, 8)
FORMATS = [LayerPolicy(bits=b, scheme=s, granularity=g)
           for b, s, g in itertools.product(BITS, Scheme, (PerTensor(), PerChannel()))]  # 24 formats
SHAPE = (1, 1, 32, 32)


def _mixed(names: list[str], shift: int) -> dict[str, LayerPolicy]:
    """Every layer a different format, round robin from ``shift``: two shifts put each format on several layers."""
    return {n: FORMATS[(i + shift) % len(FORMATS)] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def mixed(built, bundle):
    """``mixed(model, shift)`` -> (layers, lowered model), every format present across the two shifts."""
    cache = {}

    def get(name: str, shift: int):
        if (name, shift) not in cache:
            b = built(name)
            layers = _mixed(list(b.topo.names), shift)
            cache[name, shift] = layers, lower_model(b.model, b.topo, layers, bundle, FAST, progress=False, probe=ORT_PROBE)[0]
        return cache[name, shift]

    return get


def test_the_mixed_policies_cover_every_format(built):
    for name in ("test_resnet", "test_vit"):
        names = list(built(name).topo.names)
        seen = {(lp.bits, lp.scheme, lp.granularity) for shift in (0, 12) for lp in _mixed(names, shift).values()}
        assert len(seen) == len(FORMATS), name


@pytest.mark.parametrize("shift", [0, 12])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_every_quantized_layer_runs_on_an_integer_kernel(tmp_path, mixed, name, shift):
    layers, low = mixed(name, shift)
    assert unfused_layers(low, SHAPE) == []
    fold = export_lowered(low, SHAPE, tmp_path / "fold.onnx")
    ops = dict(fused_op_counts(tmp_path / "fold.onnx"))
    convs = sum(1 for n in layers if isinstance(low.get_submodule(n), torch.nn.Module)
                and type(low.get_submodule(n)).__name__ == "QConv2d")
    assert ops["QLinearConv"] == convs  # every conv (stem and patch embedding included) is an integer conv
    assert ops["Conv"] + ops["FusedConv"] + ops["Gemm"] == 0
    # what is left as float MatMul in a ViT is attention (q @ k, attn @ v): activations only, no weight
    assert ops["MatMul"] == (2 * len([n for n in layers if n.endswith("attn.qkv")]) if name == "test_vit" else 0)
    # nothing of the widening is left at run time: ORT folded every Cast / Sub on the codes
    left = [n for n in optimized_graph(tmp_path / "fold.onnx").node
            if any(".qweight." in i or ".zero_point." in i for i in n.input) and n.op_type in ("Cast", "Sub")]
    assert left == []
    # the same numbers as the plain form (INT4/UINT4 straight into DequantizeLinear, dequantized in float)
    plain = export_lowered(low, SHAPE, tmp_path / "plain.onnx", weight_format="plain")
    x = torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(4)).numpy()
    a = ort_predict(make_session(tmp_path / "fold.onnx"), x)
    b = ort_predict(make_session(tmp_path / "plain.onnx"), x)
    with torch.no_grad():
        ref = low(torch.from_numpy(x)).numpy()
    scale = np.abs(ref).max()
    # integer and float kernels round differently before each output quantizer: a code may move one step
    assert np.abs(a - b).max() <= 0.05 * scale and np.abs(a - b).mean() <= 5e-3 * scale
    # PyTorch computes the same graph: the logits differ by a few steps of the head's output quantizer at most
    assert np.abs(a - ref).max() <= 0.1 * scale
    # and the file keeps the packed size: the widening costs a few nodes, not a byte per code
    assert fold["bytes"] <= plain["bytes"] * 1.03
    assert fold["weight_format"] == "fold" and plain["weight_format"] == "plain"


def test_plain_form_leaves_4_bit_layers_to_float_kernels(tmp_path, mixed):
    """The contrast: ORT's CPU EP has no int4 conv, so the plain form runs those convs in float."""
    layers, low = mixed("test_resnet", 0)
    assert any(lp.bits <= 4 for lp in layers.values())
    assert unfused_layers(low, SHAPE, weight_format="plain")
    export_lowered(low, SHAPE, tmp_path / "plain.onnx", weight_format="plain")
    ops = fused_op_counts(tmp_path / "plain.onnx")
    assert ops["Conv"] + ops["FusedConv"] > 0


@pytest.mark.parametrize("bits,scheme,form", [
    (2, Scheme.SYMMETRIC, "int4-cast"), (4, Scheme.SYMMETRIC, "int4-cast"), (3, Scheme.ASYMMETRIC, "int4-cast"),
    (4, Scheme.ASYMMETRIC, "uint4-sub"), (6, Scheme.SYMMETRIC, "int8"), (6, Scheme.ASYMMETRIC, "int8"),
    (8, Scheme.SYMMETRIC, "int8"),
])
def test_fold_forms_and_zero_points(tmp_path, bits, scheme, form):
    """Which form each width and scheme takes; weight DequantizeLinear nodes always see int8 with zero point 0."""
    model = toy_model(LayerPolicy(bits=bits, scheme=scheme, granularity=PerChannel()))
    s = export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx")
    assert [s["layers"][n]["container"] for n in TOY_QUANT] == [form] * len(TOY_QUANT)
    m = onnx.load(tmp_path / "m.onnx")
    inits = {t.name: t for t in m.graph.initializer}
    produced = {o: n for n in m.graph.node for o in n.output}
    weight_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
                  and ".act." not in n.input[1] and "act" not in n.input[1].rsplit(".", 2)[-2]]
    assert len(weight_dqs) == len(TOY_QUANT)
    for dq in weight_dqs:
        zp = onnx.numpy_helper.to_array(inits[dq.input[2]])
        assert inits[dq.input[2]].data_type == TensorProto.INT8 and not zp.any()
        src = dq.input[0]
        if form == "int8":
            assert inits[src].data_type == TensorProto.INT8
            continue
        cast = produced[src]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.INT8
        stored = {inits[i].data_type for n in m.graph.node if n.output[0] in _ancestors(produced, src)
                  for i in n.input if i in inits}
        assert stored == ({TensorProto.INT4} if form == "int4-cast" else {TensorProto.UINT4})


def _ancestors(produced: dict, name: str) -> set[str]:
    out, todo = set(), [name]
    while todo:
        v = todo.pop()
        if v in produced and v not in out:
            out.add(v)
            todo.extend(produced[v].input)
    return out


def test_asymmetric_8_bit_codes_that_do_not_fit_keep_their_zero_point(tmp_path):
    """Centred 8-bit codes can exceed what U8S8 kernels multiply without saturation: they stay uint8 (U8U8)."""
    model = toy_model(LayerPolicy(bits=8, scheme=Scheme.ASYMMETRIC, granularity=PerTensor()))
    s = export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx")
    forms = {s["layers"][n]["container"] for n in TOY_QUANT}
    assert forms <= {"uint8", "int8"} and "uint8" in forms
    x = torch.randn(8, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort_predict(make_session(tmp_path / "m.onnx"), x.numpy())
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("kwargs,needle", [
    ({"weight_format": "int3"}, "unknown weight format"),
    ({"opset": 13}, "opset 13 is not supported"),
    ({"opset": 17}, "invalid ONNX graph"),  # 4-bit weights need opset 21
])
def test_bad_export_options_write_nothing(tmp_path, kwargs, needle):
    from hirelc.errors import HirelcError

    model = toy_model(LayerPolicy(bits=4))
    with pytest.raises(HirelcError, match=needle):
        export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--weight-format", "int3"], "int3"),
    (["--opset", "13"], "opset 13 is not supported"),
])
def test_cli_export_refuses_bad_options_and_keeps_the_earlier_file(run_dir, args, needle):
    from typer.testing import CliRunner

    from hirelc import runs
    from hirelc.cli import app

    before = (run_dir / runs.HIRELC_ONNX).read_bytes()
    res = CliRunner().invoke(app, ["export", "-r", str(run_dir), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert (run_dir / runs.HIRELC_ONNX).read_bytes() == before


def test_cli_export_plain_and_fold(run_dir, tmp_path):
    """Both forms from the command line; the report names the one written."""
    import json
    import shutil

    from typer.testing import CliRunner

    from hirelc import runs
    from hirelc.cli import app

    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    for fmt in ("plain", "fold"):
        res = CliRunner().invoke(app, ["export", "-r", str(rd), "--weight-format", fmt])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["weight_format"] == fmt
    assert fused_op_counts(rd / runs.HIRELC_ONNX)["QLinearConv"] > 0
