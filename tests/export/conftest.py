"""Fixtures for the export tests: lowered tiny timm models (cached for the session) and a toy QDQ model."""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

from hirelc.lower import LowerConfig, calibrate, freeze, lower_model, swap_quantized
from hirelc.policy import PRESETS, LayerPolicy

# No QAT: lowering is prune + fold + quantize + calibrate (2 batches); enough for graph and parity checks.
FAST = LowerConfig(epochs=0, max_steps=0, batch_size=64, calib_batches=2)


class Lowered(NamedTuple):
    built: object  # conftest.Built: cfg, fp32 model, topology
    layers: dict
    model: nn.Module
    info: dict


@pytest.fixture(scope="session")
def lower(built, bundle) -> Callable[..., Lowered]:
    """``lower(model_name, preset, **LowerConfig overrides)`` -> Lowered, cached for the session."""
    cache: dict = {}

    def get(name: str, preset: str, **overrides) -> Lowered:
        key = (name, preset, tuple(sorted(overrides.items())))
        if key not in cache:
            b = built(name)
            layers = PRESETS[preset].resolve(list(b.topo.layers))
            cfg = LowerConfig(**{**FAST.__dict__, **overrides})
            m, info = lower_model(b.model, b.topo, layers, bundle, cfg, progress=False)
            cache[key] = Lowered(b, layers, m, info)
        return cache[key]

    return get


TOY_SHAPE = (1, 1, 16, 16)
TOY_QUANT = ("2", "6", "8")  # conv 32->32 (I=32), linear 32->64, linear 64->10; "0" (1->32 conv) stays float


def toy_model(lp: LayerPolicy, act_signed: bool = False, act_quant: bool = True) -> nn.Module:
    """Conv(float) -> Conv -> pool -> Linear -> Linear with ``lp`` on the last three, calibrated and frozen."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()
    swap_quantized(m, {n: lp for n in TOY_QUANT}, act_signed=act_signed)
    if act_quant:
        calibrate(m, [torch.randn(16, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(1))])
    freeze(m)
    return m


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, lower, bundle):
    """A run directory by hand: fp32.onnx, ort_int8.onnx, model.onnx, lowered.pt, lower_report.json (test_resnet)."""
    from hirelc import runs
    from hirelc.export import export_fp32, export_lowered, ort_int8_baseline
    from hirelc.lower import save_lowered

    rd = tmp_path_factory.mktemp("run")
    low = lower("test_resnet", "int8")
    shape = (1, 1, 32, 32)
    export_fp32(low.built.model, shape, rd / runs.FP32_ONNX)
    export_lowered(low.model, shape, rd / runs.HIRELC_ONNX)
    ort_int8_baseline(rd / runs.FP32_ONNX, rd / runs.ORT_INT8_ONNX, bundle.train.x[:64].numpy())
    save_lowered(rd / runs.LOWERED_MODEL, low.model, low.built.cfg, PRESETS["int8"], low.layers, low.built.topo, FAST)
    runs.atomic_write_json(rd / runs.LOWER_REPORT, low.info)
    return rd
