"""Lowering a whole model: prune, fold BatchNorm, quantize, calibrate, fine-tune, freeze."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from hirelc.lower.fold import fold_batchnorm, recalibrate_batchnorm
from hirelc.lower.prune import channel_saliency, prune, saliency_batches, validate_layers
from hirelc.lower.qat import fine_tune_best
from hirelc.lower.quantize import (
    RuntimeProbe,
    add_block_quantizers,
    add_output_quantizers,
    calibrate,
    freeze,
    place_quantizers,
    placement_key,
    storage_report,
    swap_quantized,
)
from hirelc.options import LowerConfig
from hirelc.policy import LayerPolicy
from hirelc.qmodules import quant_layers
from hirelc.topology import Topology


def lower_model(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy], bundle, cfg: LowerConfig,
                progress: bool = True, fisher: dict[str, torch.Tensor] | None = None,
                saliency: dict[str, torch.Tensor] | None = None,
                placement: dict | None = None, probe: RuntimeProbe | None = None) -> tuple[nn.Module, dict]:
    """Apply ``layers`` to a copy of ``model``: prune, fold BN, quantize, calibrate, fine-tune, freeze.

    ``saliency`` (from :func:`channel_saliency` on ``model``) saves measuring it again when the same model is
    lowered many times; with ``cfg.importance == "taylor"`` it is measured here when a layer is pruned.
    ``placement`` (a dict kept by the caller across calls on the same model) remembers where quantizers went
    for each :func:`placement_key`, so policies of the same formats skip the runtime probes that decide it.
    ``probe`` (:class:`hirelc.export.OrtProbe` for ONNX Runtime) decides which layer outputs and residual blocks
    get quantizers of their own so the runtime fuses integer kernels; without one only layer inputs are
    quantized.
    """
    validate_layers(topo, layers)
    t0 = time.time()
    m = copy.deepcopy(model).eval()
    params_before = sum(p.numel() for p in m.parameters())
    pruning = any(lp.keep_ratio < 1.0 for lp in layers.values())
    if pruning and saliency is None and fisher is None and cfg.importance == "taylor":
        saliency = channel_saliency(m, topo, saliency_batches(bundle, cfg))
    removed = prune(m, topo, layers, fisher, saliency=saliency if cfg.importance == "taylor" else None)
    bn_batches = 0
    if any(removed.values()) and cfg.bn_batches > 0:
        loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        bn_batches = recalibrate_batchnorm(m, (x for i, (x, _) in enumerate(loader) if i < cfg.bn_batches))
    folded = fold_batchnorm(m, topo.input_shape)
    swapped = swap_quantized(m, layers, cfg.act_signed, cfg.percentile, cfg.reduce_range)
    calib = 0
    outs: list[str] = []
    blocks: list[str] = []
    if cfg.act_quant and swapped:
        loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        calib = calibrate(m, (x for i, (x, _) in enumerate(loader) if i < cfg.calib_batches))
        key = placement_key(layers) if placement is not None else None
        if key is not None and key in placement:
            outs, blocks = placement[key]
            place_quantizers(m, outs, blocks, cfg)
        else:
            outs = add_output_quantizers(m, topo.input_shape, cfg, probe) if cfg.fuse_outputs and probe is not None else []
            if outs:
                blocks = add_block_quantizers(m, topo, outs, cfg, probe) if cfg.fuse_adds else []
            if key is not None:
                placement[key] = (list(outs), list(blocks))
        if outs:
            calibrate(m, (x for i, (x, _) in enumerate(loader) if i < cfg.calib_batches))
    qat, qat_kept = fine_tune_best(m, bundle, cfg, progress, teacher=model if cfg.distill > 0 else None)
    freeze(m)
    m.eval()
    info = {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in m.parameters()) + sum(q.qweight.numel() for q in quant_layers(m).values()),
        "removed_channels": removed,
        "unprunable_grouped": topo.unprunable_grouped,  # kept whole: grouped convs tie their channels (topology)
        "folded_batchnorm": len(folded),
        "batchnorm_batches": bn_batches,  # batches that re-estimated BatchNorm statistics after pruning
        "quantized_layers": len(swapped),
        "float_layers": len(topo.layers) - len(swapped),
        "calibration_batches": calib,
        "output_quantized_layers": len(outs),
        "input_quantized_blocks": len(blocks),
        "qat_steps": qat["steps"],
        "qat_wall_s": round(qat["wall_s"], 2),
        "qat_val_before": qat.get("val_before"),
        "qat_val_after": qat.get("val_after"),
        "qat_kept": qat_kept,  # None: no fine-tuning or no check; False: fine-tuning lowered val accuracy, undone
        "qat_lr": qat.get("lr"),  # the peak learning rate of the fine-tune kept
        "qat_lr_tried": qat.get("lr_tried"),  # [{"lr", "val_after"}] of every rate tried (None: only one)
        "lower_wall_s": round(time.time() - t0, 2),
        **storage_report(m, topo, layers),
    }
    return m, info
