"""Shared, session-scoped fixtures: the embedded tiny dataset and tiny timm models with their topologies.

Everything here is built once per session; a test that changes a model must ``copy.deepcopy`` it first.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
from torch import nn

from hirelc.data import DataBundle, load_data
from hirelc.models import ModelConfig, build_model, model_config
from hirelc.topology import Topology, build_topology

IMG = 32  # every tiny model runs on (1, 1, 32, 32) inputs with 10 classes
INPUT_SHAPE = (1, 1, IMG, IMG)


class Built(NamedTuple):
    cfg: ModelConfig
    model: nn.Module
    topo: Topology


@pytest.fixture(scope="session")
def bundle() -> DataBundle:
    """fashion-mnist-mini at 32x32, training split capped at 300 images (fast loaders)."""
    return load_data("fashion-mnist-mini", img_size=IMG, max_train=300)


@pytest.fixture(scope="session")
def built() -> Callable[[str], Built]:
    """``built(name)``: (config, eval-mode model, topology) of a timm model, cached for the session."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cfg = model_config(name, 10, 1, IMG)
            model = build_model(cfg).eval()
            cache[name] = Built(cfg, model, build_topology(model, INPUT_SHAPE))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished `compress` run directory (test_resnet, int8 preset, 300 training images), shared by the
    reliability, bad-input and release-gate tests: read it, or copy it before changing anything."""
    from hirelc.pipeline import CompressConfig, DataOptions, compress

    rd = tmp_path_factory.mktemp("tiny-run") / "run"
    compress(CompressConfig(run_dir=str(rd), model="test_resnet", data=DataOptions(spec="fashion-mnist-mini",
             max_train=300), train_epochs=1, policy="int8", qat_epochs=0.05, verify_runs=2),
             progress=False, echo=lambda s: None)
    return rd
