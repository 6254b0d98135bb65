"""Grouped convolutions (groups > 1, not depthwise: RegNet, ResNeXt) are kept whole by pruning.

torch-pruning slices a grouped conv's per-group input weights with whole-layer indices ("INDICES element is
out of DATA bounds") and never changes its ``groups``, so hirelc's topology marks every prune group a grouped
conv writes or reads as not prunable; search, policy resolution, cost model and lowering then agree, and the
lowering report names those layers (``unprunable_grouped``). Depthwise convs and the other groups still prune.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from hirelc.cost import group_keeps, kept_shape
from hirelc.errors import HirelcError
from hirelc.export import ORT_PROBE
from hirelc.lower import LowerConfig, lower_model, prune
from hirelc.policy import PRESETS, LayerPolicy, Policy
from hirelc.qmodules import quant_layers
from hirelc.topology import build_topology

SHAPE = (1, 1, 32, 32)
FAST = LowerConfig(epochs=0, max_steps=0, batch_size=64, calib_batches=2)  # Taylor ranking, as `hirelc lower`
GROUPED = ["blocks.0.conv1", "blocks.0.conv2"]  # conv1 feeds the grouped conv2; conv2 is one


class GroupedBottleneck(nn.Module):
    """RegNet/ResNeXt-style: 1x1 -> grouped 3x3 (group width 8) -> 1x1, BatchNorms, residual add."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(x + self.bn3(self.conv3(y)))


class InvertedResidual(nn.Module):
    """MobileNet-style: 1x1 expand -> depthwise 3x3 -> 1x1 project, residual add (depthwise still prunes)."""

    def __init__(self, c: int, e: int):
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.pw2, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.pw1(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        return x + self.bn3(self.pw2(y))


class TinyGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(GroupedBottleneck(32, groups=4), InvertedResidual(32, 64))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = TinyGrouped()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding and ranking are exercised
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def tiny():
    m = _tiny()
    return m, build_topology(m, SHAPE)


@pytest.fixture(scope="module")
def lowered(tiny, bundle):
    m, topo = tiny
    layers = PRESETS["w4-prune50"].resolve(list(topo.layers))
    cfg = LowerConfig(**{**FAST.__dict__, "bn_batches": 0})  # see test_ort_matches_pytorch: untrained toy
    low, info = lower_model(m, topo, layers, bundle, cfg, progress=False, probe=ORT_PROBE)
    return topo, layers, low, info


def test_groups_a_grouped_conv_writes_or_reads_are_not_prunable(tiny):
    _, topo = tiny
    assert topo.unprunable_grouped == GROUPED
    for name in GROUPED:
        s = topo.spec(name)
        assert s.grouped_tied and not s.prunable and s.prune_group == -1
    # conv3 reads the grouped conv's outputs: its inputs stay whole (no input group to shrink them)
    assert topo.spec("blocks.0.conv3").input_group == -1
    # the rest still prunes: the residual stream (stem + both blocks' last convs) and the depthwise group
    assert topo.spec("stem.0").prunable and topo.spec("stem.0").stream
    assert topo.spec("blocks.1.pw1").prunable
    assert topo.spec("blocks.1.dw").prune_group == topo.spec("blocks.1.pw1").prune_group
    assert not any(s.grouped_tied for s in topo.layers if s.name not in GROUPED)


def test_policy_and_search_offer_no_cut_on_grouped_layers(tiny):
    from hirelc.search.space import Constraints, valid_mask

    _, topo = tiny
    layers = PRESETS["w4-prune50"].resolve(list(topo.layers))
    assert all(layers[n].keep_ratio == 1.0 for n in GROUPED)
    assert layers["stem.0"].keep_ratio == 0.5 and layers["blocks.1.pw1"].keep_ratio == 0.5
    with pytest.raises(HirelcError, match="blocks.0.conv1"):
        Policy(rules=(("blocks.0.conv1", LayerPolicy(bits=8, keep_ratio=0.5)),)).resolve(list(topo.layers))
    c = Constraints(bits=(8, 4), keeps=(1.0, 0.75, 0.5), group_sizes=())
    for name in GROUPED:
        assert valid_mask(topo.spec(name), c)[1].tolist() == [True, False, False]
    assert valid_mask(topo.spec("blocks.1.pw1"), c)[1].all()


def test_lowered_grouped_model_runs_and_matches_the_cost_model(tiny, lowered):
    m, _ = tiny
    topo, layers, low, info = lowered
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert low(x).shape == m(x).shape == (4, 10)
    conv2 = quant_layers(low)["blocks.0.conv2"]
    assert conv2.groups == 4 and tuple(conv2.qweight.shape) == (32, 8, 3, 3)  # untouched group structure
    keeps = group_keeps(list(topo.layers), layers)
    qls = quant_layers(low)
    for s in topo.layers:
        assert tuple(qls[s.name].qweight.shape[:2]) == kept_shape(s, layers, keeps), s.name
    assert info["removed_channels"] == {"stem.0": 16, "blocks.1.pw1": 32}
    assert info["unprunable_grouped"] == GROUPED
    assert info["effective_ratio"] == pytest.approx(info["predicted_effective_ratio"], rel=1e-9)
    assert info["storage_bits"] == sum(q.storage_bits() for q in qls.values())


@pytest.mark.ort
def test_exported_grouped_model_matches_pytorch(tmp_path, lowered, bundle):
    import onnx

    from hirelc.export import export_lowered, make_session, ort_predict

    _, _, low, _ = lowered
    path = tmp_path / "model.onnx"
    export_lowered(low, SHAPE, path)
    graph = onnx.load(path).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    # the grouped conv is in the file whole: 4 groups of 8 channels (no silent cut to 4 groups of 4)
    assert dims["blocks.0.conv2.qweight.int4"] == [32, 8, 3, 3]
    assert dims["blocks.0.conv1.qweight.int4"] == [32, 16, 1, 1]  # reads the pruned stream, writes 32
    groups = sorted({a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"})
    assert 4 in groups
    x = bundle.test.x[:128]
    with torch.no_grad():
        ref = low(x).numpy()
    got = ort_predict(make_session(path), x.numpy(), batch_size=64)
    diff, scale = np.abs(got - ref), np.abs(ref).max()
    assert diff.max() <= 0.05 * scale, (diff.max(), scale)
    assert diff.mean() <= 3e-3 * scale, (diff.mean(), scale)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_prune_refuses_a_grouped_group_from_a_foreign_topology(tiny):
    """A topology that marks a grouped conv's group prunable (not built from this model) is a one-line error,
    raised before anything is cut (today's torch-pruning silently takes the wrong weights on this model)."""
    m, topo = tiny
    specs = [dataclasses.replace(s, prunable=True, prune_group=99, grouped_tied=False)
             if s.name == "blocks.0.conv1" else s for s in topo.layers]
    stale = dataclasses.replace(topo, layers=tuple(specs))
    layers = {s.name: LayerPolicy(bits=8, keep_ratio=0.5) for s in specs}  # stem and pw1 groups too
    work = copy.deepcopy(m)
    with pytest.raises(HirelcError, match="grouped conv 'blocks.0.conv2'"):
        prune(work, stale, layers)
    assert all(torch.equal(a, b) for a, b in zip(work.state_dict().values(), m.state_dict().values(), strict=True))


def test_regnet_w4_prune50_prunes_and_matches_the_cost_model(built):
    """The reported case: timm regnetx_002 (group width 8) under w4-prune50."""
    b = built("regnetx_002")
    names = b.topo.unprunable_grouped
    assert "s1.b1.conv1.conv" in names and "s1.b1.conv2.conv" in names
    assert all(b.topo.spec(n).kind != "dwconv" for n in names)
    layers = PRESETS["w4-prune50"].resolve(list(b.topo.layers))
    m = copy.deepcopy(b.model)
    removed = prune(m, b.topo, layers, None, None)
    assert removed and set(removed) <= {s.name for s in b.topo.layers if s.prunable}
    with torch.no_grad():
        assert m(torch.zeros(2, *SHAPE[1:])).shape == (2, 10)
    keeps = group_keeps(list(b.topo.layers), layers)
    for s in b.topo.layers:
        w = m.get_submodule(s.name).weight
        assert tuple(w.shape[:2]) == kept_shape(s, layers, keeps), s.name
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            assert mod.in_channels % mod.groups == 0 and mod.out_channels % mod.groups == 0
            assert mod.weight.shape[1] == mod.in_channels // mod.groups


@pytest.mark.slow
def test_regnet_w4_prune50_end_to_end_through_verify(tmp_path):
    """train -> lower (w4-prune50) -> export -> ORT int8 -> verify on regnetx_002: the gate's parity check passes
    and the lowering report names the grouped layers it kept whole."""
    import json

    from hirelc import runs
    from hirelc.pipeline import CompressConfig, DataOptions, compress

    rd = tmp_path / "regnet"
    report = compress(CompressConfig(run_dir=str(rd), model="regnetx_002", data=DataOptions(
        spec="fashion-mnist-mini", max_train=300), train_epochs=1, policy="w4-prune50", qat_epochs=0.05,
        verify_runs=2), progress=False, echo=lambda s: None)
    assert report["gate"]["passed"] and report["parity"]["top1_agreement"] >= 98.0
    lower = json.loads((rd / runs.LOWER_REPORT).read_text())
    assert "s1.b1.conv2.conv" in lower["unprunable_grouped"]
    assert lower["effective_ratio"] == pytest.approx(lower["predicted_effective_ratio"], rel=1e-6)
