"""Storage cost of a policy, from LayerSpecs alone (no model needed): what the search budgets and the
lowering report states.

effective storage ratio = 32 * N_fp32 / sum_l(bits_l * kept_params_l + scale/zero-point bits_l)

A layer's kept weight count is its parameter count times its own output keep ratio times the keep ratio of
the prune group feeding its input (``LayerSpec.input_group``), channel counts rounded as :func:`kept_channels`
says; depthwise convs follow their group's keep on both sides. Biases are counted as 32-bit floats, including
those BatchNorm folding gives a conv. Float layers cost 32 bits a parameter.
"""

from __future__ import annotations

import math

from hirelc.policy import LayerPolicy, PerChannel, PerGroup, PerTensor, Scheme
from hirelc.topology import LayerSpec

SCALE_BITS = 32  # fp32 scales (ONNX DequantizeLinear x_scale)
CHANNEL_MULTIPLE = 8  # pruned channel counts are rounded to this on layers with >= 4x as many (a multiple of it)


def kept_channels(n: int, keep: float) -> int:
    """How many of ``n`` channels pruning at ``keep`` leaves.

    Layers of at least ``4 * CHANNEL_MULTIPLE`` channels, a multiple of ``CHANNEL_MULTIPLE``, keep a multiple
    of it: ONNX Runtime's integer conv kernels run aligned channel counts much faster (resnet18 int8 at 32x32,
    batch 8: 24/48/96/192 channels in 1.7 ms, 26/51/102/205 in 2.9 ms). Smaller layers round to one channel.
    """
    if keep >= 1.0:
        return n
    m = CHANNEL_MULTIPLE
    if n >= 4 * m and n % m == 0:
        return min(n, max(m, m * round(keep * n / m)))
    return max(1, min(n, round(keep * n)))


def group_keeps(specs: list[LayerSpec], layers: dict[str, LayerPolicy]) -> dict[int, float]:
    """Keep ratio per prune group, taken from the group's prunable leader."""
    keeps: dict[int, float] = {}
    for s in specs:
        if s.prunable and s.prune_group >= 0:
            keeps[s.prune_group] = float(layers[s.name].keep_ratio)
    return keeps


def kept_shape(spec: LayerSpec, layers: dict[str, LayerPolicy], keeps: dict[int, float]) -> tuple[int, int]:
    """(out_features, in_features) of the layer after physical pruning."""
    k_out = keeps.get(spec.prune_group, 1.0) if spec.prune_group >= 0 else 1.0
    if spec.kind == "attn_qkv" and spec.num_heads:
        heads = max(1, round(k_out * spec.num_heads))
        out = spec.out_features * heads // spec.num_heads
    else:
        out = kept_channels(spec.out_features, k_out)
    if spec.kind == "dwconv":
        return out, spec.in_features
    k_in = keeps.get(spec.input_group, 1.0) if spec.input_group >= 0 else 1.0
    inn = kept_channels(spec.in_features, k_in)
    return out, inn


def scale_count(granularity, out: int, inn: int, ksize: int = 1) -> int:
    """Scales (and zero-points) a layer of ``out`` x ``inn`` (x ``ksize`` kernel taps) has at ``granularity``:
    one, one per output channel, or one per group of input channels per output channel and tap (the layout of
    :func:`hirelc.kernels.qparams_shape`; a group size that does not divide ``inn`` counts one group)."""
    if isinstance(granularity, PerTensor):
        return 1
    if isinstance(granularity, PerChannel):
        return out
    if isinstance(granularity, PerGroup):
        return out * max(1, inn // granularity.group_size) * ksize
    raise TypeError(granularity)


def layer_storage_bits(spec: LayerSpec, lp: LayerPolicy, out: int, inn: int) -> tuple[int, int]:
    """(storage bits of weights + qparams + bias, fp32 weight+bias count) for one lowered layer."""
    ksize = math.prod(spec.kernel) if spec.kernel else 1
    n_w = out * inn * ksize
    has_bias = spec.folds_bn or spec.params > spec.out_features * spec.in_features * ksize
    n_b = out if has_bias else 0
    if lp.bits is None:
        return 32 * (n_w + n_b), n_w + n_b
    n_scales = scale_count(lp.granularity, out, inn, ksize)
    zp_bits = lp.bits if lp.scheme == Scheme.ASYMMETRIC else 0
    return lp.bits * n_w + n_scales * (SCALE_BITS + zp_bits) + 32 * n_b, n_w + n_b


def policy_storage(specs: list[LayerSpec], layers: dict[str, LayerPolicy]) -> dict:
    """Totals for a resolved policy: fp32 params, kept params, storage bits, effective ratio and bits/param."""
    keeps = group_keeps(specs, layers)
    fp32_params = sum(s.params for s in specs)
    bits = 0
    kept = 0
    for s in specs:
        out, inn = kept_shape(s, layers, keeps)
        b, n = layer_storage_bits(s, layers[s.name], out, inn)
        bits += b
        kept += n
    return storage_totals(fp32_params, kept, bits)


def storage_totals(fp32_params: int, kept_params: int, storage_bits: int) -> dict:
    """The figures every storage report states, from three counts (predicted or measured alike)."""
    return {
        "fp32_params": fp32_params,
        "kept_params": kept_params,
        "storage_bits": storage_bits,
        "effective_ratio": 32 * fp32_params / max(storage_bits, 1),
        "effective_bits_per_param": storage_bits / max(kept_params, 1),
    }


def effective_ratio(specs: list[LayerSpec], layers: dict[str, LayerPolicy]) -> float:
    return policy_storage(specs, layers)["effective_ratio"]
