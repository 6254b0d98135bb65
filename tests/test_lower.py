"""Tests for hirelc.lower and hirelc.qmodules: physical pruning, BN folding, integer weights, QAT, save/load."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from hirelc import kernels as K
from hirelc.errors import HirelcError
from hirelc.export import ORT_PROBE
from hirelc.lower import (
    LowerConfig,
    channel_saliency,
    fold_batchnorm,
    load_lowered,
    lower_model,
    prune,
    recalibrate_batchnorm,
    save_lowered,
    swap_quantized,
    validate_layers,
)
from hirelc.policy import PRESETS, LayerPolicy, PerGroup, PerTensor, Policy, Scheme
from hirelc.qmodules import ActQuant, QLinear, quant_layers
from hirelc.runs import atomic_torch_save
from hirelc.train import TrainConfig, fit

INPUT_SHAPE = (1, 1, 32, 32)  # what the session fixtures build the tiny models for
FAST = LowerConfig(max_steps=2, batch_size=32, calib_batches=2)


@pytest.fixture(scope="module")
def lowered(built, bundle):
    """``lowered(model, preset)`` -> (built, layers, lowered model, info), cached for the module."""
    cache = {}

    def get(model: str, preset: str, cfg: LowerConfig = FAST):
        key = (model, preset, cfg)
        if key not in cache:
            b = built(model)
            layers = PRESETS[preset].resolve(list(b.topo.layers))
            m, info = lower_model(b.model, b.topo, layers, bundle, cfg, progress=False, probe=ORT_PROBE)
            cache[key] = (b, layers, m, info)
        return cache[key]

    return get


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- pruning


def test_resnet_w4_prune50_halves_inner_and_stream_channels(lowered):
    b, _, m, info = lowered("test_resnet", "w4-prune50")
    conv1, conv2 = m.get_submodule("layer1.0.conv1"), m.get_submodule("layer1.0.conv2")
    # inner channels 32 -> 16 (led by conv1), and layer1's residual stream 32 -> 16 (led by the stem's conv1.6)
    assert conv1.qweight.shape == (16, 16, 3, 3)
    assert conv2.qweight.shape == (16, 16, 3, 3)
    assert info["removed_channels"]["layer1.0.conv1"] == 16 and info["removed_channels"]["conv1.6"] == 16
    assert "layer1.0.conv2" not in info["removed_channels"]  # it follows the stream, it does not lead it
    # inner layers keep a quarter of their weights; only the stem's first conv and the classifier keep more
    assert conv1.qweight.numel() == b.model.get_submodule("layer1.0.conv1").weight.numel() // 4
    assert info["params_after"] < 0.3 * info["params_before"]
    assert info["params_before"] == sum(p.numel() for p in b.model.parameters())  # original left untouched
    assert b.model.get_submodule("layer1.0.conv1").out_channels == 32
    with torch.no_grad():
        assert m(_x()).shape == (4, 10)


def test_vit_w4_prune50_halves_heads_and_mlp(lowered):
    b, _, m, info = lowered("test_vit", "w4-prune50")
    for i in range(6):
        attn = m.get_submodule(f"blocks.{i}.attn")
        assert attn.num_heads == 1 and attn.attn_dim == 32
        # heads 2 -> 1, MLP units 192 -> 96, and the embedding stream 64 -> 32
        assert attn.qkv.qweight.shape == (96, 32)
        assert attn.proj.qweight.shape == (32, 32)
        assert m.get_submodule(f"blocks.{i}.mlp.fc1").qweight.shape == (96, 32)
        assert m.get_submodule(f"blocks.{i}.mlp.fc2").qweight.shape == (32, 96)
    assert m.pos_embed.shape[-1] == m.cls_token.shape[-1] == 32
    assert b.model.get_submodule("blocks.0.attn").num_heads == 2
    assert info["params_after"] < info["params_before"]
    with torch.no_grad():
        y = m(_x())
    assert y.shape == (4, 10) and torch.isfinite(y).all()


def _row_sources(pruned: torch.Tensor, orig: torch.Tensor) -> list[int]:
    """Index in ``orig`` of each row of ``pruned`` (rows are copied verbatim by pruning)."""
    same = (pruned.detach()[:, None, :] == orig.detach()[None, :, :]).all(-1)  # (rows_pruned, rows_orig)
    assert torch.all(same.sum(1) == 1)
    return same.float().argmax(1).tolist()


def test_vit_pruning_equals_zeroing_the_removed_heads_and_units(built):
    """Dropping a head (or an MLP unit) must compute exactly what the full model computes when that head's
    (unit's) contribution to proj (fc2) is zeroed: checks that q, k, v and their consumers stay aligned."""
    b = built("test_vit")
    # the embedding stream stays whole here: dropping embedding dims changes what LayerNorm averages over
    keep_stream = Policy(default=PRESETS["w4-prune50"].default, rules=(("patch_embed.proj", LayerPolicy(bits=4)),))
    layers = keep_stream.resolve(list(b.topo.layers))
    assert layers["blocks.0.attn.qkv"].keep_ratio == 0.5 and layers["patch_embed.proj"].keep_ratio == 1.0
    pruned = copy.deepcopy(b.model)
    prune(pruned, b.topo, layers)
    zeroed = copy.deepcopy(b.model)
    hd = 32
    with torch.no_grad():
        for i in range(6):
            qkv_rows = _row_sources(pruned.blocks[i].attn.qkv.weight, b.model.blocks[i].attn.qkv.weight)
            kept_heads = {r // hd for r in qkv_rows[:hd]}
            assert len(kept_heads) == 1
            for h in set(range(2)) - kept_heads:
                zeroed.blocks[i].attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
            kept_units = set(_row_sources(pruned.blocks[i].mlp.fc1.weight, b.model.blocks[i].mlp.fc1.weight))
            assert len(kept_units) == 96
            for j in set(range(192)) - kept_units:
                zeroed.blocks[i].mlp.fc2.weight[:, j] = 0
        x = _x()
        torch.testing.assert_close(pruned.eval()(x), zeroed.eval()(x), atol=1e-5, rtol=1e-4)


def test_channel_saliency_scores_each_layers_output_channels_and_leaves_the_model_alone(built, bundle):
    b = built("test_resnet")
    m = copy.deepcopy(b.model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [next(iter(bundle.loader("train", 16, shuffle=True, seed=0)))]
    sal = channel_saliency(m, b.topo, batches)
    for s in b.topo.layers:
        assert sal[s.name].shape == (s.out_features,), s.name
        assert torch.isfinite(sal[s.name]).all() and (sal[s.name] >= 0).all()
    assert sal[b.topo.layers[0].name].sum() > 0  # the stem (timm zero-inits each block's last BN: those score 0)
    assert all(p.grad is None and p.requires_grad for p in m.parameters())
    assert not m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prune_removes_the_channels_the_saliency_ranks_lowest(built):
    b = built("test_resnet")
    layers = {s.name: LayerPolicy(bits=None) for s in b.topo.layers}
    leader = "layer1.0.conv1"
    layers[leader] = LayerPolicy(bits=None, keep_ratio=0.5)
    n = b.model.get_submodule(leader).weight.shape[0]
    low = {3, 5, 8, 9, 12, 20, 30, 31, 0, 1, 2, 4, 6, 7, 10, 11}  # half the channels, ranked lowest
    sal = {leader: torch.tensor([0.0 if i in low else 1.0 + i for i in range(n)])}
    pruned = copy.deepcopy(b.model)
    prune(pruned, b.topo, layers, saliency=sal)
    w0 = b.model.get_submodule(leader).weight.flatten(1)
    kept = _row_sources(pruned.get_submodule(leader).weight.flatten(1), w0)
    assert sorted(kept) == sorted(set(range(n)) - low)
    # and magnitude ranking (no saliency) keeps the largest-norm rows instead
    by_norm = copy.deepcopy(b.model)
    prune(by_norm, b.topo, layers)
    norms = K.channel_importance(b.model.get_submodule(leader).weight)
    kept_norm = _row_sources(by_norm.get_submodule(leader).weight.flatten(1), w0)
    assert sorted(kept_norm) == sorted(K.topk_keep(norms, n // 2))


def test_lower_config_rejects_an_unknown_importance():
    with pytest.raises(HirelcError, match="unknown pruning importance 'l3'"):
        LowerConfig(importance="l3")


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_both_importances_lower_a_pruned_model(built, bundle, importance):
    b = built("test_resnet")
    layers = PRESETS["w4-prune50"].resolve(list(b.topo.layers))
    cfg = LowerConfig(max_steps=0, batch_size=16, calib_batches=1, importance=importance)
    m, info = lower_model(b.model, b.topo, layers, bundle, cfg, progress=False, probe=ORT_PROBE)
    assert m.get_submodule("layer1.0.conv1").qweight.shape[0] == 16
    assert torch.isfinite(m.eval()(_x())).all()


# ---------------------------------------------------------------- batchnorm folding


@pytest.mark.parametrize("model", ["test_resnet", "mobilenetv2_100"])  # plain BN; timm BatchNormAct2d
def test_fold_batchnorm_keeps_outputs(built, model):
    m = copy.deepcopy(built(model).model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial statistics, else folding would be a near no-op
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    m.eval()
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x = _x()
    with torch.no_grad():
        before = m(x)
    folded = fold_batchnorm(m, INPUT_SHAPE)
    with torch.no_grad():
        after = m(x)
    assert len(folded) == n_bn > 0
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    acts_before = sum(isinstance(x, (nn.ReLU, nn.ReLU6)) for x in built(model).model.modules())
    assert sum(isinstance(x, (nn.ReLU, nn.ReLU6)) for x in m.modules()) == acts_before  # BN+act keeps its act
    assert all(m.get_submodule(c).bias is not None for c in folded)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_recalibrated_batchnorm_holds_the_statistics_of_the_batches_it_saw(built):
    m = copy.deepcopy(built("test_resnet").model).eval()
    bn = m.get_submodule("conv1.1")  # the deep stem's first BatchNorm, right after the input conv
    with torch.no_grad():  # stale statistics, as after pruning the layer before
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    conv1 = m.get_submodule("conv1.0")
    xs = [_x(8), _x(8) * 2 + 1]
    assert recalibrate_batchnorm(m, iter(xs)) == 2
    with torch.no_grad():
        pre = torch.cat([conv1(x) for x in xs])  # what bn1 normalises, (16, C, H, W)
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    n = pre.numel() / pre.shape[1]  # per-batch unbiased variances averaged (momentum None)
    var = torch.stack([p.var((0, 2, 3), unbiased=True) for p in pre.split(8)]).mean(0)
    torch.testing.assert_close(bn.running_var, var, atol=1e-3, rtol=1e-3)
    assert n > 0 and bn.momentum == built("test_resnet").model.get_submodule("conv1.1").momentum
    assert not m.training and not bn.training


def test_recalibration_without_batches_leaves_the_statistics(built):
    m = copy.deepcopy(built("test_resnet").model).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert recalibrate_batchnorm(m, iter([])) == 0
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruned_lowering_recalibrates_batchnorm_and_it_matters(built, bundle):
    """A pruned policy re-estimates BatchNorm statistics before folding: the folded biases differ from lowering
    with the stale ones (bn_batches=0), and an unpruned policy does not recalibrate at all."""
    b = built("test_resnet")
    layers = PRESETS["w8-prune30"].resolve(list(b.topo.layers))
    cfg = LowerConfig(epochs=0, batch_size=32, calib_batches=2, bn_batches=2)
    m1, info1 = lower_model(b.model, b.topo, layers, bundle, cfg, progress=False)
    m0, info0 = lower_model(b.model, b.topo, layers, bundle, LowerConfig(epochs=0, batch_size=32, calib_batches=2,
                                                                         bn_batches=0), progress=False)
    assert info1["batchnorm_batches"] == 2 and info0["batchnorm_batches"] == 0
    b1, b0 = m1.get_submodule("layer1.0.conv1").bias, m0.get_submodule("layer1.0.conv1").bias  # its input was pruned
    assert b1.shape == b0.shape and not torch.allclose(b1, b0)
    _, info = lower_model(b.model, b.topo, PRESETS["int8"].resolve(list(b.topo.layers)), bundle, cfg, progress=False)
    assert info["batchnorm_batches"] == 0


def test_lower_config_rejects_negative_batchnorm_batches():
    with pytest.raises(HirelcError, match="BatchNorm batches"):
        LowerConfig(bn_batches=-1)


# ---------------------------------------------------------------- integer weights


def test_lowered_layers_hold_only_integer_weights(lowered):
    _, layers, m, _ = lowered("test_resnet", "w4-prune50")
    qls = quant_layers(m)
    assert set(qls) == set(layers)
    for name, q in qls.items():
        assert q.frozen and q.latent is None
        assert q.qweight.dtype == torch.int8
        assert -8 <= int(q.qweight.min()) and int(q.qweight.max()) <= 7, name
        assert q.act.calibrated, name
    keys = m.state_dict().keys()
    assert not [k for k in keys if k.endswith("latent")]
    float_params = [n for n, p in m.named_parameters() if p.dtype.is_floating_point and not n.endswith("bias")]
    assert float_params == []  # no BN left, no float weight: only biases stay float


@pytest.mark.parametrize(
    "lp, dtype, lo, hi",
    [
        (LayerPolicy(bits=4), torch.int8, -8, 7),
        (LayerPolicy(bits=2, scheme=Scheme.ASYMMETRIC), torch.uint8, 0, 3),
        (LayerPolicy(bits=8, scheme=Scheme.ASYMMETRIC, granularity=PerTensor()), torch.uint8, 0, 255),
        (LayerPolicy(bits=5, granularity=PerGroup(16)), torch.int8, -16, 15),
    ],
)
def test_frozen_codes_are_in_range_and_dequantize_close(built, lp, dtype, lo, hi):
    b = built("test_resnet")
    m = copy.deepcopy(b.model)
    names = ["layer1.0.conv1", "layer3.0.conv3", "fc"]
    orig = {n: m.get_submodule(n).weight.detach().clone() for n in names}
    swap_quantized(m, {n: lp for n in names})
    for n in names:
        q = m.get_submodule(n)
        q.freeze()
        assert q.latent is None and q.qweight.dtype == dtype
        assert lo <= int(q.qweight.min()) and int(q.qweight.max()) <= hi
        w = q.weight_float()
        assert w.shape == orig[n].shape
        bound = K.expand_qparams(q.scale, w.shape, q._gran) / 2 + 1e-6
        assert torch.all((w - orig[n]).abs() <= bound), n


# ---------------------------------------------------------------- storage


def test_effective_ratio_w4_prune50(lowered):
    _, _, m, info = lowered("test_resnet", "w4-prune50")
    assert info["effective_ratio"] >= 20
    assert info["effective_ratio"] == pytest.approx(info["predicted_effective_ratio"], rel=0.10)
    assert info["storage_bits"] == sum(q.storage_bits() for q in quant_layers(m).values())


def test_effective_ratio_int8(lowered):
    _, _, _, info = lowered("test_resnet", "int8", LowerConfig(epochs=0, calib_batches=1, batch_size=32))
    assert info["effective_ratio"] == pytest.approx(3.9, abs=0.15)
    assert info["effective_ratio"] == pytest.approx(info["predicted_effective_ratio"], rel=0.10)
    assert info["qat_steps"] == 0


# ---------------------------------------------------------------- save / load


def test_save_load_lowered_gives_identical_logits(tmp_path, lowered):
    b, layers, m, _ = lowered("test_resnet", "w4-prune50")
    path = tmp_path / "lowered.pt"
    save_lowered(path, m, b.cfg, PRESETS["w4-prune50"], layers, b.topo, FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["lowered.pt"]
    blob = load_lowered(path)
    assert blob["model_config"] == b.cfg.to_dict()
    assert Policy.from_dict(blob["policy"]) == PRESETS["w4-prune50"]
    x = _x(8)
    with torch.no_grad():
        assert torch.equal(blob["model"](x), m(x))
    assert all(q.qweight.dtype == torch.int8 for q in quant_layers(blob["model"]).values())


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "lowered model not found"),
        (b"PK\x03\x04 garbage bytes", "is corrupt"),
        ({"format": "something-else"}, "is not a hirelc lowered model"),
        ([1, 2, 3], "is not a hirelc lowered model"),
        ({"format": "hirelc-lowered", "version": 99}, "lowered-model version 99 is not this hirelc's"),
        ({"format": "hirelc-lowered", "version": 2, "state_dict": {}, "model_config": {"name": "test_resnet",
          "num_classes": 10, "in_chans": 1, "img_size": 32, "kwargs": {}}, "layers": {}, "lower_config": {}},
         "is corrupt"),
    ],
)
def test_load_lowered_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "lowered.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        atomic_torch_save(content, path)
    with pytest.raises(HirelcError, match=match):
        load_lowered(path)


# ---------------------------------------------------------------- validation


def test_group_size_that_stops_dividing_after_pruning_is_rejected(built, bundle):
    b = built("test_resnet")
    policy = Policy(rules=(
        ("layer1.0.conv1", LayerPolicy(bits=8, keep_ratio=0.75)),  # 32 -> 24 channels
        ("layer1.0.conv2", LayerPolicy(bits=4, granularity=PerGroup(16))),  # 16 | 32 but not 24
    ))
    layers = policy.resolve(list(b.topo.layers))  # fine before pruning
    with pytest.raises(HirelcError, match=r"layer 'layer1\.0\.conv2': group size 16 .* input dim 24 after pruning"):
        validate_layers(b.topo, layers)
    with pytest.raises(HirelcError, match="after pruning"):
        lower_model(b.model, b.topo, layers, bundle, FAST, progress=False, probe=ORT_PROBE)


# ---------------------------------------------------------------- QAT and the straight-through estimator


def test_qat_changes_latent_weights_and_codes(built, bundle):
    m = copy.deepcopy(built("test_resnet").model)
    fold_batchnorm(m, INPUT_SHAPE)
    names = swap_quantized(m, PRESETS["w4"].resolve(list(built("test_resnet").topo.layers)))
    qls = quant_layers(m)
    latent0 = {n: qls[n].latent.detach().clone() for n in names}
    codes0 = {n: qls[n].qweight.clone() for n in names}
    loader = bundle.loader("train", 32, shuffle=True)
    x, y = next(iter(loader))
    loss0 = nn.functional.cross_entropy(m.eval()(x), y).item()
    stats = fit(m, loader, TrainConfig(epochs=1, max_steps=3, lr=1e-2, augment=False), progress=False)
    assert stats["steps"] == 3
    assert all(not torch.equal(qls[n].latent, latent0[n]) for n in names)
    assert nn.functional.cross_entropy(m.eval()(x), y).item() != loss0
    for q in qls.values():
        q.freeze()
    assert any(not torch.equal(qls[n].qweight, codes0[n]) for n in names)


@pytest.mark.parametrize("bits,scheme,reduce,lo,hi", [
    (8, Scheme.SYMMETRIC, True, -64, 63),  # reduced: no int16 overflow in uint8 x int8 pair sums
    (8, Scheme.SYMMETRIC, False, -128, 127),
    (8, Scheme.ASYMMETRIC, True, 0, 255),  # uint8 weights take ORT's U8U8 kernels, which do not overflow
    (6, Scheme.SYMMETRIC, True, -32, 31),
])
def test_8bit_symmetric_weights_use_7bit_codes_by_default(bits, scheme, reduce, lo, hi):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    q = QLinear(lin, LayerPolicy(bits=bits, scheme=scheme), reduce_range=reduce)
    q.freeze()
    codes = q.qweight.int()
    assert lo <= codes.min() and codes.max() <= hi
    assert codes.max() - codes.min() >= (hi - lo) // 2  # the range is really used
    assert q.storage_bits() >= bits * codes.numel()  # storage counts the 8-bit container either way
    err = (q.weight_float() - lin.weight).abs().max()
    assert err <= q.scale.max() / 2 + 1e-6


def test_fake_quant_weight_gradient_is_straight_through():
    torch.manual_seed(0)
    q = QLinear(nn.Linear(6, 4), LayerPolicy(bits=4))
    x = torch.randn(5, 6, requires_grad=True)
    q(x).sum().backward()
    # min-max scales clip nothing, so d(sum y)/dW[o, i] = sum_b x[b, i] exactly as for a float layer
    torch.testing.assert_close(q.latent.grad, x.detach().sum(0).expand(4, 6))
    torch.testing.assert_close(x.grad, q.weight_float().detach().sum(0).expand(5, 6))
    assert q.bias.grad is not None


def test_activation_fake_quant_gradient_is_clipped_straight_through():
    act = ActQuant(signed=False)
    act.observing = True
    act(torch.linspace(0, 1, 50))
    act.finish_calibration()
    assert act.calibrated and int(act.zero_point) == 0
    x = torch.tensor([0.25, 0.5, 3.0, -2.0], requires_grad=True)
    y = act(x)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # outside the calibrated range: clipped, no gradient
    assert y[2].item() == pytest.approx(1.0) and y[3].item() == 0.0


def test_convs_feeding_residual_adds_get_output_quantizers(bundle):
    from hirelc.lower import LowerConfig, lower_model
    from hirelc.models import build_model, model_config
    from hirelc.policy import PRESETS
    from hirelc.topology import build_topology

    model = build_model(model_config("test_resnet", 10, 1, 32)).eval()
    topo = build_topology(model, (1, 1, 32, 32))
    for preset, expect in (("int8", True), ("w4", True), ("w4-group32", False)):
        low, _ = lower_model(model, topo, PRESETS[preset].resolve(list(topo.layers)), bundle,
                             LowerConfig(epochs=0, max_steps=0), progress=False, probe=ORT_PROBE)
        with_out = [n for n in topo.names if getattr(low.get_submodule(n), "out_act", None) is not None]
        # conv2 of a residual block feeds the add: only an output quantizer lets ORT fuse it; per-group convs
        # have no integer kernel to fuse into, so they get none
        assert ("layer1.0.conv2" in with_out) is expect, (preset, with_out)
        assert "fc" not in with_out  # the head keeps float logits: it runs as MatMulIntegerToFloat
        assert all(low.get_submodule(n).out_act.calibrated for n in with_out)
    # without a runtime to ask, only layer inputs are quantized: no output or residual-block quantizers
    low, info = lower_model(model, topo, PRESETS["int8"].resolve(list(topo.layers)), bundle,
                            LowerConfig(epochs=0, max_steps=0), progress=False)
    assert info["output_quantized_layers"] == 0 and info["input_quantized_blocks"] == 0
    assert all(getattr(low.get_submodule(n), "out_act", None) is None for n in topo.names)


class _Payload:
    """A pickle that, when unpickled without restrictions, writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "inside"])
def test_loading_a_crafted_lowered_file_never_runs_its_code(tmp_path, where):
    marker = tmp_path / "pwned"
    blob = _Payload(marker) if where == "top" else {"format": "hirelc-lowered", "version": 2,
                                                     "state_dict": {"x": _Payload(marker)}}
    path = tmp_path / "lowered.pt"
    torch.save(blob, path)
    with pytest.raises(HirelcError, match="holds more than tensors"):
        load_lowered(path)
    assert not marker.exists()


@pytest.mark.parametrize("model_name, preset", [("test_vit", "w4-prune50"), ("test_resnet", "w8-prune30"),
                                               ("test_efficientnet", "w4-prune50"), ("test_convnext", "w8-prune30")])
def test_lowered_file_rebuilds_pruned_models_exactly(tmp_path, lowered, model_name, preset):
    b, layers, m, _ = lowered(model_name, preset)
    path = tmp_path / "lowered.pt"
    save_lowered(path, m, b.cfg, PRESETS[preset], layers, b.topo, FAST)
    back = load_lowered(path)["model"]
    x = torch.randn(4, *b.topo.input_shape[1:])
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_lowered_file_with_nan_weights_is_refused(tmp_path, lowered):
    b, layers, m, _ = lowered("test_resnet", "int8")
    path = tmp_path / "lowered.pt"
    save_lowered(path, m, b.cfg, PRESETS["int8"], layers, b.topo, FAST)
    blob = torch.load(path, weights_only=True)
    k = next(k for k, v in blob["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    blob["state_dict"][k].view(-1)[0] = float("nan")
    torch.save(blob, path)
    with pytest.raises(HirelcError, match="non-finite"):
        load_lowered(path)


def test_lowered_file_loads_in_a_fresh_interpreter(tmp_path, bundle):
    """Rebuilding the model needs timm; loading must not depend on it having been imported already."""
    import subprocess
    import sys

    from hirelc.lower import LowerConfig, lower_model, save_lowered
    from hirelc.models import build_model, model_config
    from hirelc.policy import PRESETS
    from hirelc.topology import build_topology

    cfg = model_config("test_resnet", 10, 1, 32)
    model = build_model(cfg).eval()
    topo = build_topology(model, (1, 1, 32, 32))
    layers = PRESETS["int8"].resolve(list(topo.layers))
    low, _ = lower_model(model, topo, layers, bundle, LowerConfig(epochs=0, max_steps=0), progress=False, probe=ORT_PROBE)
    path = tmp_path / "lowered.pt"
    save_lowered(path, low, cfg, PRESETS["int8"], layers, topo, LowerConfig())
    code = f"from hirelc.lower import load_lowered; print(type(load_lowered({str(path)!r})['model']).__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ResNet"


@pytest.mark.parametrize("val_before,val_after", [(50.0, 40.0), (40.0, 50.0)])
def test_fine_tuning_that_lowers_val_accuracy_is_undone(built, bundle, monkeypatch, val_before, val_after):
    import hirelc.lower.qat as qat

    b = built("test_resnet")
    layers = PRESETS["int8"].resolve(list(b.topo.layers))
    ref, _ = lower_model(b.model, b.topo, layers, bundle, LowerConfig(max_steps=0, calib_batches=2), progress=False, probe=ORT_PROBE)

    def harmful_fit(model, loader, cfg, desc="", progress=True, params=None, **distillation):
        with torch.no_grad():
            for q in quant_layers(model).values():
                q.latent.mul_(-1.0)  # a visible change to every weight
        return {"steps": 3, "loss": 1.0, "wall_s": 0.0}

    scores = iter([val_before, val_after])
    monkeypatch.setattr(qat, "fit", harmful_fit)
    monkeypatch.setattr(qat, "evaluate", lambda model, loader: next(scores))
    low, info = lower_model(b.model, b.topo, layers, bundle, LowerConfig(max_steps=3, calib_batches=2, lr_also=()),
                            progress=False, probe=ORT_PROBE)
    assert info["qat_val_before"] == val_before and info["qat_val_after"] == val_after
    same = all(torch.equal(low.get_submodule(n).qweight, ref.get_submodule(n).qweight) for n in quant_layers(ref))
    assert info["qat_kept"] is (val_after >= val_before)
    assert same is (val_after < val_before)  # undone: exactly the calibrated integers; kept: the changed ones


def test_pruned_channel_counts_match_the_cost_model(built, bundle):
    """lower.prune and cost.kept_shape agree (multiples of 8 on wide layers) so predictions are the files."""
    from hirelc.cost import group_keeps, kept_shape

    b = built("test_resnet")
    layers = PRESETS["w8-prune30"].resolve(list(b.topo.layers))
    m, _ = lower_model(b.model, b.topo, layers, bundle, LowerConfig(epochs=0, calib_batches=1), progress=False, probe=ORT_PROBE)
    keeps = group_keeps(list(b.topo.layers), layers)
    qls = quant_layers(m)
    for s in b.topo.layers:
        out, inn = kept_shape(s, layers, keeps)
        assert tuple(qls[s.name].qweight.shape[:2]) == (out, inn), s.name
        if s.out_features >= 32 and s.out_features % 8 == 0:
            assert out % 8 == 0, s.name


def test_per_group_scales_need_4_bits_or_fewer(built):
    """ONNX Runtime fuses 8-bit blocked weights into kernels that take per-channel scales only, then fails."""
    b = built("test_resnet")
    spec = b.topo.layers[4]
    assert spec.in_features % 16 == 0
    with pytest.raises(HirelcError, match="per-group scales need 2..4-bit weights"):
        Policy.from_layers({spec.name: LayerPolicy(bits=6, granularity=PerGroup(16))}).resolve(list(b.topo.layers))
    assert Policy.from_layers({spec.name: LayerPolicy(bits=4, granularity=PerGroup(16))}).resolve(
        list(b.topo.layers))[spec.name].granularity == PerGroup(16)
    # a blanket default falls back to per-channel where it cannot apply
    blanket = Policy(default=LayerPolicy(bits=8, granularity=PerGroup(16))).resolve(list(b.topo.layers))
    assert all(not isinstance(lp.granularity, PerGroup) for lp in blanket.values())


def test_quantizer_placement_is_remembered_per_format_and_matches_the_probe(built, bundle):
    """Policies of the same layer formats (bits within a container, keep ratios may differ) get their
    quantizers where the ONNX Runtime probes put them, so a remembered placement is the probed one."""
    from hirelc.lower import LowerConfig, lowered_structure, placement_key
    from hirelc.policy import LayerPolicy, Policy

    b = built("test_resnet")
    cfg = LowerConfig(epochs=0, max_steps=0, calib_batches=1)
    a = Policy(default=LayerPolicy(bits=8)).resolve(list(b.topo.layers))
    c = Policy(default=LayerPolicy(bits=6, keep_ratio=0.5)).resolve(list(b.topo.layers))
    assert placement_key(a) == placement_key(c)
    probed = {k: lowered_structure(lower_model(b.model, b.topo, p, bundle, cfg, progress=False, probe=ORT_PROBE)[0])
              for k, p in (("a", a), ("c", c))}
    assert probed["a"] == probed["c"] and probed["a"]["output_quantized"]
    cache: dict = {}
    first = lower_model(b.model, b.topo, a, bundle, cfg, progress=False, probe=ORT_PROBE, placement=cache)[0]
    second = lower_model(b.model, b.topo, c, bundle, cfg, progress=False, probe=ORT_PROBE, placement=cache)[0]
    assert len(cache) == 1
    assert lowered_structure(first) == lowered_structure(second) == probed["c"]
    w4 = Policy(default=LayerPolicy(bits=4)).resolve(list(b.topo.layers))
    assert placement_key(w4) != placement_key(a)


def test_the_fine_tune_keeps_the_learning_rate_that_validates_best(built, bundle):
    """With other rates to try, every run starts from the same calibrated model and seed, and the one kept is the
    run at the rate whose validation accuracy was highest: bit for bit what a lowering at that rate alone gives."""
    b = built("test_resnet")
    layers = PRESETS["w4-prune50"].resolve(list(b.topo.layers))
    both = LowerConfig(max_steps=6, calib_batches=2, batch_size=16, lr=2e-5, lr_also=(5e-3,), bn_batches=2)
    low, info = lower_model(b.model, b.topo, layers, bundle, both, progress=False, probe=ORT_PROBE)
    tried = info["qat_lr_tried"]
    assert [t["lr"] for t in tried] == [2e-5, 5e-3]
    best = max(tried, key=lambda t: t["val_after"])  # the first of equals
    assert info["qat_lr"] == best["lr"] and info["qat_val_after"] == best["val_after"]
    alone, one = lower_model(b.model, b.topo, layers, bundle, dataclasses.replace(both, lr=best["lr"], lr_also=()),
                             progress=False, probe=ORT_PROBE)
    assert one["qat_lr_tried"] is None and one["qat_val_after"] == best["val_after"]
    for n in quant_layers(alone):
        assert torch.equal(low.get_submodule(n).qweight, alone.get_submodule(n).qweight), n
    # no validation check: only the configured rate runs
    _, unchecked = lower_model(b.model, b.topo, layers, bundle, dataclasses.replace(both, keep_best=False),
                               progress=False, probe=ORT_PROBE)
    assert unchecked["qat_lr"] == 2e-5 and unchecked["qat_lr_tried"] is None


def test_other_learning_rates_must_be_positive_numbers():
    assert LowerConfig(lr_also=[1e-4, 5e-4]).lr_also == (1e-4, 5e-4)  # as read back from JSON
    assert LowerConfig(lr_also=1e-4).lr_also == (1e-4,)
    for bad in ((0.0,), (float("nan"),), ("fast",)):
        with pytest.raises(HirelcError, match="--lr-also"):
            LowerConfig(lr_also=bad)
