"""Training and evaluation loops: the fp32 baseline and quantization-aware fine-tuning share them."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.models import ModelConfig, build_model, load_checkpoint
from hirelc.options import TrainConfig  # noqa: F401 (part of this API)

CNN_LR, VIT_LR = 2e-3, 1e-3
DISTILL_TEMPERATURE = 2.0  # softens both outputs in distillation (fit's default)


def default_lr(model_cfg) -> float:
    """The AdamW peak learning rate of a baseline when none is given. Vision Transformers get half the CNNs'
    rate: deit_tiny (patch 8) on the embedded subset, 4 epochs, reached 51.3 / 62.5 / 58.5 % validation accuracy
    at 2e-3 / 1e-3 / 5e-4."""
    return VIT_LR if "patch_size" in model_cfg.kwargs else CNN_LR


def set_threads() -> None:
    """Use every core for intra-op work (the machine is small; oversubscription only hurts)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # (B, C, H, W)
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = xp[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.reshape(b, 1, 1, 1), x.flip(3), x)


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit(model: nn.Module, loader, cfg: TrainConfig, desc: str = "train", progress: bool = True,
        params: list[nn.Parameter] | None = None, state_path: str | Path | None = None,
        state_key: dict | None = None, save_every_s: float = 120.0, teacher: nn.Module | None = None,
        distill: float = 0.0, temperature: float = DISTILL_TEMPERATURE) -> dict:
    """Train with AdamW + warm-up/cosine schedule; returns loss and wall-time figures.

    With ``distill > 0`` the loss is ``(1 - distill) * CE(labels) + distill * T^2 * KL(teacher || model)`` on
    outputs softened by ``T = temperature``; ``teacher`` (run in eval mode, no gradients) sees the same augmented
    batch as the model.

    With ``state_path`` the whole training state (weights, optimizer, schedule, step, data order and
    augmentation RNGs) is written there atomically every ``save_every_s`` seconds and at every epoch's end;
    a later call with the same ``state_key`` continues from it and ends on the same weights as an
    uninterrupted run. A state file with another key is ignored (and overwritten).
    """
    if not 0.0 <= distill <= 1.0 or (distill > 0 and teacher is None) or not temperature > 0:
        raise HirelcError(f"distillation needs a teacher, a weight in [0, 1] and a positive temperature "
                          f"(weight {distill}, temperature {temperature})")
    kd = (teacher.eval(), distill, temperature) if distill > 0 else None
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr if cfg.lr is not None else CNN_LR, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps == 0:
        return {"steps": 0, "loss": float("nan"), "wall_s": 0.0}
    warm = max(1, int(cfg.warmup_frac * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    step, ema, wall_before, skip, resumed_at, replay = 0, None, 0.0, 0, None, None
    order = getattr(loader, "generator", None)  # the shuffling RNG of the data order, if any
    epoch_order = None  # its state at the start of the current epoch
    path = Path(state_path) if state_path is not None else None
    key = {"key": state_key, "steps": steps, "params": [list(p.shape) for p in params]}
    state = _load_state(path, key)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, ema, wall_before, skip = state["step"], state["ema"], state["wall_s"], state["batch_in_epoch"]
        replay, resumed_at = state["epoch_order"], state["step"]
        if progress:
            tqdm.write(f"{desc}: resuming at step {step}/{steps} from {path}")

    def save(batch_in_epoch: int) -> None:
        runs.atomic_torch_save({
            "format": TRAIN_STATE_FORMAT, **key, "step": step, "ema": ema, "batch_in_epoch": batch_in_epoch,
            "wall_s": wall_before + time.time() - t0, "model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "aug_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch_order": epoch_order,
        }, path)

    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress, unit="step", leave=False)
    # channels-last convolutions are ~15 % faster on this CPU class; the model goes back to the default
    # layout afterwards so checkpoints and exports see ordinary contiguous tensors.
    model.to(memory_format=torch.channels_last)
    model.train()
    last_save = time.time()
    while step < steps:
        if order is not None:
            if replay is not None:  # resuming: this epoch's data order as it was, then skip what was done
                order.set_state(replay)
                replay = None
            epoch_order = order.get_state()
        for i, (x, y) in enumerate(loader, start=1):
            if i <= skip:
                continue
            ema = _train_step(model, opt, sched, params, x, y, gen, cfg, ema, step, kd)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
            if path is not None and time.time() - last_save >= save_every_s and step < steps:
                save(i)
                last_save = time.time()
            if step >= steps:
                break
        skip = 0
        if path is not None and step < steps:
            if order is not None:
                epoch_order = order.get_state()  # an epoch's end: the next one starts from here
            save(0)
            last_save = time.time()
    bar.close()
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return {"steps": step, "loss": ema, "wall_s": wall_before + time.time() - t0, "resumed_at_step": resumed_at}


TRAIN_STATE_FORMAT = 1


def _load_state(path: Path | None, key: dict) -> dict | None:
    """The saved state of this very training, or None (no file, unreadable, or another training's)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # a torn or foreign file: this training starts afresh and overwrites it
        return None
    if state.get("format") != TRAIN_STATE_FORMAT or any(state.get(k) != v for k, v in key.items()):
        return None
    return state


def _train_step(model, opt, sched, params, x, y, gen, cfg: TrainConfig, ema, step: int,
                kd: tuple[nn.Module, float, float] | None = None) -> float:
    if cfg.augment:
        x = _augment(x, gen)
    x = x.contiguous(memory_format=torch.channels_last)
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if kd is not None:
        teacher, weight, t = kd
        with torch.no_grad():
            target = teacher(x)
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                        reduction="batchmean") * t * t
        loss = (1 - weight) * loss + weight * soft
    if not torch.isfinite(loss):
        raise HirelcError(f"training diverged at step {step} (loss {loss.item()}): try a lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    sched.step()
    return loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()


def train_baseline(run_dir: str | Path, model_cfg, bundle, cfg: TrainConfig, progress: bool = True,
                   checkpoint: str | Path | None = None) -> dict:
    """Train (or reuse) the fp32 baseline of a run directory; returns its metadata.

    A second call with the same model, data fingerprint and training config reuses the checkpoint.
    ``checkpoint`` loads given weights instead of training (``epochs`` is then ignored).
    """
    if cfg.lr is None:
        cfg = replace(cfg, lr=default_lr(model_cfg))

    rd = Path(run_dir)
    meta_path, ckpt_path = rd / runs.BASELINE_META, rd / runs.BASELINE_CKPT
    key = {
        "model": model_cfg.to_dict(),
        "data_fingerprint": bundle.fingerprint,
        "train": asdict(cfg),
        "init_checkpoint": runs.file_digest(checkpoint) if checkpoint else None,  # by content, not by path
    }
    if meta_path.exists() and ckpt_path.exists():
        meta = runs.read_json(meta_path, "baseline metadata")
        if meta.get("key") == key:
            meta["reused"] = True
            return meta
        if meta.get("key", {}).get("data_fingerprint") != bundle.fingerprint or meta.get("key", {}).get(
            "model"
        ) != model_cfg.to_dict():
            raise HirelcError(
                f"{rd} already holds a baseline for another model or dataset; use a new --run-dir"
            )
    set_threads()
    model = build_model(model_cfg)
    t0 = time.time()
    if checkpoint:
        load_checkpoint(model, checkpoint)
        stats = {"steps": 0, "loss": None, "wall_s": 0.0}
    else:
        stats = fit(model, bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed), cfg,
                    desc="baseline", progress=progress, state_path=rd / runs.BASELINE_STATE, state_key=key)
    val = evaluate(model, bundle.loader("val", 256))
    test = evaluate(model, bundle.loader("test", 256))
    meta = {
        "key": key,
        "model": model_cfg.to_dict(),
        "data": bundle.describe(),
        "params": sum(p.numel() for p in model.parameters()),
        "val_acc": val,
        "test_acc": test,
        "train_wall_s": round(stats["wall_s"], 2),
        "total_wall_s": round(time.time() - t0, 2),
        "final_loss": stats["loss"],
        "resumed_at_step": stats.get("resumed_at_step"),
        "reused": False,
    }
    runs.atomic_torch_save(model.state_dict(), ckpt_path)
    runs.atomic_write_json(meta_path, meta)
    (rd / runs.BASELINE_STATE).unlink(missing_ok=True)
    return meta


def load_baseline(run_dir: str | Path):
    """(model, ModelConfig, metadata) of a run directory's trained baseline."""
    rd = runs.require_run_dir(run_dir, runs.BASELINE_META, runs.BASELINE_CKPT)
    meta = runs.read_json(rd / runs.BASELINE_META, "baseline metadata")
    try:
        mcfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise HirelcError(f"{rd / runs.BASELINE_META} is corrupt: {e}") from None
    model = build_model(mcfg)
    load_checkpoint(model, rd / runs.BASELINE_CKPT)
    model.eval()
    return model, mcfg, meta
