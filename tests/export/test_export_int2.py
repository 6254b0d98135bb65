"""2-bit weights stored as INT2/UINT2 (four codes per byte) when the export's opset is 25 or later.

The TorchScript exporter writes opset 21; a later opset is reached by ``onnx.version_converter``. In the ``fold``
form the INT2 codes are widened by constant-only nodes that ONNX Runtime folds at session creation, so the layers
still fuse into integer kernels and compute exactly what the opset-21 file (2-bit codes in INT4) computes.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from export_toys import FAST, TOY_QUANT, TOY_SHAPE, toy_model
from onnx import TensorProto

from hirelc.errors import HirelcError
from hirelc.export import ORT_PROBE, export_lowered, fused_op_counts, make_session, ort_predict
from hirelc.export.onnx_export import INT2_OPSET
from hirelc.lower import lower_model
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, PerTensor, Scheme

pytestmark = pytest.mark.ort

SHAPE = (1, 1, 32, 32)
TWO_BIT = [LayerPolicy(bits=2, scheme=s, granularity=g) for s in Scheme for g in (PerTensor(), PerChannel())]
OTHERS = [LayerPolicy(bits=b) for b in (3, 4, 8)]


def _initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("lp", TWO_BIT, ids=lambda lp: f"{lp.scheme.value}-{type(lp.granularity).__name__}")
def test_two_bit_codes_take_int2_at_opset_25_and_compute_the_same(tmp_path, lp):
    model = toy_model(lp)
    a = export_lowered(model, TOY_SHAPE, tmp_path / "o21.onnx")
    b = export_lowered(model, TOY_SHAPE, tmp_path / "o25.onnx", opset=INT2_OPSET)
    assert a["opset"] == 21 and b["opset"] == INT2_OPSET
    forms = {n: b["layers"][n]["container"] for n in TOY_QUANT}
    assert {a["layers"][n]["container"] for n in TOY_QUANT} <= {"int4-cast", "uint4-sub"}
    if lp.scheme is Scheme.SYMMETRIC:
        assert set(forms.values()) == {"int2-cast"}
    else:
        # the conv's 9,216 codes save far more than UINT2's longer widening chain costs; the 640-code head
        # does not, and keeps INT4 (its codes minus the zero point fit INT4, widened by one Cast)
        assert forms["2"] in ("int2-cast", "uint2-sub") and forms["8"] == "int4-cast"
    stored = _initializer_types(tmp_path / "o25.onnx")
    assert stored & {TensorProto.INT2, TensorProto.UINT2}
    # four codes per byte instead of two: the toy's 2-bit conv (32*32*9 codes) alone saves a quarter of its codes
    # in bytes, less the longer chain of UINT2 codes (Cast, Cast, Sub, Cast) and their zero points
    assert a["bytes"] - b["bytes"] >= (0.9 if lp.scheme is Scheme.SYMMETRIC else 0.75) * 32 * 32 * 9 / 4
    x = torch.randn(8, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(3)).numpy()
    ya = ort_predict(make_session(tmp_path / "o21.onnx"), x)
    yb = ort_predict(make_session(tmp_path / "o25.onnx"), x)
    np.testing.assert_array_equal(ya, yb)  # the same int8 weights after folding, the same kernels
    onnx.checker.check_model(onnx.load(str(tmp_path / "o25.onnx")), full_check=True)


def test_a_small_asymmetric_two_bit_layer_is_not_made_larger_by_int2(tmp_path, monkeypatch):
    """Per layer, INT2/UINT2 only where they make the file smaller than INT4: the chosen file is no larger than
    the one with INT2/UINT2 forced on every 2-bit layer, nor than the opset-21 file."""
    from hirelc.export import onnx_export

    lp = LayerPolicy(bits=2, scheme=Scheme.ASYMMETRIC, granularity=PerChannel())
    model = toy_model(lp)
    chosen = export_lowered(model, TOY_SHAPE, tmp_path / "chosen.onnx", opset=INT2_OPSET)
    o21 = export_lowered(model, TOY_SHAPE, tmp_path / "o21.onnx")
    monkeypatch.setattr(onnx_export, "_packed_width", lambda name, diff, zp_size, bits, int2: 2)
    forced = export_lowered(model, TOY_SHAPE, tmp_path / "forced.onnx", opset=INT2_OPSET)
    assert forced["layers"]["8"]["container"] == "uint2-sub" and chosen["layers"]["8"]["container"] == "int4-cast"
    assert chosen["bytes"] < forced["bytes"] and chosen["bytes"] < o21["bytes"]


@pytest.mark.parametrize("lp", [LayerPolicy(bits=2, scheme=s, granularity=PerGroup(16)) for s in Scheme],
                         ids=lambda lp: lp.scheme.value)
def test_per_group_two_bit_codes_stay_blocked_int4_at_opset_25(tmp_path, lp):
    model = toy_model(lp)
    a = export_lowered(model, TOY_SHAPE, tmp_path / "o21.onnx")
    b = export_lowered(model, TOY_SHAPE, tmp_path / "o25.onnx", opset=INT2_OPSET)
    assert [b["layers"][n]["container"] for n in TOY_QUANT] == [a["layers"][n]["container"] for n in TOY_QUANT]
    assert all(b["layers"][n]["container"].endswith("-blocked") for n in TOY_QUANT)
    assert not _initializer_types(tmp_path / "o25.onnx") & {TensorProto.INT2, TensorProto.UINT2}
    assert fused_op_counts(tmp_path / "o25.onnx") == fused_op_counts(tmp_path / "o21.onnx")
    x = torch.randn(8, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(ort_predict(make_session(tmp_path / "o25.onnx"), x),
                               ort_predict(make_session(tmp_path / "o21.onnx"), x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("opset", [22, 23, 24])
def test_opsets_between_21_and_25_export_like_21(tmp_path, opset):
    model = toy_model(LayerPolicy(bits=4))
    a = export_lowered(model, TOY_SHAPE, tmp_path / "o21.onnx")
    b = export_lowered(model, TOY_SHAPE, tmp_path / "o.onnx", opset=opset)
    assert b["opset"] == opset and b["layers"] == a["layers"]
    assert fused_op_counts(tmp_path / "o.onnx") == fused_op_counts(tmp_path / "o21.onnx")
    x = torch.randn(8, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(ort_predict(make_session(tmp_path / "o.onnx"), x),
                                  ort_predict(make_session(tmp_path / "o21.onnx"), x))


def test_wider_codes_keep_their_containers_at_opset_25(tmp_path):
    for lp in OTHERS:
        model = toy_model(lp)
        s = export_lowered(model, TOY_SHAPE, tmp_path / f"w{lp.bits}.onnx", opset=INT2_OPSET)
        assert {s["layers"][n]["container"] for n in TOY_QUANT} == {"int8" if lp.bits == 8 else "int4-cast"}
        assert not _initializer_types(tmp_path / f"w{lp.bits}.onnx") & {TensorProto.INT2, TensorProto.UINT2}


def test_plain_form_keeps_two_bit_codes_in_int4_at_opset_25(tmp_path):
    """ONNX Runtime 1.32 cannot load an INT2 DequantizeLinear that feeds a conv (its QDQ fusion hands the INT2
    weight to QLinearConv), so the plain form stays loadable by keeping 4-bit containers."""
    model = toy_model(LayerPolicy(bits=2))
    s = export_lowered(model, TOY_SHAPE, tmp_path / "p.onnx", opset=INT2_OPSET, weight_format="plain")
    assert {s["layers"][n]["container"] for n in TOY_QUANT} == {"int4"}
    make_session(tmp_path / "p.onnx")


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_a_mixed_model_at_opset_25_fuses_every_layer_and_matches_opset_21(tmp_path, built, bundle, name):
    b = built(name)
    formats = TWO_BIT + OTHERS
    layers = {n: formats[i % len(formats)] for i, n in enumerate(b.topo.names)}
    low = lower_model(b.model, b.topo, layers, bundle, FAST, progress=False, probe=ORT_PROBE)[0]
    a = export_lowered(low, SHAPE, tmp_path / "o21.onnx")
    c = export_lowered(low, SHAPE, tmp_path / "o25.onnx", opset=INT2_OPSET)
    two = [n for n, lp in layers.items() if lp.bits == 2]
    assert two and all(c["layers"][n]["container"] in ("int2-cast", "uint2-sub") for n in two)
    assert c["bytes"] < a["bytes"]
    ops21, ops25 = fused_op_counts(tmp_path / "o21.onnx"), fused_op_counts(tmp_path / "o25.onnx")
    assert ops25 == ops21  # the same kernels: nothing falls back to float because of the narrower type
    assert ops25["Conv"] + ops25["FusedConv"] + ops25["Gemm"] == 0
    x = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(6)).numpy()
    ya = ort_predict(make_session(tmp_path / "o21.onnx"), x)
    yb = ort_predict(make_session(tmp_path / "o25.onnx"), x)
    np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("opset", [16, 26])
def test_an_opset_outside_the_range_is_refused_before_anything_is_written(tmp_path, opset):
    model = toy_model(LayerPolicy(bits=2))
    with pytest.raises(HirelcError, match=f"opset {opset} is not supported: hirelc exports opsets 17..25"):
        export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_at_opset_25_records_it_and_refuses_26(run_dir, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from hirelc import runs
    from hirelc.cli import app

    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    res = CliRunner().invoke(app, ["export", "-r", str(rd), "--opset", "25"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["opset"] == 25
    assert onnx.load(str(rd / runs.HIRELC_ONNX)).opset_import[0].version == 25
    before = (rd / runs.HIRELC_ONNX).read_bytes()
    res = CliRunner().invoke(app, ["export", "-r", str(rd), "--opset", "26"])
    assert res.exit_code == 2 and "opset 26 is not supported" in res.output and "Traceback" not in res.output
    assert (rd / runs.HIRELC_ONNX).read_bytes() == before


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino not installed (the dev extra has it)")
def test_openvino_on_an_int2_file_runs_it_or_names_the_reason(tmp_path):
    from hirelc.export.targets import open_target

    model = toy_model(LayerPolicy(bits=2))
    export_lowered(model, TOY_SHAPE, tmp_path / "m.onnx", opset=INT2_OPSET)
    try:
        session = open_target("openvino", tmp_path / "m.onnx")
    except HirelcError as e:  # OpenVINO 2026.4: its ONNX frontend has no INT2
        assert "cannot read INT2/UINT2 initializers (an opset-25 export): export with --opset 21" in str(e)
        return
    x = torch.randn(4, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session(x.numpy()) - ref).max() <= 0.05 * np.abs(ref).max()  # a later OpenVINO that reads it


def test_an_onnx_without_int2_refuses_opset_25_with_a_reason(tmp_path, monkeypatch):
    from hirelc.export import onnx_export

    monkeypatch.setitem(onnx_export._ONNX_TYPE, "int2", None)  # as onnx < 1.20 has it
    with pytest.raises(HirelcError, match=r"opset 25 is not supported by the installed onnx .*: use --opset 21"):
        export_lowered(toy_model(LayerPolicy(bits=2)), TOY_SHAPE, tmp_path / "m.onnx", opset=INT2_OPSET)
    assert list(tmp_path.iterdir()) == []


def test_verify_runs_an_int2_artifact_on_integer_kernels(tmp_path, built, bundle):
    """A run directory whose model.onnx holds INT2 layers verifies like any other: parity with the lowered model,
    and no quantized layer left as a float kernel."""
    from hirelc import runs
    from hirelc.export import VerifyConfig, export_fp32, ort_int8_baseline, verify_run
    from hirelc.lower import save_lowered
    from hirelc.pipeline import lowered_reference
    from hirelc.policy import Policy

    b = built("test_resnet")
    policy = Policy(default=LayerPolicy(bits=2), name="w2")
    layers = policy.resolve(list(b.topo.layers))
    low = lower_model(b.model, b.topo, layers, bundle, FAST, progress=False, probe=ORT_PROBE)[0]
    rd = tmp_path / "rd"
    rd.mkdir()
    export_fp32(b.model, SHAPE, rd / runs.FP32_ONNX)
    info = export_lowered(low, SHAPE, rd / runs.HIRELC_ONNX, opset=INT2_OPSET)
    assert {v["container"] for v in info["layers"].values()} <= {"int2-cast", "uint2-sub"}
    ort_int8_baseline(rd / runs.FP32_ONNX, rd / runs.ORT_INT8_ONNX, bundle.train.x[:64].numpy())
    save_lowered(rd / runs.LOWERED_MODEL, low, b.cfg, policy, layers, b.topo, FAST)
    rep = verify_run(rd, bundle, VerifyConfig(runs=1, warmup=0, batch_sizes=(1,), parity_samples=200, memory=False),
                     reference=lowered_reference(rd))
    hirelc = rep["artifacts"]["hirelc"]
    assert hirelc["bytes"] == (rd / runs.HIRELC_ONNX).stat().st_size
    ops = hirelc["fused_ops"]
    assert ops["QLinearConv"] > 0 and ops["Conv"] + ops["FusedConv"] + ops["Gemm"] == 0
    assert rep["parity"]["status"] == "ok" and rep["parity"]["top1_agreement"] >= 99.0
