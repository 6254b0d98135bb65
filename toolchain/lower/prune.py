"""Structured pruning: rank each prunable group's channels (or attention heads) and remove them for real."""

from __future__ import annotations

import torch
from torch import nn

from hirelc import kernels as K
from hirelc.cost import group_keeps, kept_channels, kept_shape
from hirelc.errors import HirelcError
from hirelc.options import SALIENCY_BATCH, LowerConfig
from hirelc.policy import LayerPolicy, PerGroup
from hirelc.topology import Topology, conv_bn_pairs, dependency_graph, is_grouped_conv, out_pruning_fn


def validate_layers(topo: Topology, layers: dict[str, LayerPolicy]) -> None:
    """Reject policies whose per-group sizes stop dividing a layer's input dim once its inputs are pruned."""
    keeps = group_keeps(list(topo.layers), layers)
    for s in topo.layers:
        lp = layers[s.name]
        if lp.quantized and isinstance(lp.granularity, PerGroup):
            _, inn = kept_shape(s, layers, keeps)
            if inn % lp.granularity.group_size:
                raise HirelcError(
                    f"layer {s.name!r}: group size {lp.granularity.group_size} does not divide its input dim "
                    f"{inn} after pruning"
                )


def select_channels(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy],
                    fisher: dict[str, torch.Tensor] | None = None,
                    saliency: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[list[int], int]]:
    """Which output channels every pruned group's leader loses: ``{leader: (removed indices, kept count)}``.

    All groups are ranked on the unpruned ``model``, so the choice does not depend on the order groups are cut
    in. Channels are ranked on ``fisher`` (per-weight Fisher of the leader) when given, else on ``saliency``
    (:func:`channel_saliency`: every layer writing a group's channels has a say), else on the weight norms of
    those layers. Attention heads are ranked on their qkv weights; for them the kept count is in heads and the
    indices are qkv rows.
    """
    out: dict[str, tuple[list[int], int]] = {}
    for spec in topo.layers:
        keep = layers[spec.name].keep_ratio
        if not spec.prunable or keep >= 1.0:
            continue
        w = model.get_submodule(spec.name).weight.detach()  # (O, I, ...)
        f = fisher.get(spec.name) if fisher else None
        if spec.kind == "attn_qkv" and spec.num_heads:
            heads = spec.num_heads
            n_keep = max(1, round(keep * heads))
            if n_keep >= heads:
                continue
            kept = set(K.topk_keep(K.head_importance(w, heads, f), n_keep))
            drop_heads = [h for h in range(heads) if h not in kept]
            out[spec.name] = (K.head_channel_indices(drop_heads, heads, w.shape[0] // 3), n_keep)
            continue
        n_out = w.shape[0]
        n_keep = kept_channels(n_out, keep)
        if n_keep >= n_out:
            continue
        if f is not None:
            scores = K.fisher_channel_importance(w, f)
        else:
            scores = _group_scores(model, topo, spec.prune_group, n_out, saliency)
        kept = set(K.topk_keep(scores, n_keep))
        out[spec.name] = ([i for i in range(n_out) if i not in kept], n_keep)
    return out


def prune(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy],
          fisher: dict[str, torch.Tensor] | None = None,
          saliency: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Physically remove the channels/heads :func:`select_channels` picks, in place; returns the number of
    channels removed per group leader."""
    selection = select_channels(model, topo, layers, fisher, saliency)
    if not selection:
        return {}
    dg = dependency_graph(model, topo.input_shape)
    _refuse_grouped_convs(model, dg, selection)  # before any cut: the model is left whole on error
    removed: dict[str, int] = {}
    for spec in topo.layers:
        if spec.name not in selection:
            continue
        idxs, n_keep = selection[spec.name]
        mod = model.get_submodule(spec.name)
        dg.get_pruning_group(mod, out_pruning_fn(mod), idxs=idxs).prune()
        if spec.kind == "attn_qkv":
            attn = model.get_submodule(spec.name.rpartition(".")[0])
            attn.num_heads = n_keep
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = n_keep * attn.head_dim
        removed[spec.name] = len(idxs)
    return removed


def _refuse_grouped_convs(model: nn.Module, dg, selection: dict[str, tuple[list[int], int]]) -> None:
    """Raise instead of letting torch-pruning cut a grouped (non-depthwise) conv: it would slice the conv's
    per-group input weights with whole-layer indices (``INDICES element is out of DATA bounds``, or, where
    the indices happen to fit, silently the wrong weights) and leave its ``groups`` as they were.
    :func:`hirelc.topology.build_topology` never marks such a group prunable, so this only fires on a
    topology that was not built from the model being pruned."""
    names = {m: n for n, m in model.named_modules()}
    for leader in selection:
        mod = model.get_submodule(leader)
        for dep, _ in dg.get_pruning_group(mod, out_pruning_fn(mod), idxs=[0]):
            tm = dep.target.module
            if is_grouped_conv(tm):
                raise HirelcError(
                    f"cannot prune the group led by {leader!r}: grouped conv {names.get(tm, '?')!r} "
                    f"(groups={tm.groups}) shares its channels; rebuild the topology from this model (hirelc keeps "
                    f"such groups whole)"
                )


def _normalized(imp: torch.Tensor) -> torch.Tensor:
    return imp / imp.mean().clamp_min(1e-12)


def _group_scores(model: nn.Module, topo: Topology, group: int, n: int,
                  saliency: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Importance of a prune group's ``n`` channels: every layer writing them has a say (a residual stream
    has one writer per block), by its Taylor saliency when measured, else by its weight norms."""
    total = torch.zeros(n)
    for o in topo.layers:
        if o.prune_group != group:
            continue
        if saliency and o.name in saliency and saliency[o.name].numel() == n:
            total += _normalized(saliency[o.name])
        else:
            total += _normalized(K.channel_importance(model.get_submodule(o.name).weight.detach()))
    return total


def saliency_batches(bundle, cfg: LowerConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.importance_batches`` shuffled training batches of 128 (seeded: the same on every call)."""
    out = []
    for x, y in bundle.loader("train", SALIENCY_BATCH, shuffle=True, seed=cfg.seed + 7):
        out.append((x, y))
        if len(out) >= cfg.importance_batches:
            break
    return out


def channel_saliency(model: nn.Module, topo: Topology, batches) -> dict[str, torch.Tensor]:
    """First-order Taylor saliency of every conv/linear layer's output channels, from a few labelled batches.

    The activation scored is what pruning a channel removes: the output of the BatchNorm (with its activation)
    that follows a conv where there is one, else the layer's own output.
    """
    bn_of = dict(conv_bn_pairs(model, topo.input_shape))
    named = dict(model.named_modules())
    targets = {s.name: named[bn_of.get(s.name, s.name)] for s in topo.layers if s.kind != "attn_qkv"}
    acts: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _inp, out):
            if out.requires_grad:
                out.retain_grad()
                acts[name] = out
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    n = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for x, y in batches:
            x = x.clone().requires_grad_(True)  # gradients reach the activations with the weights frozen
            with torch.enable_grad():
                torch.nn.functional.cross_entropy(model(x), y).backward()
            for name, a in acts.items():
                if a.grad is None:
                    continue
                dim = 1 if a.dim() == 4 else -1
                s = K.taylor_channel_importance(a, a.grad, channel_dim=dim) * len(y)
                scores[name] = scores[name] + s if name in scores else s
            n += len(y)
            acts.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), params, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    if n == 0:
        raise HirelcError("channel_saliency got no batches")
    return {k: v / n for k, v in scores.items()}
