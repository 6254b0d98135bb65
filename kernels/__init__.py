"""Tensor kernels: granularity types, quantization primitives, sub-byte packing and pruning saliency scores.

Pure torch functions with no device-specific code (CPU reference, CUDA tensors work as-is). Importing
this package does not initialise CUDA.
"""

from hirelc.kernels.granularity import Granularity, PerChannel, PerGroup, PerTensor, Scheme, parse_granularity
from hirelc.kernels.importance import (
    channel_importance,
    fisher_channel_importance,
    head_channel_indices,
    head_importance,
    taylor_channel_importance,
    topk_keep,
)
from hirelc.kernels.pack import container_bits, pack_int, packed_nbytes, unpack_int
from hirelc.kernels.quant import (
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

__all__ = [
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "Scheme",
    "parse_granularity",
    "channel_importance",
    "choose_qparams",
    "container_bits",
    "dequantize",
    "expand_qparams",
    "fake_quantize",
    "fisher_channel_importance",
    "head_channel_indices",
    "head_importance",
    "pack_int",
    "packed_nbytes",
    "qparams_shape",
    "quant_range",
    "quantization_error_bound",
    "quantize",
    "storage_dtype",
    "taylor_channel_importance",
    "topk_keep",
    "unpack_int",
]
