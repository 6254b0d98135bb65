"""Affine weight quantization primitives: choose scales, quantize, dequantize, fake-quantize.

Pure tensor functions (CPU reference; they use only torch ops, so CUDA tensors work too). The integer
mapping is ``q = clamp(round(w / scale) + zero_point, qmin, qmax)`` and ``w ~= (q - zero_point) * scale``,
with round-half-to-even, which is what ONNX ``QuantizeLinear`` / ``DequantizeLinear`` compute.

How each granularity maps to the shape of ``scale`` / ``zero_point`` for a weight of shape
``(O, I, *K)`` (PyTorch layout: conv ``(O, I, kh, kw)``, linear ``(O, I)``):

==================  ======================  ==============================================
granularity         qparams shape           reduction set for one scale
==================  ======================  ==============================================
``PerTensor()``     ``()``                  the whole weight
``PerChannel(a)``   ``(w.shape[a],)``       one slice along axis ``a`` (default 0: ``O``)
``PerGroup(g)``     ``(O, I // g, *K)``     ``g`` consecutive input channels (axis 1)
==================  ======================  ==============================================

``PerGroup`` is ONNX blocked quantization with ``axis=1, block_size=g``: the kernel positions ``K`` keep
their own scales, only the input dimension is blocked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hirelc.errors import HirelcError
from hirelc.kernels.granularity import Granularity, PerChannel, PerGroup, PerTensor, Scheme

_MIN_SCALE = 1e-12


def quant_range(bits: int, scheme: Scheme) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of a ``bits``-wide code: signed for symmetric, unsigned otherwise."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise HirelcError(f"quantization bits must be an integer in 2..8, got {bits!r}")
    if Scheme(scheme) is Scheme.SYMMETRIC:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def storage_dtype(scheme: Scheme) -> torch.dtype:
    """The dtype that holds quantized codes: ``int8`` for symmetric, ``uint8`` for asymmetric."""
    return torch.int8 if Scheme(scheme) is Scheme.SYMMETRIC else torch.uint8


def qparams_shape(weight_shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale / zero-point tensors for a weight of ``weight_shape`` (see the module table)."""
    shape = tuple(weight_shape)
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        return (shape[_channel_axis(shape, granularity)],)
    if isinstance(granularity, PerGroup):
        g = granularity.group_size
        if len(shape) < 2:
            raise HirelcError(f"per-group quantization needs a weight with an input dim, got shape {shape}")
        if shape[1] % g != 0:
            raise HirelcError(f"group size {g} does not divide the input dim {shape[1]} of a weight {shape}")
        return (shape[0], shape[1] // g, *shape[2:])
    raise HirelcError(f"unknown granularity {granularity!r}")


def expand_qparams(t: Tensor, weight_shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> Tensor:
    """Reshape/repeat a qparams tensor (shape ``qparams_shape``) so it broadcasts against the weight."""
    shape = tuple(weight_shape)
    t = torch.as_tensor(t)
    if isinstance(granularity, PerTensor):
        return t.reshape(())
    if isinstance(granularity, PerChannel):
        axis = _channel_axis(shape, granularity)
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return t.reshape(view)  # (1, .., C, .., 1)
    if isinstance(granularity, PerGroup):
        qshape = qparams_shape(shape, granularity)
        return t.reshape(qshape).repeat_interleave(granularity.group_size, dim=1)  # (O, I, *K)
    raise HirelcError(f"unknown granularity {granularity!r}")


def choose_qparams(
    w: Tensor,
    bits: int,
    scheme: Scheme,
    granularity: Granularity,
    *,
    percentile: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Min/max (or percentile-clipped) scale and zero-point for ``w``.

    Symmetric: ``scale = amax / qmax`` with ``amax = max|w|``, zero-point 0. Asymmetric: the range
    ``[min(w, 0), max(w, 0)]`` (always containing 0, so zero is exact) is spread over ``[qmin, qmax]``.
    A reduction set that is all zeros gets ``scale = 1`` so nothing ever divides by zero.

    Args:
        w: float weight, PyTorch layout.
        bits: code width, 2..8.
        scheme: symmetric (int8 codes) or asymmetric (uint8 codes).
        granularity: which elements share one scale (see the module table).
        percentile: if given (e.g. 99.9), clip the range to that nearest-rank percentile of ``|w|``
            (symmetric) or of ``w`` at both ends (asymmetric) within each reduction set, trading
            clipping error on outliers for finer steps everywhere else.

    Returns:
        ``(scale float32, zero_point storage_dtype(scheme))``, both of shape ``qparams_shape``.
    """
    qmin, qmax = quant_range(bits, scheme)
    if percentile is not None and not 0.0 < percentile <= 100.0:
        raise HirelcError(f"percentile must be in (0, 100], got {percentile}")
    x = _reduction_view(w.detach().float(), granularity)  # (*qshape, K)
    if Scheme(scheme) is Scheme.SYMMETRIC:
        scale = _guard(_upper(x.abs(), percentile) / qmax)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    lo = torch.clamp(-_upper(-x, percentile), max=0.0)  # low percentile of w, <= 0
    hi = torch.clamp(_upper(x, percentile), min=0.0)
    scale = _guard((hi - lo) / (qmax - qmin))
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.uint8)
    return scale, zero_point


def quantize(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, scheme: Scheme, granularity: Granularity
) -> Tensor:
    """Integer codes ``clamp(round(w / scale) + zero_point, qmin, qmax)`` in ``storage_dtype(scheme)``, shape of w."""
    qmin, qmax = quant_range(bits, scheme)
    s = expand_qparams(scale, w.shape, granularity).float()
    zp = expand_qparams(zero_point, w.shape, granularity).float()
    q = torch.clamp(torch.round(w.float() / s) + zp, qmin, qmax)
    return q.to(storage_dtype(scheme))


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, granularity: Granularity) -> Tensor:
    """Float32 weight ``(q - zero_point) * scale`` (the ONNX ``DequantizeLinear`` formula)."""
    s = expand_qparams(scale, q.shape, granularity).float()
    zp = expand_qparams(zero_point, q.shape, granularity).float()
    return (q.float() - zp) * s


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize forward, straight-through (clipped) gradient backward."""

    @staticmethod
    def forward(ctx, w, scale, zero_point, bits, scheme, granularity):
        qmin, qmax = quant_range(bits, scheme)
        s = expand_qparams(scale, w.shape, granularity).float()
        zp = expand_qparams(zero_point, w.shape, granularity).float()
        x = w.float() / s + zp  # unclipped code
        ctx.save_for_backward((x >= qmin) & (x <= qmax))
        q = quantize(w, scale, zero_point, bits, scheme, granularity)
        return dequantize(q, scale, zero_point, granularity).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def fake_quantize(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, scheme: Scheme, granularity: Granularity
) -> Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype, differentiable for quantization-aware training.

    The backward pass is a straight-through estimator: the gradient flows unchanged to elements whose
    ``w / scale + zero_point`` lies in ``[qmin, qmax]`` and is zero where the code was clipped.
    ``scale`` and ``zero_point`` are treated as constants (no gradient).
    """
    return _FakeQuantize.apply(w, scale.detach(), zero_point.detach(), bits, scheme, granularity)


def quantization_error_bound(scale: Tensor) -> Tensor:
    """Worst-case rounding error ``scale / 2`` of an element that was not clipped."""
    return scale / 2


# --- helpers -------------------------------------------------------------------------------------------


def _channel_axis(shape: tuple[int, ...], granularity: PerChannel) -> int:
    axis = granularity.axis
    if not -len(shape) <= axis < len(shape):
        raise HirelcError(f"per-channel axis {axis} is out of range for a weight of shape {shape}")
    return axis % len(shape)


def _reduction_view(w: Tensor, granularity: Granularity) -> Tensor:
    """``w`` rearranged to ``(*qparams_shape, K)``: the last dim holds the K elements sharing one scale."""
    if isinstance(granularity, PerTensor):
        return w.reshape(-1)  # (N,)
    if isinstance(granularity, PerChannel):
        axis = _channel_axis(tuple(w.shape), granularity)
        return w.movedim(axis, 0).reshape(w.shape[axis], -1)  # (C, N / C)
    if isinstance(granularity, PerGroup):
        o, n_groups, *k = qparams_shape(w.shape, granularity)
        g = granularity.group_size
        return w.reshape(o, n_groups, g, *k).movedim(2, -1)  # (O, I / g, *K, g)
    raise HirelcError(f"unknown granularity {granularity!r}")


def _upper(x: Tensor, percentile: float | None) -> Tensor:
    """Max of the last dim, or its nearest-rank ``percentile`` (kthvalue: no size limit, unlike quantile)."""
    if x.shape[-1] == 0:
        raise HirelcError("cannot choose quantization parameters for an empty weight")
    if percentile is None or percentile >= 100.0:
        return x.amax(dim=-1)
    k = min(max(math.ceil(percentile / 100.0 * x.shape[-1]), 1), x.shape[-1])
    return x.kthvalue(k, dim=-1).values


def _guard(scale: Tensor) -> Tensor:
    """Replace zero scales (all-zero reduction sets) by 1 and keep the rest >= 1e-12."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp_min(_MIN_SCALE).to(torch.float32)
