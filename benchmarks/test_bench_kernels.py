"""Kernel micro-benchmarks (pytest-benchmark), sized like real layers. Run: python -m pytest benchmarks"""

import pytest
import torch

from hirelc import kernels as K
from hirelc.policy import PerChannel, PerGroup, PerTensor, Scheme

SHAPES = {"conv3x3_256": (256, 256, 3, 3), "linear_768x3072": (3072, 768)}
GRANS = {"per-tensor": PerTensor(), "per-channel": PerChannel(), "per-group-64": PerGroup(64)}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("gran", GRANS, ids=list(GRANS))
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_roundtrip(benchmark, shape, gran, bits):
    w = torch.randn(SHAPES[shape])
    g = GRANS[gran]

    def run():
        s, z = K.choose_qparams(w, bits, Scheme.SYMMETRIC, g)
        return K.dequantize(K.quantize(w, s, z, bits, Scheme.SYMMETRIC, g), s, z, g)

    out = benchmark(run)
    assert out.shape == w.shape


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack(benchmark, bits):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3072 * 768,), dtype=torch.int8)
    out = benchmark(lambda: K.unpack_int(K.pack_int(q, bits), bits, q.numel(), signed=True))
    assert torch.equal(out, q)
