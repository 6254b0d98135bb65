"""Stages of a run directory, each one function the CLI calls: train -> (search) -> lower -> export ->
baseline -> verify, plus :func:`compress`, which chains them with ``--resume``.

The data a run was trained on is recorded in ``run_config.json`` by :func:`train_stage`; later stages
reload exactly that data from it, so ``hirelc lower --run-dir R`` needs no data options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hirelc import runs
from hirelc.errors import HirelcError


@dataclass(frozen=True)
class DataOptions:
    spec: str = "fashion-mnist"
    data_dir: str | None = None
    img_size: int = 32
    val_fraction: float = 0.1
    seed: int = 0
    max_train: int | None = None


def load_bundle(opts: DataOptions, in_chans: int | None = None):
    from hirelc.data import load_data

    return load_data(opts.spec, data_dir=opts.data_dir, img_size=opts.img_size, in_chans=in_chans,
                     val_fraction=opts.val_fraction, seed=opts.seed, max_train=opts.max_train)


def run_bundle(run_dir: str | Path):
    """The data bundle a run directory was trained on (from its run_config.json)."""
    rd = runs.require_run_dir(run_dir, runs.CONFIG)
    cfg = runs.read_json(rd / runs.CONFIG, "run config")
    try:
        opts = DataOptions(**cfg["data"])
        in_chans = int(cfg["model"]["in_chans"])
    except (KeyError, TypeError) as e:
        raise HirelcError(f"{rd / runs.CONFIG} is corrupt: {e}") from None
    return load_bundle(opts, in_chans)


def train_stage(run_dir: str | Path, model: str, data: DataOptions, train_cfg, *, patch_size: int | None = None,
                in_chans: int | None = None, checkpoint: str | None = None, progress: bool = True) -> dict:
    """Train (or reuse) the fp32 baseline and record the run's data and model options."""
    from hirelc.models import model_config
    from hirelc.train import train_baseline

    if checkpoint and not Path(checkpoint).is_file():
        raise HirelcError(f"checkpoint not found: {checkpoint}")
    bundle = load_bundle(data, in_chans)
    mcfg = model_config(model, bundle.num_classes, bundle.in_chans, data.img_size, patch_size)
    rd = Path(run_dir)
    if (rd / runs.CONFIG).exists():
        old = runs.read_json(rd / runs.CONFIG, "run config")
        if old.get("model") != mcfg.to_dict() or old.get("data") != asdict(data):
            raise HirelcError(f"{rd} already holds a run for other model/data options; use a new --run-dir")
    rd.mkdir(parents=True, exist_ok=True)
    meta = train_baseline(rd, mcfg, bundle, train_cfg, progress=progress, checkpoint=checkpoint)
    runs.atomic_write_json(rd / runs.CONFIG, {"model": mcfg.to_dict(), "data": asdict(data)})
    return meta


def lower_stage(run_dir: str | Path, policy_spec: str, lower_cfg, progress: bool = True) -> dict:
    from hirelc.lower import lower_run
    from hirelc.policy import get_policy

    rd = runs.require_run_dir(run_dir, runs.BASELINE_META, runs.BASELINE_CKPT, runs.CONFIG)
    policy = get_policy(policy_spec)
    return lower_run(rd, policy, run_bundle(rd), lower_cfg, progress=progress)


def export_stage(run_dir: str | Path, fp32: bool = False, weight_only: bool = False) -> dict:
    """Write model.onnx from the lowered model (or fp32.onnx from the baseline with ``fp32=True``)."""
    from hirelc.export import export_fp32, export_lowered
    from hirelc.lower import load_lowered
    from hirelc.train import load_baseline

    rd = runs.require_run_dir(run_dir)
    if fp32:
        model, mcfg, _ = load_baseline(rd)
        return export_fp32(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size), rd / runs.FP32_ONNX)
    blob = load_lowered(rd / runs.LOWERED_MODEL)
    mc = blob["model_config"]
    return export_lowered(blob["model"], (1, mc["in_chans"], mc["img_size"], mc["img_size"]), rd / runs.HIRELC_ONNX,
                          weight_only=weight_only)


def ort_int8_stage(run_dir: str | Path, calib_samples: int = 256) -> dict:
    """ONNX Runtime's own static int8 quantization of fp32.onnx, calibrated on the same training data."""
    from hirelc.export import ort_int8_baseline

    rd = runs.require_run_dir(run_dir, runs.CONFIG)
    if not (rd / runs.FP32_ONNX).exists():
        export_stage(rd, fp32=True)
    bundle = run_bundle(rd)
    calib = bundle.subset("train", min(calib_samples, len(bundle.train)), seed=0).x.numpy()
    return ort_int8_baseline(rd / runs.FP32_ONNX, rd / runs.ORT_INT8_ONNX, calib)


def verify_stage(run_dir: str | Path, verify_cfg) -> dict:
    from hirelc.export import verify_run

    rd = runs.require_run_dir(run_dir)
    return verify_run(rd, run_bundle(rd), verify_cfg)


@dataclass(frozen=True)
class CompressOptions:
    model: str = "resnet18"
    data: DataOptions = field(default_factory=lambda: DataOptions(spec="fashion-mnist-mini"))
    policy: str | None = None  # preset/file; None = run the HiReLC search
    target_ratio: float = 8.0
    search_preset: str = "quick"
    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    resume: bool = False


STAGES = ("train", "policy", "lower", "export", "fp32", "ort-int8", "verify")


def stage_done(rd: Path, stage: str) -> bool:
    return {
        "train": (rd / runs.BASELINE_META).exists() and (rd / runs.CONFIG).exists(),
        "policy": (rd / runs.POLICY).exists(),
        "lower": (rd / runs.LOWER_REPORT).exists() and (rd / runs.LOWERED_MODEL).exists(),
        "export": (rd / runs.HIRELC_ONNX).exists(),
        "fp32": (rd / runs.FP32_ONNX).exists(),
        "ort-int8": (rd / runs.ORT_INT8_ONNX).exists(),
        "verify": (rd / runs.REPORT_JSON).exists(),
    }[stage]
