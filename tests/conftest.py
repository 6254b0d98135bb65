"""Shared fixtures: the embedded tiny dataset, tiny timm models with their topologies, finished tiny run
directories, the search effort of the end-to-end tests and hand-made bench / ablation reports.

Session fixtures are built once; a test that changes a model must ``copy.deepcopy`` it first, and one that writes
into a shared run directory must copy it first (``copy_run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from torch import nn

from hirelc.data import DataBundle, load_data
from hirelc.models import ModelConfig, build_model, model_config
from hirelc.topology import Topology, build_topology

IMG = 32  # every tiny model runs on (1, 1, 32, 32) inputs with 10 classes
INPUT_SHAPE = (1, 1, IMG, IMG)

# SearchConfig overrides for a search of seconds: 2 warm-up and 1 cycle evaluation, a few RL steps per agent.
TINY_SEARCH = {"cycles": 1, "warmup_real_evals": 2, "real_evals_per_cycle": 1, "candidates_per_cycle": 2,
               "hla_timesteps": 8, "lla_timesteps": 16, "lla_episode_len": 4, "min_surrogate_points": 2,
               "surrogate_members": 2}


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


@pytest.fixture(scope="module")
def tiny_search() -> dict:
    """The tiny search effort (``TINY_SEARCH``), a fresh dict for every test module."""
    return dict(TINY_SEARCH)


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory) -> Path:
    """A run directory holding a trained test_resnet baseline (20 steps on 300 images) with what every study
    measures on it first: its graph bytes and ONNX Runtime latency table. Shared by the bench and ablation tests:
    read it, or copy it before anything writes into it."""
    from hirelc.pipeline import DataOptions, load_or_measure_graph_bytes, prepare_latency, train_stage
    from hirelc.train import TrainConfig, load_baseline

    rd = tmp_path_factory.mktemp("baseline") / "r"
    train_stage(rd, "test_resnet", DataOptions(spec="fashion-mnist-mini", max_train=300),
                TrainConfig(epochs=1, max_steps=20), progress=False)
    model, mcfg, _ = load_baseline(rd)
    topo = build_topology(model, INPUT_SHAPE)
    load_or_measure_graph_bytes(rd, model, topo)
    prepare_latency(rd, model, mcfg, topo, reference=False, progress=False)
    return rd


def copy_tree(src: Path, dst: Path) -> Path:
    """``dst``, a copy of the run directory ``src`` (files copied, never hard-linked back to it)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def copy_run(tmp_path) -> Callable[..., Path]:
    """``copy_run(src, name="run")``: a copy of a shared run directory under this test's tmp_path, to change."""
    return lambda src, name="run": copy_tree(Path(src), tmp_path / name)


@pytest.fixture(scope="module")
def copy_run_module(tmp_path_factory) -> Callable[..., Path]:
    """``copy_run_module(src, name)``: like ``copy_run``, for module-scoped fixtures."""
    return lambda src, name="run": copy_tree(Path(src), tmp_path_factory.mktemp(name) / "r")


@pytest.fixture(scope="session")
def onnx_top1() -> Callable:
    """``onnx_top1(path, x, y)``: top-1 % of an ONNX file on images ``x`` (numpy), from its logits' argmax
    against the labels ``y``, computed here rather than by the code under test."""
    import numpy as np

    from hirelc.export import make_session, ort_predict

    def top1(path, x, y) -> float:
        logits = ort_predict(make_session(path), np.asarray(x, dtype=np.float32))
        assert logits.shape == (len(y), 10)
        return float(100.0 * (logits.argmax(1) == np.asarray(y)).mean())

    return top1


# ---------------------------------------------------------------- hand-made bench / ablation reports


def _row(top1, nbytes, b1, b8, eff, evals=None, wall=None):
    return {"file": "x.onnx", "top1": top1, "bytes": nbytes, "effective_ratio": eff,
            "latency_ms": {"1": b1, "8": b8}, "search_wall_s": wall, "real_evals": evals}


def _bench_report() -> dict:
    rows = {
        "fp32": _row(90.0, 40_000_000, 2.0, 8.0, 1.0),
        "ort-int8": _row(89.8, 10_000_000, 2.4, 9.6, 4.0),
        "uniform-w4": _row(88.0, 6_000_000, 5.0, 20.0, 7.9),
        "uniform-int8": _row(89.5, 10_500_000, 2.3, 9.0, 4.0),
        "prune-int8": _row(87.0, 4_000_000, 1.2, 4.5, 11.0),
        "random": _row(88.5, 4_100_000, 1.5, 5.0, 10.5, evals=9, wall=300.0),
        "hirelc": _row(89.2, 3_900_000, 1.1, 4.4, 11.5, evals=9, wall=320.0),
    }
    for r in rows.values():
        r["size_ratio"] = rows["fp32"]["bytes"] / r["bytes"]
        r["speedup_vs_fp32"] = {b: rows["fp32"]["latency_ms"][b] / v for b, v in r["latency_ms"].items()}
        r["speedup_vs_ort_int8"] = {b: rows["ort-int8"]["latency_ms"][b] / v for b, v in r["latency_ms"].items()}
    return {"created": "2026-11-25T18:00:00+00:00", "run_dir": "runs/r18", "model": {"name": "resnet18"},
            "data": {"name": "fashion-mnist"}, "build_wall_s": 1.0, "methods": rows,
            "config": {"target_ratio": 8.0, "max_latency_ms": 4.93, "preset": "quick", "qat_epochs": 1.0,
                       "runs": 50, "batch_sizes": [1, 8], "seed": 0}}


def _ablation_report() -> dict:
    from hirelc.studies.ablate import mean_std

    runs_ = [{"variant": v, "seed": s, "final_top1": 85.0 + s, "best_val": 84.0, "effective_ratio": 10.0,
              "real_evals": 9, "evals_to_best": 3, "search_wall_s": 300.0, "surrogate_spearman": 0.1,
              "surrogate_points": []} for v in ("full", "no-surrogate") for s in (0, 1, 2)]
    summary = {v: {m: mean_std([r[m] for r in runs_ if r["variant"] == v])
                   for m in ("final_top1", "best_val", "effective_ratio", "evals_to_best", "search_wall_s",
                             "real_evals")} for v in ("full", "no-surrogate")}
    return {"created": "2026-11-25T19:00:00+00:00", "run_dir": "runs/r18_abl", "model": {"name": "resnet18"},
            "baseline_test_acc": 87.41, "runs": runs_, "summary": summary, "surrogate": {"points": 0, "spearman": None},
            "config": {"target_ratio": 8.0, "preset": "quick", "seeds": [0, 1, 2],
                       "variants": ["full", "no-surrogate"], "qat_epochs": 0.1}}


@pytest.fixture
def bench_report() -> Callable[[], dict]:
    """``bench_report()``: a fresh hand-made bench.json of seven methods (resnet18, 8x budget, 4.93 ms)."""
    return _bench_report


@pytest.fixture
def ablation_report() -> Callable[[], dict]:
    """``ablation_report()``: a fresh hand-made ablation.json (full and no-surrogate, three seeds each)."""
    return _ablation_report
