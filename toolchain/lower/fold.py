"""BatchNorm folding: each BatchNorm that directly follows a conv is merged into the conv's weight and bias; and
re-estimating BatchNorm statistics after pruning, before they are folded."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hirelc.topology import conv_bn_pairs, set_module


def bn_fold_factors(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the factor and shift a BatchNorm applies in inference: ``y = scale * x + shift`` with
    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``."""
    inv = (bn.running_var + bn.eps).rsqrt()
    scale = bn.weight * inv if bn.affine else inv
    return scale, (bn.bias if bn.affine else 0) - bn.running_mean * scale


@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Fold every BatchNorm2d that directly consumes a Conv2d's output into that conv; returns folded convs.

    A BN with an activation attached (timm's BatchNormAct2d) keeps its activation.
    """
    named = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model, input_shape):
        conv, bn = named[conv_name], named[bn_name]
        scale, shift = bn_fold_factors(bn)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter(bias * scale + shift)
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
        set_module(model, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
        folded.append(conv_name)
    return folded


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running mean and variance of every BatchNorm from ``batches``; returns how many were used.

    Pruning a layer's output channels changes what the next layer's BatchNorm sees (the removed channels no longer
    feed it), so its stored statistics normalise with the wrong mean and variance and every activation after it
    drifts. The statistics are recomputed as a plain average over the batches (everything else stays in eval
    mode: dropout off, weights untouched); with no batch the model is left as it was.
    """
    xs = list(batches)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not xs or not bns:
        return 0
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches, not an exponential one
        bn.train()
    for x in xs:
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
        bn.eval()
    model.train(was_training)
    return len(xs)
