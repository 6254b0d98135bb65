"""Synthetic layers and a synthetic evaluator: the search is tested without any network or real model."""

from __future__ import annotations

import math

from hirelc.cost import effective_ratio
from hirelc.policy import LayerPolicy, PerGroup, PerTensor, Scheme
from hirelc.topology import LayerSpec


def _spec(name, kind, cin, cout, k, block, group=-1, prunable=False, input_group=-1, heads=0) -> LayerSpec:
    params = cin * cout * math.prod(k) + cout
    return LayerSpec(name, kind, cin, cout, k, params, params * 16, block, group, prunable, input_group, heads)


def make_specs() -> list[LayerSpec]:
    """Four blocks: a stem conv, an inverted residual with a depthwise conv, a ViT-like block, a classifier."""
    return [
        _spec("stem.conv", "conv", 3, 32, (3, 3), "stem", group=0, prunable=True),
        _spec("blocks.0.pw", "pwconv", 32, 96, (1, 1), "blocks.0", group=1, prunable=True, input_group=0),
        _spec("blocks.0.dw", "dwconv", 1, 96, (3, 3), "blocks.0", group=1),
        _spec("blocks.0.proj", "pwconv", 96, 64, (1, 1), "blocks.0", input_group=1),
        _spec("blocks.1.attn.qkv", "attn_qkv", 64, 192, (), "blocks.1", group=2, prunable=True, heads=4),
        _spec("blocks.1.attn.proj", "attn_proj", 64, 64, (), "blocks.1", input_group=2),
        _spec("blocks.1.mlp.fc1", "mlp_fc1", 64, 128, (), "blocks.1", group=3, prunable=True),
        _spec("blocks.1.mlp.fc2", "mlp_fc2", 128, 64, (), "blocks.1", input_group=3),
        _spec("head.fc", "classifier", 64, 10, (), "head"),
    ]


SENS = {
    "stem.conv": 1.0, "blocks.0.pw": 0.2, "blocks.0.dw": 0.6, "blocks.0.proj": 0.15, "blocks.1.attn.qkv": 0.5,
    "blocks.1.attn.proj": 0.1, "blocks.1.mlp.fc1": 0.05, "blocks.1.mlp.fc2": 0.08, "head.fc": 0.9,
}
BLOCK_SENS = {"stem": 1.0, "blocks.0": 0.4, "blocks.1": 0.2, "head": 0.75}


def synthetic_accuracy(layers: dict[str, LayerPolicy]) -> float:
    """90 minus sensitivity-weighted quantisation and pruning damage (a known, smooth function)."""
    acc = 90.0
    for name, lp in layers.items():
        s = SENS[name]
        acc -= 0.08 * s * (8 - lp.bits) ** 2 + 25 * s * (1 - lp.keep_ratio) ** 2
        acc -= 0.4 * s * isinstance(lp.granularity, PerTensor) - 0.1 * s * isinstance(lp.granularity, PerGroup)
        acc += 0.1 * s * (lp.scheme == Scheme.ASYMMETRIC)
    return acc


class SyntheticEvaluator:
    """Implements the engine's Evaluator protocol with a known accuracy function; counts its calls."""

    baseline_accuracy = 90.0
    proxy_cap = 50.0

    def __init__(self, specs, fail_at: int | None = None):
        self.specs = specs
        self.real_calls = 0
        self.proxy_calls = 0
        self.fail_at = fail_at

    def proxy_drop(self, layers):
        self.proxy_calls += 1
        return min(self.proxy_cap, 1.3 * (self.baseline_accuracy - synthetic_accuracy(layers)))

    def real_accuracy(self, layers):
        if self.fail_at is not None and self.real_calls + 1 >= self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.real_calls += 1
        return synthetic_accuracy(layers)

    def predict_bytes(self, layers):
        return 4 * sum(s.params for s in self.specs) / effective_ratio(self.specs, layers) + 2000

    def predict_latency_ms(self, layers):
        return None
