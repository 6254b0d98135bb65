"""Fixtures for the export tests: lowered tiny timm models and a hand-made run directory (session-cached)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
from export_toys import FAST
from torch import nn

from hirelc.export import ORT_PROBE
from hirelc.lower import LowerConfig, lower_model
from hirelc.policy import PRESETS


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
            m, info = lower_model(b.model, b.topo, layers, bundle, cfg, progress=False, probe=ORT_PROBE)
            cache[key] = Lowered(b, layers, m, info)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, lower, bundle):
    """A run directory by hand: fp32.onnx, ort_int8.onnx, model.onnx, lowered.pt, lower_report.json (test_resnet).
    Shared by the session: read it, or copy it before anything writes into it (verify writes its report)."""
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
