"""Helpers for the export tests (a module of its own: ``conftest`` is ambiguous across test folders)."""

from __future__ import annotations

import torch
from torch import nn

from hirelc.lower import LowerConfig, calibrate, freeze, swap_quantized
from hirelc.policy import LayerPolicy

# No QAT: lowering is prune + fold + quantize + calibrate (2 batches); enough for graph and parity checks.
FAST = LowerConfig(epochs=0, max_steps=0, batch_size=64, calib_batches=2)

TOY_SHAPE = (1, 1, 16, 16)
TOY_QUANT = ("2", "6", "8")  # conv 32->32 (I=32), linear 32->64, linear 64->10; "0" (1->32 conv) stays float


def toy_model(lp: LayerPolicy, act_signed: bool = False, act_quant: bool = True,
              overrides: dict[str, LayerPolicy] | None = None) -> nn.Module:
    """Conv(float) -> Conv -> pool -> Linear -> Linear with ``lp`` (or ``overrides[name]``) on the last three,
    calibrated and frozen."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()
    swap_quantized(m, {n: (overrides or {}).get(n, lp) for n in TOY_QUANT}, act_signed=act_signed)
    if act_quant:
        calibrate(m, [torch.randn(16, *TOY_SHAPE[1:], generator=torch.Generator().manual_seed(1))])
    freeze(m)
    return m
