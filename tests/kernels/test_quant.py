import pytest
import torch

from hirelc.errors import HirelcError
from hirelc.kernels import (
    choose_qparams,
    dequantize,
    expand_qparams,
    fake_quantize,
    qparams_shape,
    quant_range,
    quantization_error_bound,
    quantize,
    storage_dtype,
)
from hirelc.policy import PerChannel, PerGroup, PerTensor, Scheme

SYM, ASYM = Scheme.SYMMETRIC, Scheme.ASYMMETRIC
BITS = list(range(2, 9))
SCHEMES = [SYM, ASYM]
GRANS = [PerTensor(), PerChannel(), PerGroup(4)]
SHAPES = [(8, 16, 3, 3), (8, 32)]


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w.view(-1)[::7] *= 5  # some outliers so ranges differ per channel / group
    return w


# --- ranges and shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_quant_range(bits):
    assert quant_range(bits, SYM) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, ASYM) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_quant_range_rejects_bad_bits(bits):
    with pytest.raises(HirelcError):
        quant_range(bits, SYM)


def test_storage_dtype():
    assert storage_dtype(SYM) is torch.int8
    assert storage_dtype(ASYM) is torch.uint8


@pytest.mark.parametrize(
    "shape, gran, expected",
    [
        ((8, 16, 3, 3), PerTensor(), ()),
        ((8, 16, 3, 3), PerChannel(), (8,)),
        ((8, 16, 3, 3), PerGroup(4), (8, 4, 3, 3)),
        ((8, 32), PerTensor(), ()),
        ((8, 32), PerChannel(), (8,)),
        ((8, 32), PerGroup(4), (8, 8)),
        ((8, 32), PerGroup(32), (8, 1)),
        ((8, 32), PerChannel(axis=1), (32,)),
    ],
)
def test_qparams_shape(shape, gran, expected):
    assert qparams_shape(shape, gran) == expected
    assert qparams_shape(torch.Size(shape), gran) == expected
    for scheme in SCHEMES:
        scale, zp = choose_qparams(torch.randn(shape), 4, scheme, gran)
        assert scale.shape == expected and zp.shape == expected
        assert scale.dtype == torch.float32 and zp.dtype == storage_dtype(scheme)


def test_qparams_shape_group_must_divide():
    with pytest.raises(HirelcError, match="does not divide"):
        qparams_shape((8, 30), PerGroup(4))
    with pytest.raises(HirelcError):
        choose_qparams(torch.randn(8, 30), 4, SYM, PerGroup(4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gran", GRANS)
def test_expand_qparams_broadcasts(shape, gran):
    t = torch.arange(torch.Size(qparams_shape(shape, gran)).numel(), dtype=torch.float32)
    t = t.reshape(qparams_shape(shape, gran))
    e = expand_qparams(t, shape, gran)
    full = torch.broadcast_to(e, shape)
    if isinstance(gran, PerTensor):
        assert e.shape == () and (full == 0).all()
    elif isinstance(gran, PerChannel):
        assert e.shape == (shape[0],) + (1,) * (len(shape) - 1)
        for o in range(shape[0]):
            assert (full[o] == t[o]).all()
    else:
        assert e.shape == shape
        for i in range(shape[1]):  # input channel i reads group i // g
            assert torch.equal(full[:, i], t[:, i // gran.group_size])


# --- exact values on hand-made tensors -----------------------------------------------------------------


def test_symmetric_per_tensor_exact():
    w = torch.tensor([-1.0, 0.5, 2.0])
    scale, zp = choose_qparams(w, 8, SYM, PerTensor())
    assert scale.item() == pytest.approx(2 / 127, rel=1e-6)
    assert zp.item() == 0 and zp.dtype == torch.int8
    q = quantize(w, scale, zp, 8, SYM, PerTensor())
    assert q.tolist() == [-64, 32, 127]  # -63.5 -> -64 and 31.75 -> 32


def test_asymmetric_per_tensor_exact():
    w = torch.tensor([-1.0, 0.5, 2.0])
    scale, zp = choose_qparams(w, 8, ASYM, PerTensor())
    assert scale.item() == pytest.approx(3 / 255, rel=1e-6)
    assert zp.item() == 85 and zp.dtype == torch.uint8
    q = quantize(w, scale, zp, 8, ASYM, PerTensor())
    assert q.tolist() == [0, 127, 255]  # 0.5 / (3/255) = 42.5 rounds half to even -> 42, + 85
    assert torch.allclose(dequantize(q, scale, zp, PerTensor()), torch.tensor([-1.0, 42 * 3 / 255, 2.0]))


def test_asymmetric_range_always_contains_zero():
    w = torch.tensor([1.0, 2.0, 3.0])  # all positive: lo is 0
    scale, zp = choose_qparams(w, 4, ASYM, PerTensor())
    assert scale.item() == pytest.approx(3 / 15) and zp.item() == 0
    scale, zp = choose_qparams(-w, 4, ASYM, PerTensor())  # all negative: hi is 0
    assert scale.item() == pytest.approx(3 / 15) and zp.item() == 15
    q = quantize(torch.zeros(3), scale, zp, 4, ASYM, PerTensor())
    assert (dequantize(q, scale, zp, PerTensor()) == 0).all()


def test_per_channel_exact():
    w = torch.tensor([[1.0, -4.0], [0.5, 0.25], [0.0, 0.0]])
    scale, zp = choose_qparams(w, 4, SYM, PerChannel())
    assert torch.allclose(scale, torch.tensor([4 / 7, 0.5 / 7, 1.0]))  # all-zero row -> 1
    scale, zp = choose_qparams(w, 4, ASYM, PerChannel())
    assert torch.allclose(scale, torch.tensor([5 / 15, 0.5 / 15, 1.0]))
    assert zp.tolist() == [12, 0, 0]  # round(4 / (1/3)) = 12


def test_per_channel_other_axis():
    w = torch.tensor([[1.0, -4.0], [0.5, 0.25]])
    scale, _ = choose_qparams(w, 8, SYM, PerChannel(axis=1))
    assert torch.allclose(scale, torch.tensor([1.0, 4.0]) / 127)
    q = quantize(w, scale, torch.zeros(2, dtype=torch.int8), 8, SYM, PerChannel(axis=1))
    assert q.tolist() == [[127, -127], [64, 8]]  # 63.5 -> 64, 7.9375 -> 8


def test_per_group_exact():
    # 2 output channels x 4 inputs, groups of 2 -> qparams (2, 2)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [0.0, 0.0, -3.0, 6.0]])
    scale, zp = choose_qparams(w, 8, SYM, PerGroup(2))
    assert scale.shape == (2, 2)
    assert torch.allclose(scale, torch.tensor([[2.0, 0.5], [1.0, 6.0]]) / torch.tensor([[127, 127], [1, 127]]))
    scale, zp = choose_qparams(w, 2, ASYM, PerGroup(2))
    assert torch.allclose(scale, torch.tensor([[3 / 3, 0.5 / 3], [1.0, 9 / 3]]))
    assert zp.tolist() == [[2, 0], [0, 1]]
    q = quantize(w, scale, zp, 2, ASYM, PerGroup(2))
    assert q.tolist() == [[3, 0, 3, 2], [0, 0, 0, 3]]  # 0.25 / (1/6) = 1.5 -> 2 (half to even)


def test_per_group_conv_blocks_input_dim_only():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[0, :, 0, 1] = torch.tensor([-8.0, 0.0, 0.0, 0.0])
    scale, _ = choose_qparams(w, 8, SYM, PerGroup(2))
    assert scale.shape == (1, 2, 1, 2)  # kernel positions keep their own scale
    assert torch.allclose(scale.reshape(2, 2) * 127, torch.tensor([[2.0, 8.0], [4.0, 127.0]]))


def test_percentile_clips_outliers():
    w = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([100.0])])
    full, _ = choose_qparams(w, 8, SYM, PerTensor())
    clipped, _ = choose_qparams(w, 8, SYM, PerTensor(), percentile=99.0)
    assert full.item() == pytest.approx(100 / 127)
    assert clipped.item() < 1.0 / 127 + 1e-6
    w2 = torch.stack([w, -w])
    scale, zp = choose_qparams(w2, 8, ASYM, PerChannel(), percentile=99.0)
    assert (scale < 2.0 / 255 + 1e-6).all()
    assert choose_qparams(w, 8, SYM, PerTensor(), percentile=100.0)[0].item() == full.item()
    with pytest.raises(HirelcError):
        choose_qparams(w, 8, SYM, PerTensor(), percentile=0.0)


# --- properties over every combination -----------------------------------------------------------------

COMBOS = [(b, s, g, shp) for b in BITS for s in SCHEMES for g in GRANS for shp in SHAPES]


@pytest.mark.parametrize("bits, scheme, gran, shape", COMBOS)
def test_round_trip_and_range(bits, scheme, gran, shape):
    w = _weight(shape, seed=bits)
    scale, zp = choose_qparams(w, bits, scheme, gran)
    q = quantize(w, scale, zp, bits, scheme, gran)
    qmin, qmax = quant_range(bits, scheme)
    assert q.shape == w.shape and q.dtype == storage_dtype(scheme)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    dq = dequantize(q, scale, zp, gran)
    assert dq.dtype == torch.float32
    assert torch.equal(quantize(dq, scale, zp, bits, scheme, gran), q)


@pytest.mark.parametrize("bits, scheme, gran, shape", COMBOS)
@pytest.mark.parametrize("percentile", [None, 99.0])
def test_error_bound_inside_clip_range(bits, scheme, gran, shape, percentile):
    w = _weight(shape, seed=100 + bits)
    scale, zp = choose_qparams(w, bits, scheme, gran, percentile=percentile)
    qmin, qmax = quant_range(bits, scheme)
    s = expand_qparams(scale, shape, gran)
    code = w / s + expand_qparams(zp, shape, gran).float()
    inside = (code >= qmin - 0.5) & (code <= qmax + 0.5)
    if percentile is None:
        assert inside.all()  # min/max ranges never clip
    err = (w - dequantize(quantize(w, scale, zp, bits, scheme, gran), scale, zp, gran)).abs()
    bound = torch.broadcast_to(quantization_error_bound(s), shape) * (1 + 1e-5) + 1e-6
    assert (err[inside] <= bound[inside]).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_all_zero_weight(scheme, gran, shape):
    w = torch.zeros(shape)
    scale, zp = choose_qparams(w, 4, scheme, gran)
    assert torch.isfinite(scale).all() and (scale == 1.0).all()
    q = quantize(w, scale, zp, 4, scheme, gran)
    assert (dequantize(q, scale, zp, gran) == 0).all()


def test_tiny_scale_is_clamped():
    scale, _ = choose_qparams(torch.tensor([1e-30, -1e-30]), 8, SYM, PerTensor())
    assert scale.item() == pytest.approx(1e-12) and scale.item() > 0


def test_zero_point_makes_zero_exact():
    w = _weight((8, 32))
    w[:, ::3] = 0.0
    for bits in BITS:
        scale, zp = choose_qparams(w, bits, ASYM, PerChannel())
        dq = dequantize(quantize(w, scale, zp, bits, ASYM, PerChannel()), scale, zp, PerChannel())
        assert (dq[:, ::3] == 0).all()


# --- fake quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, scheme, gran, shape", COMBOS[::3])
def test_fake_quantize_forward_matches(bits, scheme, gran, shape):
    w = _weight(shape, seed=7)
    scale, zp = choose_qparams(w, bits, scheme, gran)
    expected = dequantize(quantize(w, scale, zp, bits, scheme, gran), scale, zp, gran)
    assert torch.equal(fake_quantize(w, scale, zp, bits, scheme, gran), expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantize_straight_through_gradient(scheme):
    w = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.3, 0.9, 2.5], requires_grad=True)
    scale = torch.tensor(0.25, requires_grad=True)  # 4-bit codes cover about [-2, 1.75] (sym) / [-1, 2.75] (asym)
    zp = torch.tensor(0, dtype=torch.int8) if scheme is SYM else torch.tensor(4, dtype=torch.uint8)
    out = fake_quantize(w, scale, zp, 4, scheme, PerTensor())
    (out * torch.arange(1.0, 8.0)).sum().backward()
    qmin, qmax = quant_range(4, scheme)
    code = w.detach() / 0.25 + zp.float()
    inside = (code >= qmin) & (code <= qmax)
    assert not inside.all() and inside.any()  # the scale does clip
    assert torch.equal(w.grad, torch.where(inside, torch.arange(1.0, 8.0), torch.zeros(7)))
    assert scale.grad is None


def test_fake_quantize_per_channel_gradient_and_dtype():
    w = torch.tensor([[0.5, 4.0], [0.5, 4.0]], requires_grad=True)
    scale = torch.tensor([0.5 / 127, 4.0 / 127])  # row 0 clips its 4.0, row 1 clips nothing
    zp = torch.zeros(2, dtype=torch.int8)
    fake_quantize(w, scale, zp, 8, SYM, PerChannel()).sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    wh = w.detach().double()
    assert fake_quantize(wh, scale, zp, 8, SYM, PerChannel()).dtype == torch.float64
