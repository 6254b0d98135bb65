"""Lowering: turn a policy into a physically smaller, integer-quantized, fine-tuned PyTorch model.

Steps, each a function of its own so the search can reuse them on candidates (one module per concern:
:mod:`~hirelc.lower.prune`, :mod:`~hirelc.lower.fold`, :mod:`~hirelc.lower.quantize`, :mod:`~hirelc.lower.qat`,
:mod:`~hirelc.lower.model` for :func:`lower_model`, :mod:`~hirelc.lower.saved` for ``lowered.pt``):

1. :func:`prune` removes output channels / attention heads / MLP units of every prunable group per its keep
   ratio (channels ranked by :func:`channel_saliency`, the loss's first-order Taylor sensitivity to each
   channel on a few training batches, or by weight norms; heads by their qkv weights; coupled layers follow
   through torch-pruning's dependency graph; ViT attention ``num_heads``/``attn_dim`` updated);
2. after pruning, :func:`recalibrate_batchnorm` re-estimates BatchNorm statistics on a few training batches
   (the removed channels no longer feed the layers after them); :func:`fold_batchnorm` folds each BatchNorm that
   directly follows a conv into the conv, so the exported graph has ``DequantizeLinear -> Conv`` with nothing in
   between and ONNX Runtime can fuse integer convs;
3. :func:`swap_quantized` replaces each quantized layer with a :class:`~hirelc.qmodules.QConv2d` /
   :class:`~hirelc.qmodules.QLinear`;
4. :func:`calibrate` fixes the input-activation ranges on training batches (min-max or percentile); a
   :class:`RuntimeProbe` decides which layer outputs and residual blocks get quantizers of their own;
5. quantization-aware fine-tuning (straight-through estimator), then :meth:`freeze` keeps integers only.
"""

from hirelc.lower.fold import bn_fold_factors, fold_batchnorm, recalibrate_batchnorm
from hirelc.lower.model import lower_model
from hirelc.lower.prune import channel_saliency, prune, saliency_batches, select_channels, validate_layers
from hirelc.lower.qat import fine_tune, fine_tune_best
from hirelc.lower.quantize import (
    RuntimeProbe,
    add_block_quantizers,
    add_output_quantizers,
    calibrate,
    freeze,
    lowered_structure,
    place_quantizers,
    placement_key,
    storage_report,
    swap_quantized,
)
from hirelc.lower.saved import LOWERED_FORMAT, LOWERED_VERSION, load_lowered, rebuild_lowered, save_lowered
from hirelc.options import IMPORTANCES, SALIENCY_BATCH, LowerConfig

__all__ = [
    "IMPORTANCES",
    "LOWERED_FORMAT",
    "LOWERED_VERSION",
    "LowerConfig",
    "RuntimeProbe",
    "SALIENCY_BATCH",
    "add_block_quantizers",
    "add_output_quantizers",
    "bn_fold_factors",
    "calibrate",
    "channel_saliency",
    "fine_tune",
    "fine_tune_best",
    "fold_batchnorm",
    "freeze",
    "load_lowered",
    "lower_model",
    "lowered_structure",
    "place_quantizers",
    "placement_key",
    "prune",
    "recalibrate_batchnorm",
    "rebuild_lowered",
    "saliency_batches",
    "save_lowered",
    "select_channels",
    "storage_report",
    "swap_quantized",
    "validate_layers",
]
