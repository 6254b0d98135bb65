"""BatchNorm folding: each BatchNorm that directly follows a conv is merged into the conv's weight and bias."""

from __future__ import annotations

import torch
from torch import nn

from hirelc.topology import conv_bn_pairs, set_module


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor a BatchNorm applies in inference, ``gamma / sqrt(var + eps)``."""
    inv = (bn.running_var + bn.eps).rsqrt()
    return bn.weight * inv if bn.affine else inv


@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Fold every BatchNorm2d that directly consumes a Conv2d's output into that conv; returns folded convs.

    A BN with an activation attached (timm's BatchNormAct2d) keeps its activation.
    """
    named = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model, input_shape):
        conv, bn = named[conv_name], named[bn_name]
        scale = _bn_scale(bn)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter(bias * scale + shift)
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
        set_module(model, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
        folded.append(conv_name)
    return folded
