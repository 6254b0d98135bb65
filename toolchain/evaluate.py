"""How the search scores a candidate policy on the real model (the search itself never sees the model).

* :meth:`RealEvaluator.proxy_drop` — cold start: lower without fine-tuning and compare logits with the
  baseline on a calibration batch; ``20 * MSE`` capped at 50 points stands in for the accuracy drop.
* :meth:`RealEvaluator.real_accuracy` — lower the candidate, run a short QAT fine-tune on a training subset,
  and measure validation accuracy. This is what decides the winner.
* :meth:`RealEvaluator.predict_bytes` — bytes of the exported ONNX file, from the layer shapes and their
  on-disk containers (int4 packed two per byte, int8 one per byte, fp32 scales), plus everything the policy
  does not touch (norms, embeddings) in fp32.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from hirelc.cost import group_keeps, kept_shape
from hirelc.kernels import container_bits
from hirelc.lower import LowerConfig, lower_model
from hirelc.policy import LayerPolicy, PerChannel, PerGroup
from hirelc.topology import Topology
from hirelc.train import evaluate, predict_logits

ONNX_OVERHEAD_BYTES = 4096  # graph structure, names and attributes of a small model (measured order)


class Predictors:
    """Size and latency predictions of a policy, available before any training (budget checks use them)."""

    def __init__(self, model: nn.Module, topo: Topology, latency_table: dict | None = None):
        self.topo = topo
        self.latency_table = latency_table
        self.other_params = sum(p.numel() for p in model.parameters()) - sum(s.params for s in topo.layers)

    def predict_bytes(self, layers: dict[str, LayerPolicy]) -> float:
        return predict_onnx_bytes(self.topo, layers, self.other_params)

    def predict_latency_ms(self, layers: dict[str, LayerPolicy]) -> float | None:
        """Batch-8 ONNX Runtime latency from the per-layer table, when one was measured."""
        if self.latency_table is None:
            return None
        from hirelc.latency import predict_latency

        return predict_latency(self.latency_table, self.topo, layers)


class RealEvaluator:
    """Scores policies by lowering the real model; sizes of the subsets trade fidelity for search time."""

    def __init__(self, model: nn.Module, topo: Topology, bundle, predictors: Predictors, *, qat_steps: int = 40,
                 train_samples: int = 2048, val_samples: int = 1000, calib_samples: int = 256, batch_size: int = 64,
                 lr: float = 5e-4, seed: int = 0):
        self.model, self.topo, self.seed = model.eval(), topo, seed
        self.predictors = predictors
        self.cfg = LowerConfig(epochs=0, max_steps=qat_steps, lr=lr, batch_size=batch_size, calib_batches=4,
                               keep_best=False, seed=seed)  # the search scores the fine-tuned candidate as is
        self._sub = _SubsetBundle(bundle, train_samples, val_samples, seed)
        self.calib_x = bundle.subset("train", calib_samples, seed=seed + 1).x
        self.base_logits = predict_logits(self.model, self.calib_x)
        self.baseline_accuracy = evaluate(self.model, self._sub.loader("val", 256))
        self.eval_seconds: list[float] = []
        self._saliency: dict[str, torch.Tensor] | None = None

    def saliency(self, layers: dict[str, LayerPolicy]) -> dict[str, torch.Tensor] | None:
        """The baseline's channel saliency, measured once (every candidate prunes the same model)."""
        if self.cfg.importance != "taylor" or all(lp.keep_ratio >= 1.0 for lp in layers.values()):
            return None
        if self._saliency is None:
            import copy

            from hirelc.lower import channel_saliency, saliency_batches

            self._saliency = channel_saliency(copy.deepcopy(self.model), self.topo,
                                              saliency_batches(self._sub, self.cfg))
        return self._saliency

    def proxy_drop(self, layers: dict[str, LayerPolicy]) -> float:
        # the proxy is called for every agent step: skip the ORT graph probes that only decide what fuses
        cfg = LowerConfig(**{**self.cfg.__dict__, "max_steps": 0, "fuse_outputs": False, "fuse_adds": False})
        lowered, _ = lower_model(self.model, self.topo, layers, self._sub, cfg, progress=False,
                                 saliency=self.saliency(layers))
        mse = F.mse_loss(predict_logits(lowered, self.calib_x), self.base_logits).item()
        return min(20.0 * mse, 50.0)

    def real_accuracy(self, layers: dict[str, LayerPolicy]) -> float:
        t0 = time.time()
        lowered, _ = lower_model(self.model, self.topo, layers, self._sub, self.cfg, progress=False,
                                 saliency=self.saliency(layers))
        acc = evaluate(lowered, self._sub.loader("val", 256))
        self.eval_seconds.append(time.time() - t0)
        return acc

    def predict_bytes(self, layers: dict[str, LayerPolicy]) -> float:
        return self.predictors.predict_bytes(layers)

    def predict_latency_ms(self, layers: dict[str, LayerPolicy]) -> float | None:
        return self.predictors.predict_latency_ms(layers)


def predict_onnx_bytes(topo: Topology, layers: dict[str, LayerPolicy], other_params: int) -> float:
    """Predicted size of model.onnx: containers as written by the exporter, scales in fp32."""
    specs = list(topo.layers)
    keeps = group_keeps(specs, layers)
    total = 4 * other_params + ONNX_OVERHEAD_BYTES
    for s in specs:
        out, inn = kept_shape(s, layers, keeps)
        lp = layers[s.name]
        n_w = out * inn * (math.prod(s.kernel) if s.kernel else 1)
        total += 4 * out  # bias (BN folding gives every conv one)
        if lp.bits is None:
            total += 4 * n_w
            continue
        total += math.ceil(n_w * container_bits(lp.bits) / 8)
        g = lp.granularity
        n_scales = out if isinstance(g, PerChannel) else (
            out * max(1, inn // g.group_size) * (math.prod(s.kernel) if s.kernel else 1) if isinstance(g, PerGroup)
            else 1)
        total += n_scales * (4 + container_bits(lp.bits) / 8)  # fp32 scale + zero-point (always written)
        total += 8  # activation scale + zero-point
    return float(total)


class _SubsetBundle:
    """A view of a DataBundle restricted to fixed stratified subsets (what search evaluations train on)."""

    def __init__(self, bundle, train_samples: int, val_samples: int, seed: int):
        self.train = bundle.subset("train", min(train_samples, len(bundle.train)), seed=seed)
        self.val = bundle.subset("val", min(val_samples, len(bundle.val)), seed=seed)
        self.test = bundle.test

    def loader(self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0, limit=None):
        data = getattr(self, split)
        ds = torch.utils.data.TensorDataset(data.x, data.y)
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
