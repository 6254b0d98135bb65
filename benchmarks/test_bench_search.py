"""Per-step overhead of the search: surrogate query and an agent step, on synthetic layers."""

import numpy as np

from hirelc.policy import LayerPolicy
from hirelc.search.surrogate import Surrogate
from hirelc.topology import LayerSpec

SPECS = [LayerSpec(f"l{i}", "conv", 64, 64, (3, 3), 36864, 1 << 20, f"b{i // 2}", i, True) for i in range(20)]
SENS = {"layer": {s.name: 0.5 for s in SPECS}, "block": {s.block: 0.5 for s in SPECS}}


def _policy(rng):
    return {s.name: LayerPolicy(bits=int(rng.choice([4, 5, 6, 8])), keep_ratio=float(rng.choice([0.5, 1.0])))
            for s in SPECS}


def test_surrogate_query(benchmark):
    rng = np.random.default_rng(0)
    sur = Surrogate(SPECS, SENS["layer"], members=3, seed=0)
    pols = [_policy(rng) for _ in range(16)]
    sur.fit(pols, [80.0 + rng.random() for _ in pols])
    mean, std = benchmark(lambda: sur.predict(pols[:4]))
    assert len(mean) == 4
