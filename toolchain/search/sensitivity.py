"""Fisher-information sensitivity of each layer and block: how much the loss cares about its weights.

Diagonal empirical Fisher, computed once per baseline: for each labelled sample, the squared gradient of the
cross-entropy loss w.r.t. every weight of a layer, summed over the layer's weights, averaged over samples, then
normalised so the most sensitive layer (block) scores 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F


def normalise(scores: Mapping[str, float]) -> dict[str, float]:
    """Divide by the maximum so the largest score is 1 (all zeros stay zeros)."""
    top = max(scores.values(), default=0.0)
    return {k: (float(v) / top if top > 0 else 0.0) for k, v in scores.items()}


def fisher_sensitivity(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layer_names: list[str],
    block_of: Mapping[str, str],
    n_samples: int = 50,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Per-layer and per-block Fisher scores ``{"layer": {name: s}, "block": {block: s}}``, each max-normalised.

    Batches of any size are split into single samples (batch of 1): the empirical Fisher is the mean of
    *per-sample* squared gradients, which a squared batch-mean gradient would underestimate. The model runs in
    eval mode (batch-norm statistics and dropout fixed) and its mode is restored afterwards.
    """
    was_training = model.training
    model.eval().to(device)
    weights = [model.get_submodule(n).weight for n in layer_names]
    total = torch.zeros(len(layer_names), dtype=torch.float64)
    seen = 0
    try:
        for x, y in batches:
            for i in range(x.shape[0]):
                if seen >= n_samples:
                    break
                logits = model(x[i : i + 1].to(device))  # (1, num_classes)
                loss = F.cross_entropy(logits, y[i : i + 1].to(device))
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                total += torch.tensor([0.0 if g is None else float(g.double().pow(2).sum()) for g in grads])
                seen += 1
            if seen >= n_samples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("fisher_sensitivity got no samples")
    layer = normalise({n: float(v) / seen for n, v in zip(layer_names, total.tolist(), strict=True)})
    block: dict[str, float] = {}
    for n, s in layer.items():
        block[block_of[n]] = block.get(block_of[n], 0.0) + s
    return {"layer": layer, "block": normalise(block)}
