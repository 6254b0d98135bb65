"""Quantization of a pruned, folded model: integer-weight layers, activation quantizers and their ranges.

Where output and residual-block quantizers pay off depends on what the runtime fuses into integer kernels, so
lowering asks a :class:`RuntimeProbe` (ONNX Runtime's is :class:`hirelc.export.OrtProbe`); without one, only
the inputs of quantized layers are quantized.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from hirelc.cost import policy_storage, storage_totals
from hirelc.options import LowerConfig
from hirelc.policy import LayerPolicy, PerGroup, format_key, parse_granularity
from hirelc.qmodules import (
    BLOCK_IN,
    BLOCK_OUT,
    ActQuant,
    QConv2d,
    QLinear,
    attach_block_quantizers,
    detach_block_quantizers,
    quant_layers,
)
from hirelc.topology import Topology, set_module


class RuntimeProbe(Protocol):
    """What lowering asks the target runtime about a quantized model before placing more quantizers."""

    def unfused_layers(self, model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
        """The quantized layers the runtime would still run as float kernels."""

    def integer_adds(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        """How many residual adds the runtime runs on integers."""


def swap_quantized(model: nn.Module, layers: dict[str, LayerPolicy], act_signed: bool = False,
                   percentile: float | None = None, reduce_range: bool = True) -> list[str]:
    """Replace each quantized Conv2d/Linear by its integer-weight module; returns the swapped names."""
    swapped = []
    for name, lp in layers.items():
        if not lp.quantized:
            continue
        mod = model.get_submodule(name)
        q = (QConv2d(mod, lp, reduce_range) if isinstance(mod, nn.Conv2d) else QLinear(mod, lp, reduce_range))
        q.act = ActQuant(signed=act_signed, percentile=percentile)
        set_module(model, name, q)
        swapped.append(name)
    return swapped


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Observe input ranges of every activation quantizer over ``batches``; returns the batches used."""
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    for a in acts:
        a.observing = True
    model.eval()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for a in acts:
        a.finish_calibration()
    return n


def add_output_quantizers(model: nn.Module, input_shape: tuple[int, ...], cfg: LowerConfig,
                          probe: RuntimeProbe) -> list[str]:
    """Give an output quantizer to each quantized layer ONNX Runtime would leave as a float conv (or matmul).

    ORT builds an integer ``QLinearConv`` only from ``DQ -> Conv -> Q``; a conv feeding a residual add or a
    pool has no ``Q`` after it and would run in float on weights dequantized at every call. (Linear layers
    need none: without an output ``Q`` they become ``MatMulIntegerToFloat``.) Per-group (blocked) convs have
    no integer kernel and are left alone. Returns the layers that got one (still uncalibrated).
    """
    qls = quant_layers(model)
    names = [n for n in probe.unfused_layers(model, input_shape)
             if n in qls and not isinstance(parse_granularity(qls[n].granularity), PerGroup)]
    for n in names:
        qls[n].out_act = ActQuant(signed=cfg.act_signed, percentile=cfg.percentile)
    return names


def add_block_quantizers(model: nn.Module, topo: Topology, out_quantized: list[str], cfg: LowerConfig,
                         probe: RuntimeProbe) -> list[str]:
    """Quantize the inputs of residual blocks so ONNX Runtime runs their adds in integer (``QLinearAdd``).

    A block (a module with its own ``forward``, not a container) qualifies when one of its layers needed an
    output quantizer (:func:`add_output_quantizers`: its result meets the shortcut in an add); the last such block also quantizes its output, which feeds the
    head. Kept only if ORT's optimized graph really gains integer adds; otherwise undone. Call after a
    calibration; returns the blocks that kept quantizers (calibrate again before use).
    """
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # no shortcut, and they would run a new child
    blocks = [b for b, names in topo.blocks.items() if len(names) > 1 and set(names) & set(out_quantized)
              and not isinstance(model.get_submodule(b), containers)]
    if not blocks:
        return []

    def fused_adds() -> int:  # on a copy calibrated on noise: any ranges do to see what ORT fuses
        copy_ = copy.deepcopy(model)
        calibrate(copy_, [torch.randn(2, *topo.input_shape[1:])])
        return probe.integer_adds(copy_, topo.input_shape)

    before = fused_adds()
    for i, b in enumerate(blocks):
        attach_block_quantizers(model.get_submodule(b), output=i == len(blocks) - 1, signed=cfg.act_signed,
                                percentile=cfg.percentile)
    if fused_adds() > before:
        return blocks
    for b in blocks:
        detach_block_quantizers(model.get_submodule(b))
    return []


def place_quantizers(model: nn.Module, outs: list[str], blocks: list[str], cfg: LowerConfig) -> None:
    """Put output quantizers on ``outs`` and block quantizers on ``blocks`` (the last also quantizing its output),
    as :func:`add_output_quantizers` / :func:`add_block_quantizers` decided for a model of the same formats."""
    qls = quant_layers(model)
    for n in outs:
        qls[n].out_act = ActQuant(signed=cfg.act_signed, percentile=cfg.percentile)
    for i, b in enumerate(blocks):
        attach_block_quantizers(model.get_submodule(b), output=i == len(blocks) - 1, signed=cfg.act_signed,
                                percentile=cfg.percentile)


def freeze(model: nn.Module) -> None:
    for q in quant_layers(model).values():
        q.freeze()


def storage_report(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy]) -> dict:
    """Effective storage of the lowered model, counted from the tensors it really holds."""
    fp32 = sum(s.params for s in topo.layers)
    qls = quant_layers(model)
    bits = 0
    kept = 0
    for s in topo.layers:
        m = model.get_submodule(s.name)
        if s.name in qls:
            bits += qls[s.name].storage_bits()
            kept += qls[s.name].qweight.numel() + (qls[s.name].bias.numel() if qls[s.name].bias is not None else 0)
        else:
            n = sum(p.numel() for p in m.parameters(recurse=False))
            bits += 32 * n
            kept += n
    t = storage_totals(fp32, kept, bits)
    return {
        "compressible_params_before": t.pop("fp32_params"),
        "compressible_params_after": t.pop("kept_params"),
        **t,
        "predicted_effective_ratio": policy_storage(list(topo.layers), layers)["effective_ratio"],
    }


def placement_key(layers: dict[str, LayerPolicy]) -> tuple:
    """What decides where :func:`add_output_quantizers` and :func:`add_block_quantizers` put quantizers: each
    layer's weight format and kind of scales (the ONNX Runtime fusion patterns follow from these; channel
    counts and bit widths within a container do not change them)."""
    return tuple((n, format_key(lp), type(lp.granularity).__name__) for n, lp in sorted(layers.items()))


def lowered_structure(model: nn.Module) -> dict:
    """What :func:`rebuild_lowered` needs besides the policy to rebuild ``model``'s modules: the layers with an
    output quantizer and the blocks with input (and output) quantizers. Plain JSON."""
    return {
        "output_quantized": sorted(n for n, q in quant_layers(model).items() if getattr(q, "out_act", None) is not None),
        "block_quantized": [n for n, m in model.named_modules() if isinstance(getattr(m, BLOCK_IN, None), ActQuant)],
        "block_output_quantized": [n for n, m in model.named_modules()
                                   if isinstance(getattr(m, BLOCK_OUT, None), ActQuant)],
    }
