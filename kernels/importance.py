"""Saliency scores for structured pruning: which output channels / attention heads to keep.

All scores are float32 and larger means more important. Weights are in PyTorch layout, output
channels on dim 0 (conv ``(O, I, kh, kw)``, linear ``(O, I)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hirelc.errors import HirelcError


def channel_importance(weight: Tensor, p: int = 2) -> Tensor:
    """Lp norm of each output channel, shape ``(O,)`` (magnitude pruning criterion)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)  # (O, I * K)
    return torch.linalg.vector_norm(w, ord=p, dim=1)


def fisher_channel_importance(weight: Tensor, fisher: Tensor) -> Tensor:
    """Second-order Taylor saliency ``sum(fisher * w**2)`` per output channel, shape ``(O,)``.

    ``fisher`` is a diagonal Fisher estimate (e.g. accumulated squared gradients) of ``weight``'s shape;
    ``fisher * w**2 / 2`` approximates the loss increase from zeroing a weight.
    """
    if fisher.shape != weight.shape:
        raise HirelcError(f"fisher shape {tuple(fisher.shape)} does not match weight shape {tuple(weight.shape)}")
    s = fisher.detach().float() * weight.detach().float() ** 2
    return s.reshape(weight.shape[0], -1).sum(dim=1)


def taylor_channel_importance(act: Tensor, grad: Tensor, channel_dim: int = 1) -> Tensor:
    """First-order Taylor saliency of each channel of an activation, shape ``(C,)``.

    ``act`` and ``grad`` (the loss gradient with respect to ``act``) have the batch on dim 0 and channels on
    ``channel_dim`` (1 for conv maps ``(B, C, H, W)``, -1 for token features ``(B, N, C)``). Removing channel
    ``c`` of sample ``b`` changes the loss by about ``-sum(act * grad)`` over that channel's positions; the
    score is the mean over the batch of that change's magnitude.
    """
    if act.shape != grad.shape:
        raise HirelcError(f"activation shape {tuple(act.shape)} does not match gradient shape {tuple(grad.shape)}")
    if act.dim() < 2:
        raise HirelcError(f"taylor_channel_importance needs a batch and a channel dim, got shape {tuple(act.shape)}")
    prod = (act.detach().float() * grad.detach().float()).movedim(channel_dim, 1)
    per_sample = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(dim=2)  # (B, C)
    return per_sample.abs().mean(dim=0)


def head_importance(qkv_weight: Tensor, num_heads: int, fisher: Tensor | None = None) -> Tensor:
    """Saliency of each attention head, shape ``(num_heads,)``, from a fused ``qkv`` weight.

    ``qkv_weight`` is ``(3 * D, D_in)`` stacked as ``[q; k; v]``; head ``h`` owns rows
    ``h * D / num_heads ... (h + 1) * D / num_heads`` of each of q, k and v. A head's score sums
    ``w**2`` (or ``fisher * w**2`` when ``fisher`` is given) over all those rows.
    """
    rows = qkv_weight.shape[0]
    if rows % 3 != 0 or (rows // 3) % num_heads != 0:
        raise HirelcError(f"a qkv weight with {rows} rows cannot hold q, k, v for {num_heads} heads")
    s = qkv_weight.detach().float() ** 2
    if fisher is not None:
        if fisher.shape != qkv_weight.shape:
            raise HirelcError(f"fisher shape {tuple(fisher.shape)} does not match qkv shape {tuple(qkv_weight.shape)}")
        s = s * fisher.detach().float()
    per_row = s.reshape(rows, -1).sum(dim=1)  # (3 * D,)
    return per_row.reshape(3, num_heads, -1).sum(dim=(0, 2))  # (num_heads,)


def head_channel_indices(heads: Sequence[int], num_heads: int, dim: int) -> list[int]:
    """Sorted qkv output-row indices (in all of q, k and v) of ``heads``; ``dim`` is D, the width of q."""
    if dim % num_heads != 0:
        raise HirelcError(f"dim {dim} is not divisible by num_heads {num_heads}")
    head_dim = dim // num_heads
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise HirelcError(f"head index out of range 0..{num_heads - 1}: {bad}")
    return sorted(part * dim + h * head_dim + j for part in range(3) for h in set(heads) for j in range(head_dim))


def topk_keep(scores: Tensor, keep: int) -> list[int]:
    """Sorted indices of the ``keep`` highest scores, ties going to the lower index; ``keep`` clamped to [1, n]."""
    scores = torch.as_tensor(scores).detach().reshape(-1)
    n = scores.numel()
    if n == 0:
        raise HirelcError("topk_keep needs at least one score")
    keep = min(max(int(keep), 1), n)
    order = torch.sort(scores, descending=True, stable=True).indices  # equal scores keep index order
    return sorted(order[:keep].tolist())
