"""Tests for hirelc.topology (LayerSpecs, blocks, coupled prune groups) and hirelc.cost (storage from specs)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hirelc.cost import group_keeps, kept_shape, policy_storage
from hirelc.errors import HirelcError
from hirelc.policy import FLOAT, LayerPolicy, PerGroup, PerTensor, Scheme
from hirelc.topology import LayerSpec, block_of, build_topology

MODELS = ["test_resnet", "test_vit", "mobilenetv2_100"]


def _output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every Conv2d/Linear, recorded independently of hirelc's own hooks."""
    shapes, hooks = {}, []

    def record(name):
        def hook(_m, _i, out):
            shapes.setdefault(name, tuple(out.shape))

        return hook

    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(record(n)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


# ---------------------------------------------------------------- LayerSpecs


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_and_linear_has_a_spec_with_its_shapes(built, name):
    b = built(name)
    mods = {n: m for n, m in b.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert sorted(b.topo.names) == sorted(mods)
    for s in b.topo.layers:
        m = mods[s.name]
        assert s.params == sum(p.numel() for p in m.parameters(recurse=False)), s.name
        if isinstance(m, nn.Conv2d):
            assert (s.in_features, s.out_features, s.kernel) == (m.in_channels // m.groups, m.out_channels,
                                                                 tuple(m.kernel_size)), s.name
        else:
            assert (s.in_features, s.out_features, s.kernel) == (m.in_features, m.out_features, ()), s.name


@pytest.mark.parametrize("name", MODELS)
def test_macs_follow_the_output_shape(built, name):
    b = built(name)
    mods = dict(b.model.named_modules())
    shapes = _output_shapes(b.model, torch.zeros(b.topo.input_shape))
    for s in b.topo.layers:
        out = shapes[s.name]
        m = mods[s.name]
        if isinstance(m, nn.Conv2d):
            _, c_out, h, w = out
            kh, kw = m.kernel_size
            expected = h * w * c_out * (m.in_channels // m.groups) * kh * kw
        else:
            expected = int(torch.tensor(out[:-1]).prod()) * m.in_features * m.out_features
        assert s.macs == expected, s.name


@pytest.mark.parametrize(
    "model, layer, macs",
    [
        ("test_resnet", "conv1.0", 16 * 16 * 16 * 1 * 3 * 3),  # stride-2 stem: 16x16 out, 16 ch, 1 in, 3x3
        ("mobilenetv2_100", "blocks.1.0.conv_dw", 8 * 8 * 96 * 1 * 3 * 3),  # depthwise: C_in/groups = 1
        ("test_vit", "blocks.0.attn.qkv", 17 * 64 * 192),  # 16 patches + class token
    ],
)
def test_macs_by_hand(built, model, layer, macs):
    assert built(model).topo.spec(layer).macs == macs


@pytest.mark.parametrize(
    "model, layer, kind",
    [
        ("test_resnet", "conv1.0", "conv"),
        ("test_resnet", "layer2.0.downsample.1", "pwconv"),
        ("test_resnet", "fc", "classifier"),
        ("mobilenetv2_100", "blocks.1.0.conv_dw", "dwconv"),
        ("mobilenetv2_100", "blocks.1.0.conv_pw", "pwconv"),
        ("mobilenetv2_100", "classifier", "classifier"),
        ("test_vit", "patch_embed.proj", "conv"),
        ("test_vit", "blocks.0.attn.qkv", "attn_qkv"),
        ("test_vit", "blocks.0.attn.proj", "attn_proj"),
        ("test_vit", "blocks.0.mlp.fc1", "mlp_fc1"),
        ("test_vit", "blocks.0.mlp.fc2", "mlp_fc2"),
        ("test_vit", "head", "classifier"),
    ],
)
def test_layer_kinds(built, model, layer, kind):
    assert built(model).topo.spec(layer).kind == kind


def test_attention_qkv_records_its_heads(built):
    b = built("test_vit")
    for s in b.topo.layers:
        expected = b.model.get_submodule(s.name.rpartition(".")[0]).num_heads if s.kind == "attn_qkv" else 0
        assert s.num_heads == expected, s.name
    assert b.topo.spec("blocks.0.attn.qkv").num_heads == 2


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    "name, block",
    [
        ("layer1.0.conv1", "layer1.0"),
        ("layer2.0.downsample.1", "layer2.0"),  # nearest indexed ancestor, not the Sequential inside it
        ("blocks.0.attn.qkv", "blocks.0"),
        ("blocks.1.0.conv_pw", "blocks.1.0"),
        ("blocks.3.0.se.conv_reduce", "blocks.3.0"),
        ("conv1", "conv1"),  # no indexed ancestor: its top-level child
        ("conv1.0", "conv1"),  # an index on the layer itself does not make a block
        ("patch_embed.proj", "patch_embed"),
        ("head.fc", "head"),
        ("fc", "fc"),
        ("0.conv", "0"),
    ],
)
def test_block_of(name, block):
    assert block_of(name) == block


@pytest.mark.parametrize(
    "model, block, members",
    [
        ("test_resnet", "layer1.0", ["layer1.0.conv1", "layer1.0.conv2"]),
        ("test_resnet", "conv1", ["conv1.0", "conv1.3", "conv1.6"]),
        ("test_vit", "blocks.0", ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]),
        ("mobilenetv2_100", "blocks.1.0", ["blocks.1.0.conv_pw", "blocks.1.0.conv_dw", "blocks.1.0.conv_pwl"]),
    ],
)
def test_blocks_group_layers(built, model, block, members):
    topo = built(model).topo
    assert topo.blocks[block] == members
    assert topo.blocks[topo.classifier] == [topo.classifier]


# ---------------------------------------------------------------- coupled prune groups


def _check_inner_and_residual(topo, inner: str, residual: str) -> None:
    a, b = topo.spec(inner), topo.spec(residual)
    assert a.prunable and a.prune_group >= 0
    assert not b.prunable
    assert b.input_group == a.prune_group


def _check_stream(topo, leader: str, writers: list[str], readers: list[str]) -> None:
    """``leader`` carries the keep ratio of a residual stream that ``writers`` also write and ``readers`` read."""
    lead = topo.spec(leader)
    assert lead.prunable and lead.stream and lead.prune_group >= 0
    for w in writers:
        s = topo.spec(w)
        assert s.prune_group == lead.prune_group and s.stream and not s.prunable, w
    for r in readers:
        assert topo.spec(r).input_group == lead.prune_group, r


def test_resnet_basic_block_inner_conv_prunable_residual_conv_not(built):
    topo = built("test_resnet").topo
    _check_inner_and_residual(topo, "layer1.0.conv1", "layer1.0.conv2")
    # the stem's output channels are layer1's residual stream: one group, led by the stem
    _check_stream(topo, "conv1.6", ["layer1.0.conv2"], ["layer1.0.conv1"])
    assert not topo.spec("layer1.0.conv1").stream


def test_mobilenet_dwconv_follows_its_expansion_conv(built):
    topo = built("mobilenetv2_100").topo
    pw, dw, pwl = (topo.spec(f"blocks.1.1.{n}") for n in ("conv_pw", "conv_dw", "conv_pwl"))
    assert pw.prunable and dw.prune_group == pw.prune_group >= 0
    assert not dw.prunable
    assert pwl.input_group == pw.prune_group
    assert not pwl.prunable and pwl.stream  # blocks.1.1 has a residual add: its output is stage 1's stream
    _check_stream(topo, "blocks.1.0.conv_pwl", ["blocks.1.1.conv_pwl"], ["blocks.1.1.conv_pw", "blocks.2.0.conv_pw"])
    assert all(not s.prunable for s in topo.layers if s.kind == "dwconv")


def test_vit_qkv_and_fc1_prunable_proj_and_fc2_not(built):
    topo = built("test_vit").topo
    for i in range(6):
        _check_inner_and_residual(topo, f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj")
        _check_inner_and_residual(topo, f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2")
    # the embedding dimension is one stream through every block, led by the patch embedding
    _check_stream(topo, "patch_embed.proj", [f"blocks.{i}.attn.proj" for i in range(6)] + ["blocks.5.mlp.fc2"],
                  ["blocks.0.attn.qkv", "blocks.3.mlp.fc1", "head"])


def test_prunable_leader_is_unique_per_group(built):
    for name in MODELS:
        topo = built(name).topo
        leaders = [s.prune_group for s in topo.layers if s.prunable]
        assert len(leaders) == len(set(leaders)), name
        assert all(s.prune_group in leaders for s in topo.layers if s.prune_group >= 0), name


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv2 = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class _Custom(nn.Module):
    """A network hirelc has never seen: stem, two residual blocks, pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(_Residual(8), _Residual(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_unseen_custom_module():
    topo = build_topology(_Custom(), (1, 1, 16, 16))
    assert topo.names == ["stem", "body.0.conv1", "body.0.conv2", "body.1.conv1", "body.1.conv2", "head"]
    assert topo.classifier == "head"
    assert topo.spec("head").kind == "classifier" and not topo.spec("head").prunable
    assert set(topo.blocks) == {"stem", "body.0", "body.1", "head"}
    _check_stream(topo, "stem", ["body.0.conv2", "body.1.conv2"], ["body.0.conv1", "body.1.conv1", "head"])
    for i in (0, 1):
        _check_inner_and_residual(topo, f"body.{i}.conv1", f"body.{i}.conv2")
    assert topo.spec("body.0.conv1").macs == 8 * 8 * 16 * 8 * 9


class _FixedWidthOffset(_Custom):
    """Adds a fixed 8-channel buffer to the stream: torch-pruning cannot shrink it, so the stream stays whole."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, 8, 1, 1))

    def forward(self, x):
        return self.head(self.body(self.stem(x) + self.offset).mean((2, 3)))


def test_stream_that_cannot_be_pruned_is_not_offered():
    topo = build_topology(_FixedWidthOffset(), (1, 1, 16, 16))
    assert not topo.spec("stem").prunable and not topo.spec("stem").stream
    assert topo.spec("stem").prune_group == -1 and topo.spec("body.0.conv1").input_group == -1
    assert topo.spec("body.0.conv1").prunable  # inner groups are unaffected


def test_unseen_timm_model(built):
    b = built("test_efficientnet")
    topo = b.topo
    mods = [n for n, m in b.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(topo.names) == sorted(mods)
    assert topo.spec(topo.classifier).kind == "classifier" and not topo.spec(topo.classifier).prunable
    dws = [s for s in topo.layers if s.kind == "dwconv"]
    assert dws
    for dw in dws:
        blk = topo.blocks[dw.block]
        pw = topo.spec(blk[blk.index(dw.name) - 1])
        assert pw.prunable and dw.prune_group == pw.prune_group and not dw.prunable
    # squeeze-excite: the expand conv's outputs multiply the dwconv's, so it shares their group
    se_exp = topo.spec("blocks.3.0.se.conv_expand")
    assert se_exp.prune_group == topo.spec("blocks.3.0.conv_dw").prune_group and not se_exp.prunable


@pytest.mark.parametrize("name", MODELS + ["test_efficientnet"])
def test_classifier_never_prunable(built, name):
    topo = built(name).topo
    cls = topo.spec(topo.classifier)
    assert topo.names[-1] == topo.classifier and cls.kind == "classifier"
    assert not cls.prunable and cls.prune_group == -1


# ---------------------------------------------------------------- serialisation and errors


@pytest.mark.parametrize("name", MODELS)
def test_layer_spec_round_trip(built, name):
    topo = built(name).topo
    d = json.loads(json.dumps(topo.to_dict()))
    assert d["classifier"] == topo.classifier and tuple(d["input_shape"]) == topo.input_shape
    assert tuple(LayerSpec.from_dict(x) for x in d["layers"]) == topo.layers


def test_unknown_layer_lookup_is_an_error(built):
    with pytest.raises(HirelcError, match="unknown layer 'nope'"):
        built("test_resnet").topo.spec("nope")


def test_model_without_compressible_layers_is_an_error():
    with pytest.raises(HirelcError, match="no Conv2d or Linear"):
        build_topology(nn.Sequential(nn.ReLU()), (1, 1, 4, 4))


def test_model_that_cannot_run_at_the_input_size_is_an_error():
    with pytest.raises(HirelcError, match=r"does not run on inputs of shape \(1, 3, 8, 8\)"):
        build_topology(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 3, 8, 8))


# ---------------------------------------------------------------- cost.policy_storage on hand-made specs


def _spec(name, in_f, out_f, kernel=(3, 3), bias=False, kind="conv", group=-1, prunable=False, input_group=-1,
          heads=0):
    k = 1
    for v in kernel:
        k *= v
    return LayerSpec(name=name, kind=kind, in_features=in_f, out_features=out_f, kernel=kernel,
                     params=out_f * in_f * k + (out_f if bias else 0), macs=0, block=name, prune_group=group,
                     prunable=prunable, input_group=input_group, num_heads=heads)


def test_storage_per_channel_4bit_symmetric_exact():
    s = _spec("a", 8, 16)  # 1152 weights, no bias
    st = policy_storage([s], {"a": LayerPolicy(bits=4)})
    assert st["storage_bits"] == 4 * 1152 + 16 * 32  # codes + one fp32 scale per output channel
    assert st["fp32_params"] == st["kept_params"] == 1152
    assert st["effective_ratio"] == pytest.approx(32 * 1152 / 5120)


def test_storage_asymmetric_adds_zero_point_bits():
    s = _spec("a", 8, 16)
    st = policy_storage([s], {"a": LayerPolicy(bits=4, scheme=Scheme.ASYMMETRIC)})
    assert st["storage_bits"] == 4 * 1152 + 16 * (32 + 4)


@pytest.mark.parametrize(
    "lp, bits",
    [
        (LayerPolicy(bits=8, granularity=PerTensor()), 8 * 16 * 8 + 32),
        (LayerPolicy(bits=2, granularity=PerGroup(4)), 2 * 16 * 8 + 16 * 2 * 32),  # 16 outs x 8/4 groups
        (FLOAT, 32 * 16 * 8),
    ],
)
def test_storage_granularities(lp, bits):
    st = policy_storage([_spec("l", 8, 16, kernel=(), kind="linear")], {"l": lp})
    assert st["storage_bits"] == bits


def test_storage_bias_is_fp32():
    st = policy_storage([_spec("a", 8, 16, bias=True)], {"a": LayerPolicy(bits=4)})
    assert st["storage_bits"] == 4 * 1152 + 16 * 32 + 16 * 32


def test_storage_pruning_shrinks_own_outputs_and_next_inputs():
    a = _spec("a", 8, 16, group=0, prunable=True)
    b = _spec("b", 16, 4, kernel=(1, 1), input_group=0)
    st = policy_storage([a, b], {"a": LayerPolicy(bits=4, keep_ratio=0.5), "b": LayerPolicy(bits=8)})
    assert st["fp32_params"] == 1152 + 64
    assert st["kept_params"] == 8 * 8 * 9 + 4 * 8
    assert st["storage_bits"] == (4 * 576 + 8 * 32) + (8 * 32 + 4 * 32)


def test_kept_shape_depthwise_and_heads():
    pw = _spec("pw", 8, 32, kernel=(1, 1), group=0, prunable=True)
    dw = _spec("dw", 1, 32, kind="dwconv", group=0)
    qkv = _spec("qkv", 64, 192, kernel=(), kind="attn_qkv", group=1, prunable=True, heads=4)
    proj = _spec("proj", 64, 64, kernel=(), kind="attn_proj", input_group=1)
    layers = {"pw": LayerPolicy(keep_ratio=0.25), "dw": LayerPolicy(), "qkv": LayerPolicy(keep_ratio=0.5),
              "proj": LayerPolicy()}
    keeps = group_keeps([pw, dw, qkv, proj], layers)
    assert keeps == {0: 0.25, 1: 0.5}  # taken from each group's prunable leader
    assert kept_shape(pw, layers, keeps) == (8, 8)
    assert kept_shape(dw, layers, keeps) == (8, 1)  # depthwise follows its group, one input per channel
    assert kept_shape(qkv, layers, keeps) == (96, 64)  # two of four heads
    assert kept_shape(proj, layers, keeps) == (64, 32)


@pytest.mark.parametrize(
    "n,keep,kept",
    [(64, 0.6, 40), (64, 0.4, 24), (512, 0.6, 304), (128, 0.95, 120), (64, 0.95, 64), (64, 0.05, 8),  # multiples of 8
     (16, 0.5, 8), (16, 0.4, 6), (20, 0.5, 10), (30, 0.01, 1), (64, 1.0, 64)],  # small or unaligned: plain rounding
)
def test_kept_channels_rounds_large_aligned_layers_to_multiples_of_8(n, keep, kept):
    from hirelc.cost import kept_channels

    assert kept_channels(n, keep) == kept


def test_kept_shape_uses_the_same_rounding_on_both_sides():
    a = _spec("a", 8, 64, group=0, prunable=True)
    b = _spec("b", 64, 96, kernel=(1, 1), input_group=0)
    layers = {"a": LayerPolicy(keep_ratio=0.6), "b": LayerPolicy()}
    keeps = group_keeps([a, b], layers)
    assert kept_shape(a, layers, keeps) == (40, 8) and kept_shape(b, layers, keeps) == (96, 40)
