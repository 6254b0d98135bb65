"""Tests for hirelc.policy: validation, the JSON format, rule matching, presets and strict resolution."""

from __future__ import annotations

import json
import math

import pytest

from hirelc.errors import HirelcError
from hirelc.policy import (
    POLICY_VERSION,
    PRESETS,
    LayerPolicy,
    PerChannel,
    PerGroup,
    PerTensor,
    Policy,
    Scheme,
    get_policy,
    parse_granularity,
)

# ---------------------------------------------------------------- LayerPolicy validation


@pytest.mark.parametrize("bits", [0, 1, 7, 9, 16, 32])
def test_layer_policy_rejects_bits_outside_the_allowed_set(bits):
    with pytest.raises(HirelcError, match="bits must be one of"):
        LayerPolicy(bits=bits)


@pytest.mark.parametrize("bits", [None, 2, 3, 4, 5, 6, 8])
def test_layer_policy_accepts_allowed_bits(bits):
    assert LayerPolicy(bits=bits).quantized is (bits is not None)


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.0001, 2.0, math.nan])
def test_layer_policy_rejects_keep_ratio_out_of_range(keep):
    with pytest.raises(HirelcError, match="keep_ratio must be in"):
        LayerPolicy(keep_ratio=keep)


def test_layer_policy_rejects_unknown_scheme():
    with pytest.raises(HirelcError, match="unknown scheme 'sym'"):
        LayerPolicy(scheme="sym")


@pytest.mark.parametrize(
    "text, match",
    [
        ("per-row", "unknown granularity"),
        ("per-group", "per-group needs a size"),
        ("per-group:abc", "per-group needs a size"),
        ("per-group:1", "group size >= 2"),
        ("", "unknown granularity"),
    ],
)
def test_bad_granularity_strings_are_rejected(text, match):
    with pytest.raises(HirelcError, match=match):
        LayerPolicy(granularity=text)


@pytest.mark.parametrize(
    "text, expected",
    [("per-tensor", PerTensor()), ("Per-Channel", PerChannel()), (" per-group:32 ", PerGroup(32))],
)
def test_granularity_strings_parse(text, expected):
    assert parse_granularity(text) == expected
    assert LayerPolicy(granularity=text).granularity == expected


def test_layer_policy_normalises_string_scheme():
    lp = LayerPolicy(bits=4, scheme="ASYMMETRIC")
    assert lp.scheme is Scheme.ASYMMETRIC


# ---------------------------------------------------------------- JSON format

EXAMPLE = Policy(
    default=LayerPolicy(bits=8, scheme=Scheme.ASYMMETRIC, granularity=PerTensor()),
    rules=(
        ("layer*.conv1", LayerPolicy(bits=4, keep_ratio=0.5)),
        ("fc", LayerPolicy(bits=None)),
        ("layer4.*", LayerPolicy(bits=6, granularity=PerGroup(16))),
    ),
    name="example",
)


def test_policy_dict_round_trip_keeps_everything():
    d = EXAMPLE.to_dict()
    assert d["version"] == POLICY_VERSION
    assert d["rules"][1] == {"pattern": "fc", "bits": "float", "keep_ratio": 1.0, "scheme": "symmetric",
                             "granularity": "per-channel"}
    assert d["rules"][2]["granularity"] == "per-group:16"
    assert Policy.from_dict(json.loads(json.dumps(d))) == EXAMPLE


def test_policy_save_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "p.json"
    EXAMPLE.save(path)
    assert json.loads(path.read_text())["version"] == POLICY_VERSION
    assert Policy.load(path) == EXAMPLE
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # atomic write leaves no temp file


def _with(**changes) -> dict:
    d = EXAMPLE.to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "doc, match",
    [
        (_with(version=2), "unsupported version 2"),
        ({k: v for k, v in EXAMPLE.to_dict().items() if k != "version"}, "unsupported version None"),
        ([], "expected a JSON object"),
        (_with(default={"bits": 8, "colour": "red"}), r"policy default: unknown field\(s\) \['colour'\]"),
        (_with(rules=[{"pattern": "fc", "bits": 4, "keep": 0.5}]), r"policy rule 0 \(fc\): unknown field"),
        (_with(rules=[{"bits": 4}]), "policy rule 0: needs a 'pattern'"),
        (_with(rules=[{"pattern": "fc", "bits": "four"}]), "bits must be an integer or 'float'"),
        (_with(rules=[{"pattern": "fc", "bits": True}]), "bits must be an integer or 'float'"),
        (_with(rules=[{"pattern": "fc", "keep_ratio": "half"}]), "keep_ratio must be a number"),
        (_with(rules=[{"pattern": "fc", "keep_ratio": 0}]), r"policy rule 0 \(fc\): keep_ratio must be in"),
        (_with(rules=[{"pattern": "fc", "bits": 7}]), r"policy rule 0 \(fc\): bits must be one of"),
        (_with(rules=[{"pattern": "fc", "scheme": "sym"}]), r"policy rule 0 \(fc\): unknown scheme"),
        (_with(rule=[{"pattern": "fc", "bits": 4}]), r"unknown field\(s\) \['rule'\]"),
    ],
)
def test_bad_policy_documents_are_rejected_with_the_reason(doc, match):
    with pytest.raises(HirelcError, match=match):
        Policy.from_dict(doc)


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "is not valid JSON"), (b"\xff\xfe\x00garbage", "is not valid JSON"), ("", "is not valid JSON")],
)
def test_corrupt_policy_file_is_rejected(tmp_path, content, match):
    path = tmp_path / "bad.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(HirelcError, match=match) as e:
        Policy.load(path)
    assert str(path) in str(e.value)


def test_missing_policy_file_is_rejected(tmp_path):
    with pytest.raises(HirelcError, match="policy file not found"):
        Policy.load(tmp_path / "absent.json")


# ---------------------------------------------------------------- rule matching and resolution


def test_last_matching_rule_wins_and_default_applies_elsewhere():
    p = Policy(
        default=LayerPolicy(bits=8),
        rules=(("layer*", LayerPolicy(bits=6)), ("layer1.*", LayerPolicy(bits=4)), ("*.conv2", LayerPolicy(bits=2))),
    )
    assert p.for_layer("layer1.0.conv1").bits == 4
    assert p.for_layer("layer1.0.conv2").bits == 2
    assert p.for_layer("layer2.0.conv1").bits == 6
    assert p.for_layer("fc").bits == 8


def test_exact_rule_naming_an_unknown_layer_is_an_error(built):
    topo = built("test_resnet").topo
    p = Policy(rules=(("layer1.0.conv9", LayerPolicy(bits=4)),))
    with pytest.raises(HirelcError, match=r"unknown layer 'layer1\.0\.conv9'"):
        p.resolve(list(topo.layers))


def test_glob_matching_nothing_is_allowed(built):
    topo = built("test_resnet").topo
    layers = Policy(rules=(("nothing.*", LayerPolicy(bits=2)),)).resolve(list(topo.layers))
    assert {lp.bits for lp in layers.values()} == {8}


@pytest.mark.parametrize("name", ["int8", "w4", "w4-prune50", "w8-prune30"])
def test_preset_exists(name):
    assert get_policy(name) is PRESETS[name]
    assert PRESETS[name].name == name


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("preset", ["int8", "w4", "w4-prune50", "w8-prune30", "w4-group32", "fp32"])
def test_presets_resolve_keep_only_on_prunable_layers(built, model, preset):
    topo = built(model).topo
    policy = PRESETS[preset]
    layers = policy.resolve(list(topo.layers))
    assert list(layers) == topo.names
    assert layers[topo.classifier].keep_ratio == 1.0
    for s in topo.layers:
        lp = layers[s.name]
        assert lp.bits == policy.default.bits
        expected = policy.default.keep_ratio if s.prunable else 1.0
        assert lp.keep_ratio == expected, s.name
    assert any(s.prunable for s in topo.layers)


def test_from_layers_round_trips_a_resolution(built):
    topo = built("test_resnet").topo
    layers = PRESETS["w4-prune50"].resolve(list(topo.layers))
    again = Policy.from_dict(Policy.from_layers(layers, name="searched").to_dict()).resolve(list(topo.layers))
    assert again == layers


# ---------------------------------------------------------------- strict rules


@pytest.mark.parametrize(
    "model, rule, match",
    [
        ("test_resnet", ("layer1.0.conv2", LayerPolicy(bits=4, keep_ratio=0.5)), "pruned with their group"),
        ("test_resnet", ("fc", LayerPolicy(bits=8, keep_ratio=0.9)), "cannot be pruned"),
        ("test_resnet", ("layer1.0.conv1", LayerPolicy(bits=4, granularity=PerGroup(3))),
         "group size 3 does not divide the input dim 32"),
        ("test_vit", ("blocks.0.attn.proj", LayerPolicy(bits=4, keep_ratio=0.5)), "pruned with their group"),
        ("mobilenetv2_100", ("blocks.1.0.conv_dw", LayerPolicy(bits=4, granularity=PerGroup(2))),
         "per-group granularity on a depthwise conv"),
    ],
)
def test_rule_the_layer_cannot_take_is_an_error_naming_it(built, model, rule, match):
    topo = built(model).topo
    with pytest.raises(HirelcError, match=match) as e:
        Policy(rules=(rule,)).resolve(list(topo.layers))
    assert repr(rule[0]) in str(e.value)


def test_glob_rule_is_strict_too(built):
    topo = built("test_resnet").topo
    with pytest.raises(HirelcError, match=r"layer 'fc'.*cannot be pruned"):
        Policy(rules=(("*", LayerPolicy(bits=4, keep_ratio=0.5)),)).resolve(list(topo.layers))


def test_glob_keep_ratio_passes_over_group_followers(built):
    topo = built("test_resnet").topo
    layers = Policy(rules=(("layer1.*", LayerPolicy(bits=4, keep_ratio=0.5)),)).resolve(list(topo.layers))
    assert layers["layer1.0.conv1"].keep_ratio == 0.5  # leads its block's inner group
    assert layers["layer1.0.conv2"].keep_ratio == 1.0 and layers["layer1.0.conv2"].bits == 4  # follows the stem


def test_default_falls_back_where_it_cannot_apply(built):
    topo = built("mobilenetv2_100").topo
    layers = PRESETS["w4-group32"].resolve(list(topo.layers))
    dw = topo.spec("blocks.1.0.conv_dw")
    assert dw.kind == "dwconv"
    assert layers[dw.name].granularity == PerChannel()
    assert layers["conv_stem"].granularity == PerChannel()  # 1 input channel: 32 does not divide it
    assert layers["blocks.5.1.conv_pw"].granularity == PerGroup(32)  # 160 input channels


# ---------------------------------------------------------------- get_policy


def test_get_policy_reads_a_file(tmp_path):
    path = tmp_path / "mine.json"
    EXAMPLE.save(path)
    assert get_policy(str(path)) == EXAMPLE


@pytest.mark.parametrize("spec, match", [("w3-prune99", "unknown policy 'w3-prune99'"), ("gone.json", "not found")])
def test_get_policy_rejects_unknown(tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HirelcError, match=match) as e:
        get_policy(spec)
    if "unknown policy" in match:
        assert "int8" in str(e.value)  # lists the presets
