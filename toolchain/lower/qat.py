"""Quantization-aware fine-tuning of a lowered model (straight-through estimator through the quantizers)."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from hirelc.options import LowerConfig
from hirelc.train import TrainConfig, evaluate, fit


def fine_tune(model: nn.Module, bundle, cfg: LowerConfig, progress: bool = True,
              teacher: nn.Module | None = None) -> tuple[dict, bool | None]:
    """Fine-tune ``model`` in place for ``cfg.epochs`` (capped at ``cfg.max_steps``) on the training split,
    distilling from ``teacher`` (the fp32 model) with weight ``cfg.distill``.

    Returns the training record (steps, wall time, loss, and the validation accuracy before / after when
    ``cfg.keep_best``) and whether the fine-tuned weights were kept: ``None`` without a check, ``False`` when
    fine-tuning lowered validation accuracy and the calibrated weights were restored.
    """
    if not (cfg.epochs > 0 or (cfg.max_steps or 0) > 0):
        return {"steps": 0, "wall_s": 0.0, "loss": None}, None
    loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps = int(round(cfg.epochs * len(loader)))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps) if steps else cfg.max_steps
    tcfg = TrainConfig(epochs=max(1, int(-(-steps // len(loader)))), batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=0.0, label_smoothing=0.0, warmup_frac=0.02, seed=cfg.seed, max_steps=steps)
    before = copy.deepcopy(model.state_dict()) if cfg.keep_best else None
    acc_before = evaluate(model, bundle.loader("val", 256)) if cfg.keep_best else None
    record = fit(model, loader, tcfg, desc="QAT fine-tune", progress=progress,
                 teacher=teacher, distill=cfg.distill if teacher is not None else 0.0)
    if not cfg.keep_best:
        return record, None
    acc_after = evaluate(model, bundle.loader("val", 256))
    kept = acc_after >= acc_before
    record.update(val_before=acc_before, val_after=acc_after)
    if not kept:  # a short fine-tune can hurt a well-converged model; the calibrated one stays
        model.load_state_dict(before)
    return record, kept


def fine_tune_best(model: nn.Module, bundle, cfg: LowerConfig, progress: bool = True,
                   teacher: nn.Module | None = None) -> tuple[dict, bool | None]:
    """:func:`fine_tune` at ``cfg.lr`` and at each of ``cfg.lr_also``, every run from the same calibrated weights
    and the same seed; ``model`` ends as the run with the best validation accuracy (ties: the earlier). Without
    ``keep_best`` (no validation check), other rates or any fine-tuning, it is :func:`fine_tune` itself.

    The record is the chosen run's, plus ``lr`` (its rate) and ``lr_tried`` (``[{"lr", "val_after"}]``, in order).
    """
    rates = (cfg.lr, *(lr for lr in cfg.lr_also if lr != cfg.lr))
    if not cfg.keep_best or len(rates) == 1 or not (cfg.epochs > 0 or (cfg.max_steps or 0) > 0):
        record, kept = fine_tune(model, bundle, cfg, progress, teacher)
        return {**record, "lr": cfg.lr}, kept
    start = copy.deepcopy(model.state_dict())
    best: tuple[dict, bool | None, dict] | None = None
    tried = []
    for i, lr in enumerate(rates):
        if i:
            model.load_state_dict(start)
        record, kept = fine_tune(model, bundle, dataclasses.replace(cfg, lr=lr), progress, teacher)
        tried.append({"lr": lr, "val_after": record["val_after"]})
        if best is None or record["val_after"] > best[0]["val_after"]:
            best = ({**record, "lr": lr}, kept, copy.deepcopy(model.state_dict()) if i < len(rates) - 1 else None)
    record, kept, state = best
    if state is not None:
        model.load_state_dict(state)
    return {**record, "lr_tried": tried}, kept
