"""Kernel micro-benchmarks (pytest-benchmark), sized like real layers. Run: python -m pytest benchmarks"""

import pytest
import torch

from hirelc import kernels as K
from hirelc.policy import PerChannel, PerGroup, PerTensor, Scheme

SHAPES = {"conv3x3_256": (256, 256, 3, 3), "linear_768x3072": (3072, 768)}
GRANS = {"per-tensor": PerTensor(), "per-channel": PerChannel(), "per-group-64": PerGroup(64)}


WIDTHS = [2, 3, 4, 5, 6, 8]


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("gran", GRANS, ids=list(GRANS))
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("op", ["quantize", "dequantize"])
def test_quantize_dequantize(benchmark, op, shape, gran, bits):
    """quantize: scale/zero-point choice and integer codes of one layer's weights; dequantize: the codes back
    to float, as a lowered layer does when it is materialised."""
    w = torch.randn(SHAPES[shape])
    g = GRANS[gran]
    if op == "quantize":
        def run():
            s, z = K.choose_qparams(w, bits, Scheme.SYMMETRIC, g)
            return K.quantize(w, s, z, bits, Scheme.SYMMETRIC, g)

        q = benchmark(run)
        assert q.shape == w.shape and int(q.to(torch.int32).abs().max()) <= 2 ** (bits - 1)
    else:
        s, z = K.choose_qparams(w, bits, Scheme.ASYMMETRIC, g)
        q = K.quantize(w, s, z, bits, Scheme.ASYMMETRIC, g)
        out = benchmark(lambda: K.dequantize(q, s, z, g))
        assert out.shape == w.shape and (out - w).abs().max() <= s.max() * 0.5 + 1e-5


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack(benchmark, bits):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3072 * 768,), dtype=torch.int8)
    out = benchmark(lambda: K.unpack_int(K.pack_int(q, bits), bits, q.numel(), signed=True))
    assert torch.equal(out, q)
