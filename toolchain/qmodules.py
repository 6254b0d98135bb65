"""Quantized layers that hold **integer weights + scales** (not a float copy), and activation fake-quant.

Lifecycle of a :class:`QConv2d` / :class:`QLinear`:

1. built from a float layer with a :class:`~hirelc.policy.LayerPolicy`; during quantization-aware
   fine-tuning it keeps a float *latent* weight and fake-quantizes it (straight-through estimator);
2. :meth:`freeze` quantizes the latent weight once and drops it: from then on the module stores only
   ``qweight`` (int8/uint8 tensor holding 2..8-bit values), ``scale`` and ``zero_point``;
3. in ONNX export each weight becomes ``integer initializer -> DequantizeLinear`` and each calibrated
   input activation ``QuantizeLinear -> DequantizeLinear``, emitted by the autograd functions below, so the
   graph is exactly what the PyTorch module computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hirelc import kernels as K
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, PerTensor, Scheme, parse_granularity


def _block_size(granularity) -> int:
    return granularity.group_size if isinstance(granularity, PerGroup) else 0


class _DequantizeWeight(torch.autograd.Function):
    """Integer weight -> float; exported as one ``DequantizeLinear`` on an integer initializer."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int, block_size: int, granularity_json: str):
        return K.dequantize(q, scale, zero_point, parse_granularity(granularity_json))

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, block_size, granularity_json):
        kwargs = {}
        if granularity_json != "per-tensor":
            kwargs["axis_i"] = axis
        if block_size:
            kwargs["block_size_i"] = block_size
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


class _FakeQuantAct(torch.autograd.Function):
    """Per-tensor activation fake-quant; exported as ``QuantizeLinear -> DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        zp = zero_point.float()
        v = torch.round(x / scale) + zp
        ctx.save_for_backward((v >= qmin) & (v <= qmax))  # straight-through inside the clip range
        return (torch.clamp(v, qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class ActQuant(nn.Module):
    """Per-tensor 8-bit activation quantizer, calibrated from observed ranges.

    ``signed=False`` gives uint8 with a zero-point (the fast int8 path on CPUs without VNNI); ``signed=True``
    gives int8. Until calibrated it is the identity and, while ``observing``, records the range it sees.
    """

    def __init__(self, signed: bool = False, percentile: float | None = None):
        super().__init__()
        self.signed = signed
        self.percentile = percentile
        self.observing = False
        dtype = torch.int8 if signed else torch.uint8
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=dtype))
        self._lo: list[float] = []
        self._hi: list[float] = []

    @property
    def calibrated(self) -> bool:
        return bool(self.scale.item() > 0)

    @property
    def qrange(self) -> tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if self.percentile is not None and x.numel() > 16:
            sample = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
            lo = torch.quantile(sample, 1 - self.percentile / 100).item()
            hi = torch.quantile(sample, self.percentile / 100).item()
        else:
            lo, hi = x.min().item(), x.max().item()
        self._lo.append(lo)
        self._hi.append(hi)

    def finish_calibration(self) -> None:
        """Fix scale and zero-point from the observed ranges (min of minima, max of maxima)."""
        if not self._lo:
            return
        lo, hi = min(min(self._lo), 0.0), max(max(self._hi), 0.0)
        qmin, qmax = self.qrange
        if self.signed:
            amax = max(abs(lo), abs(hi), 1e-8)
            scale, zp = amax / qmax, 0
        else:
            scale = max(hi - lo, 1e-8) / (qmax - qmin)
            zp = int(min(max(round(qmin - lo / scale), qmin), qmax))
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self._lo, self._hi = [], []
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            return x
        qmin, qmax = self.qrange
        return _FakeQuantAct.apply(x, self.scale, self.zero_point, qmin, qmax)


def weight_code_bits(lp: LayerPolicy, reduce_range: bool = True) -> int:
    """Width of a quantized layer's integer codes: its bits, or 7 for reduced-range 8-bit symmetric weights."""
    return 7 if reduce_range and lp.bits == 8 and lp.scheme == Scheme.SYMMETRIC else int(lp.bits)


class _QuantLayer(nn.Module):
    """Shared state of QConv2d / QLinear: integer weight, scales, optional latent weight and input quantizer."""

    def _init_quant(self, weight: torch.Tensor, bias: torch.Tensor | None, lp: LayerPolicy,
                    reduce_range: bool = True) -> None:
        assert lp.bits is not None, "float layers are not swapped"
        self.bits = int(lp.bits)
        # 8-bit symmetric weights use 7-bit codes: x86 CPUs without VNNI multiply uint8 activations by int8
        # weights in pairs summed into int16 (ONNX Runtime's U8S8 kernels), and 2 * 255 * 127 overflows it;
        # 2 * 255 * 64 does not. The container (and the storage count) stays 8 bits.
        self.code_bits = weight_code_bits(lp, reduce_range)
        self.scheme = lp.scheme.value
        self.granularity = lp.granularity.to_json()
        self.weight_shape = tuple(weight.shape)
        self.latent = nn.Parameter(weight.detach().clone())  # (O, I, *k); removed by freeze()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        scale, zp = K.choose_qparams(weight.detach(), self._qbits, self._scheme, self._gran)
        self.register_buffer("qweight", K.quantize(weight.detach(), scale, zp, self._qbits, self._scheme,
                                                   self._gran))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zp)
        self.act = ActQuant()
        self.out_act: ActQuant | None = None  # set where ORT would otherwise leave the layer unfused

    @property
    def _qbits(self) -> int:
        """Width of the integer codes (``bits``, or 7 for reduced-range 8-bit weights)."""
        return getattr(self, "code_bits", self.bits)  # absent in files saved before reduced ranges existed

    @property
    def _scheme(self) -> Scheme:
        return Scheme(self.scheme)

    @property
    def _gran(self):
        return parse_granularity(self.granularity)

    @property
    def frozen(self) -> bool:
        return self.latent is None

    def freeze(self) -> None:
        """Quantize the latent weight once and keep only integers + scales."""
        if self.latent is None:
            return
        w = self.latent.detach()
        scale, zp = K.choose_qparams(w, self._qbits, self._scheme, self._gran)
        self.qweight = K.quantize(w, scale, zp, self._qbits, self._scheme, self._gran)
        self.scale = scale.float()
        self.zero_point = zp
        self.latent = None

    def weight_float(self) -> torch.Tensor:
        """The weight the layer computes with: fake-quantized latent (training) or dequantized integers."""
        if self.latent is not None:
            with torch.no_grad():
                scale, zp = K.choose_qparams(self.latent, self._qbits, self._scheme, self._gran)
            return K.fake_quantize(self.latent, scale, zp, self._qbits, self._scheme, self._gran)
        g = self._gran
        axis = 1 if isinstance(g, PerGroup) else 0  # blocks run along the input dim; channels along the output
        return _DequantizeWeight.apply(self.qweight, self.scale, self.zero_point, axis, _block_size(g),
                                       self.granularity)

    def export_weight(self, transpose: bool) -> torch.Tensor:
        """Weight for ONNX export; linear weights are laid out (in, out) so DequantizeLinear feeds MatMul."""
        assert self.latent is None, "freeze() before export"
        if not transpose:
            return self.weight_float()
        g = self._gran
        q = self.qweight.t().contiguous()  # (I, O)
        scale, zp = self.scale, self.zero_point
        if isinstance(g, PerGroup):
            scale, zp = scale.t().contiguous(), zp.t().contiguous()  # (I/g, O), blocked along axis 0
            return _DequantizeWeightT.apply(q, scale, zp, 0, g.group_size)
        axis = 1 if isinstance(g, PerChannel) else 0
        return _DequantizeWeightT.apply(q, scale, zp, axis, 0 if isinstance(g, PerTensor) else -1)

    def storage_bits(self) -> int:
        n = self.qweight.numel()
        zp_bits = self.bits if self._scheme == Scheme.ASYMMETRIC else 0
        b = self.bits * n + self.scale.numel() * (32 + zp_bits)
        if self.bias is not None:
            b += 32 * self.bias.numel()
        return b

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, codes={self._qbits}, scheme={self.scheme}, granularity={self.granularity}, "
                f"frozen={self.frozen}")


class _DequantizeWeightT(torch.autograd.Function):
    """Dequantize an (I, O) weight; ``block_size`` -1 means per-axis, 0 per-tensor, >0 blocked on axis 0."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int, block_size: int):
        zp = zero_point.float()
        if block_size > 0:
            scale = scale.repeat_interleave(block_size, dim=0)
            zp = zp.repeat_interleave(block_size, dim=0)
        elif block_size < 0:  # per output channel, which is axis 1 here
            scale, zp = scale.reshape(1, -1), zp.reshape(1, -1)
        return (q.float() - zp) * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, block_size):
        kwargs = {}
        if block_size != 0:
            kwargs["axis_i"] = axis
        if block_size > 0:
            kwargs["block_size_i"] = block_size
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


class QConv2d(_QuantLayer):
    def __init__(self, conv: nn.Conv2d, lp: LayerPolicy, reduce_range: bool = True):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only zero padding with explicit sizes is supported")
        self._init_quant(conv.weight, conv.bias, lp, reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        x = self.act(x)
        y = F.conv2d(x, self.weight_float(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        out_act = getattr(self, "out_act", None)  # absent in files saved before output quantizers existed
        return out_act(y) if out_act is not None else y


class QLinear(_QuantLayer):
    def __init__(self, linear: nn.Linear, lp: LayerPolicy, reduce_range: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear.weight, linear.bias, lp, reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        y = F.linear(self.act(x), self.weight_float(), self.bias)
        out_act = getattr(self, "out_act", None)
        return out_act(y) if out_act is not None else y

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 2-D MatMul + Add would be fused by ONNX Runtime into a float Gemm (an integer QGemm needs its output
        # quantized); as a 3-D MatMul it becomes MatMulIntegerToFloat, with float logits kept exact. The input is
        # made 3-D before its Q/DQ so that DQ feeds MatMul directly. Blocked (per-group) weights stay 2-D: they
        # fuse into MatMulNBits, or have no integer kernel.
        flat = x.dim() == 2 and not isinstance(self._gran, PerGroup)
        x = self.act(x.unsqueeze(1) if flat else x)  # (B, 1, I) when flat
        y = torch.matmul(x, self.export_weight(transpose=True))
        y = y + self.bias if self.bias is not None else y
        y = y.squeeze(1) if flat else y
        out_act = getattr(self, "out_act", None)
        return out_act(y) if out_act is not None else y


def quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantLayer)}


# Block-level activation quantizers. A residual block's add runs as ONNX Runtime's integer ``QLinearAdd`` only
# when both of its inputs come out of ``DequantizeLinear`` and its result goes into ``QuantizeLinear``; the
# shortcut is the block's input, so the block input gets its own quantizer. They are attached as a submodule
# plus a forward (pre-)hook rather than a wrapper, so every layer keeps its qualified name.
BLOCK_IN, BLOCK_OUT = "hirelc_in_act", "hirelc_out_act"


def _quantize_block_input(module: nn.Module, args: tuple):
    return (getattr(module, BLOCK_IN)(args[0]), *args[1:])


def _quantize_block_output(module: nn.Module, args: tuple, out):
    return getattr(module, BLOCK_OUT)(out)


def attach_block_quantizers(block: nn.Module, output: bool, signed: bool = False,
                            percentile: float | None = None) -> None:
    """Give ``block`` an input activation quantizer (and an output one if ``output``), uncalibrated."""
    if isinstance(block, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise ValueError("block quantizers need a module with its own forward, not a container")
    setattr(block, BLOCK_IN, ActQuant(signed=signed, percentile=percentile))
    block.register_forward_pre_hook(_quantize_block_input)
    if output:
        setattr(block, BLOCK_OUT, ActQuant(signed=signed, percentile=percentile))
        block.register_forward_hook(_quantize_block_output)


def detach_block_quantizers(block: nn.Module) -> None:
    """Undo :func:`attach_block_quantizers`."""
    for hooks, fn, attr in ((block._forward_pre_hooks, _quantize_block_input, BLOCK_IN),
                            (block._forward_hooks, _quantize_block_output, BLOCK_OUT)):
        for k in [k for k, h in hooks.items() if h is fn]:
            del hooks[k]
        if hasattr(block, attr):
            delattr(block, attr)
