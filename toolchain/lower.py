"""Lowering: turn a policy into a physically smaller, integer-quantized, fine-tuned PyTorch model.

Steps, each a function of its own so the search can reuse them on candidates:

1. :func:`prune` removes output channels / attention heads / MLP units of every prunable group per its keep
   ratio (channels ranked by :func:`channel_saliency`, the loss's first-order Taylor sensitivity to each
   channel on a few training batches, or by weight norms; heads by their qkv weights; coupled layers follow
   through torch-pruning's dependency graph; ViT attention ``num_heads``/``attn_dim`` updated);
2. :func:`fold_batchnorm` folds each BatchNorm that directly follows a conv into the conv, so the exported
   graph has ``DequantizeLinear -> Conv`` with nothing in between and ONNX Runtime can fuse integer convs;
3. :func:`swap_quantized` replaces each quantized layer with a :class:`~hirelc.qmodules.QConv2d` /
   :class:`~hirelc.qmodules.QLinear`;
4. :func:`calibrate` fixes the input-activation ranges on training batches (min-max or percentile);
5. quantization-aware fine-tuning (straight-through estimator), then :meth:`freeze` keeps integers only.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hirelc import kernels as K
from hirelc import runs
from hirelc.cost import group_keeps, kept_channels, kept_shape, policy_storage, storage_totals
from hirelc.errors import HirelcError
from hirelc.policy import LayerPolicy, PerGroup, Policy, format_key, parse_granularity
from hirelc.qmodules import (
    ActQuant,
    QConv2d,
    QLinear,
    attach_block_quantizers,
    detach_block_quantizers,
    quant_layers,
)
from hirelc.topology import Topology, build_topology, dependency_graph, is_grouped_conv, out_pruning_fn
from hirelc.train import TrainConfig, evaluate, fit

LOWERED_FORMAT = "hirelc-lowered"
LOWERED_VERSION = 2  # 2: state_dict + JSON recipe (1 pickled the modules)


@dataclass(frozen=True)
class LowerConfig:
    epochs: float = 1.0  # QAT epochs over the training split (fractions allowed)
    lr: float = 5e-4
    batch_size: int = 128
    calib_batches: int = 8  # training batches used to calibrate activation ranges
    act_quant: bool = True  # Q/DQ on the inputs of quantized layers (False: weight-only)
    act_signed: bool = False  # uint8 activations by default: the fast int8 path on CPUs without VNNI
    percentile: float | None = None  # None = min-max calibration, else e.g. 99.99
    fuse_outputs: bool = True  # quantize outputs of layers ORT would not fuse (residual/pool inputs, 2-D heads)
    fuse_adds: bool = True  # quantize residual blocks' inputs so ORT runs their adds as integer QLinearAdd
    reduce_range: bool = True  # 7-bit codes for 8-bit symmetric weights (no int16 overflow on CPUs without VNNI)
    importance: str = "taylor"  # channel ranking for pruning: "taylor" (loss saliency on training batches) | "magnitude"
    importance_batches: int = 2  # training batches the Taylor saliency is measured on
    max_steps: int | None = None  # cap on QAT steps (search candidates, tests)
    keep_best: bool = True  # keep the calibrated weights when fine-tuning lowers validation accuracy
    seed: int = 0

    def __post_init__(self):
        from hirelc.validate import at_least, finite

        finite("--epochs", self.epochs, low=0.0)
        finite("--lr", self.lr, low=0.0, strict_low=True)
        at_least("--max-steps", self.max_steps, 0)
        at_least("batch size", self.batch_size, 1)
        at_least("calibration batches", self.calib_batches, 1)
        at_least("--seed", self.seed, 0)
        if self.percentile is not None:
            finite("--percentile", self.percentile, low=50.0, high=100.0, strict_low=True)
        if self.importance not in IMPORTANCES:
            raise HirelcError(f"unknown pruning importance {self.importance!r}; expected one of {', '.join(IMPORTANCES)}")


IMPORTANCES = ("taylor", "magnitude")
SALIENCY_BATCH = 128

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


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


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """(conv, BatchNorm2d) name pairs where the BN directly and alone consumes the conv's output.

    Pairs are found by running the model once and matching tensor identity (conv output is the BN input),
    which works for any architecture; a conv read by two BNs is left out.
    """
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda _m, _i, out, n=n: produced.__setitem__(id(out), n)))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(_m, inp, n=n):
                src = produced.get(id(inp[0]))
                if src is not None:
                    pairs.append((src, n))

            hooks.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    consumers: dict[str, int] = {}
    for c, _ in pairs:
        consumers[c] = consumers.get(c, 0) + 1
    return [(c, b) for c, b in pairs if consumers[c] == 1]


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor a BatchNorm applies in inference, ``gamma / sqrt(var + eps)``."""
    inv = (bn.running_var + bn.eps).rsqrt()
    return bn.weight * inv if bn.affine else inv


@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Fold every BatchNorm2d that directly consumes a Conv2d's output into that conv; returns folded convs.

    A BN with an activation attached (timm's BatchNormAct2d) keeps its activation.
    """
    named = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model, input_shape):
        conv, bn = named[conv_name], named[bn_name]
        scale = _bn_scale(bn)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter(bias * scale + shift)
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
        _set_module(model, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
        folded.append(conv_name)
    return folded


def swap_quantized(model: nn.Module, layers: dict[str, LayerPolicy], act_signed: bool = False,
                   percentile: float | None = None, reduce_range: bool = True) -> list[str]:
    """Replace each quantized Conv2d/Linear by its integer-weight module; returns the swapped names."""
    swapped = []
    for name, lp in layers.items():
        if not lp.quantized:
            continue
        mod = model.get_submodule(name)
        q = (QConv2d(mod, lp, reduce_range) if isinstance(mod, nn.Conv2d) else QLinear(mod, lp, reduce_range))
        q.act = ActQuant(signed=act_signed, percentile=percentile)
        _set_module(model, name, q)
        swapped.append(name)
    return swapped


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Observe input ranges of every activation quantizer over ``batches``; returns the batches used."""
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    for a in acts:
        a.observing = True
    model.eval()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for a in acts:
        a.finish_calibration()
    return n


def add_output_quantizers(model: nn.Module, input_shape: tuple[int, ...], cfg: LowerConfig) -> list[str]:
    """Give an output quantizer to each quantized layer ONNX Runtime would leave as a float conv (or matmul).

    ORT builds an integer ``QLinearConv`` only from ``DQ -> Conv -> Q``; a conv feeding a residual add or a
    pool has no ``Q`` after it and would run in float on weights dequantized at every call. (Linear layers
    need none: without an output ``Q`` they become ``MatMulIntegerToFloat``.) Per-group (blocked) convs have
    no integer kernel and are left alone. Returns the layers that got one (still uncalibrated).
    """
    from hirelc.export import unfused_layers

    qls = quant_layers(model)
    names = [n for n in unfused_layers(model, input_shape)
             if n in qls and not isinstance(parse_granularity(qls[n].granularity), PerGroup)]
    for n in names:
        qls[n].out_act = ActQuant(signed=cfg.act_signed, percentile=cfg.percentile)
    return names


def add_block_quantizers(model: nn.Module, topo: Topology, out_quantized: list[str], cfg: LowerConfig) -> list[str]:
    """Quantize the inputs of residual blocks so ONNX Runtime runs their adds in integer (``QLinearAdd``).

    A block (a module with its own ``forward``, not a container) qualifies when one of its layers needed an
    output quantizer (:func:`add_output_quantizers`: its result meets the shortcut in an add); the last such block also quantizes its output, which feeds the
    head. Kept only if ORT's optimized graph really gains integer adds; otherwise undone. Call after a
    calibration; returns the blocks that kept quantizers (calibrate again before use).
    """
    from hirelc.export import integer_adds

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # no shortcut, and they would run a new child
    blocks = [b for b, names in topo.blocks.items() if len(names) > 1 and set(names) & set(out_quantized)
              and not isinstance(model.get_submodule(b), containers)]
    if not blocks:
        return []

    def fused_adds() -> int:  # on a copy calibrated on noise: any ranges do to see what ORT fuses
        probe = copy.deepcopy(model)
        calibrate(probe, [torch.randn(2, *topo.input_shape[1:])])
        return integer_adds(probe, topo.input_shape)

    before = fused_adds()
    for i, b in enumerate(blocks):
        attach_block_quantizers(model.get_submodule(b), output=i == len(blocks) - 1, signed=cfg.act_signed,
                                percentile=cfg.percentile)
    if fused_adds() > before:
        return blocks
    for b in blocks:
        detach_block_quantizers(model.get_submodule(b))
    return []


def place_quantizers(model: nn.Module, outs: list[str], blocks: list[str], cfg: LowerConfig) -> None:
    """Put output quantizers on ``outs`` and block quantizers on ``blocks`` (the last also quantizing its output),
    as :func:`add_output_quantizers` / :func:`add_block_quantizers` decided for a model of the same formats."""
    qls = quant_layers(model)
    for n in outs:
        qls[n].out_act = ActQuant(signed=cfg.act_signed, percentile=cfg.percentile)
    for i, b in enumerate(blocks):
        attach_block_quantizers(model.get_submodule(b), output=i == len(blocks) - 1, signed=cfg.act_signed,
                                percentile=cfg.percentile)


def freeze(model: nn.Module) -> None:
    for q in quant_layers(model).values():
        q.freeze()


def storage_report(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy]) -> dict:
    """Effective storage of the lowered model, counted from the tensors it really holds."""
    fp32 = sum(s.params for s in topo.layers)
    qls = quant_layers(model)
    bits = 0
    kept = 0
    for s in topo.layers:
        m = model.get_submodule(s.name)
        if s.name in qls:
            bits += qls[s.name].storage_bits()
            kept += qls[s.name].qweight.numel() + (qls[s.name].bias.numel() if qls[s.name].bias is not None else 0)
        else:
            n = sum(p.numel() for p in m.parameters(recurse=False))
            bits += 32 * n
            kept += n
    t = storage_totals(fp32, kept, bits)
    return {
        "compressible_params_before": t.pop("fp32_params"),
        "compressible_params_after": t.pop("kept_params"),
        **t,
        "predicted_effective_ratio": policy_storage(list(topo.layers), layers)["effective_ratio"],
    }


def placement_key(layers: dict[str, LayerPolicy]) -> tuple:
    """What decides where :func:`add_output_quantizers` and :func:`add_block_quantizers` put quantizers: each
    layer's weight format and kind of scales (the ONNX Runtime fusion patterns follow from these; channel
    counts and bit widths within a container do not change them)."""
    return tuple((n, format_key(lp), type(lp.granularity).__name__) for n, lp in sorted(layers.items()))


def lower_model(model: nn.Module, topo: Topology, layers: dict[str, LayerPolicy], bundle, cfg: LowerConfig,
                progress: bool = True, fisher: dict[str, torch.Tensor] | None = None,
                saliency: dict[str, torch.Tensor] | None = None,
                placement: dict | None = None) -> tuple[nn.Module, dict]:
    """Apply ``layers`` to a copy of ``model``: prune, fold BN, quantize, calibrate, fine-tune, freeze.

    ``saliency`` (from :func:`channel_saliency` on ``model``) saves measuring it again when the same model is
    lowered many times; with ``cfg.importance == "taylor"`` it is measured here when a layer is pruned.
    ``placement`` (a dict kept by the caller across calls on the same model) remembers where quantizers went
    for each :func:`placement_key`, so policies of the same formats skip the ONNX Runtime probes that decide it.
    """
    validate_layers(topo, layers)
    t0 = time.time()
    m = copy.deepcopy(model).eval()
    params_before = sum(p.numel() for p in m.parameters())
    pruning = any(lp.keep_ratio < 1.0 for lp in layers.values())
    if pruning and saliency is None and fisher is None and cfg.importance == "taylor":
        saliency = channel_saliency(m, topo, saliency_batches(bundle, cfg))
    removed = prune(m, topo, layers, fisher, saliency=saliency if cfg.importance == "taylor" else None)
    folded = fold_batchnorm(m, topo.input_shape)
    swapped = swap_quantized(m, layers, cfg.act_signed, cfg.percentile, cfg.reduce_range)
    calib = 0
    outs: list[str] = []
    blocks: list[str] = []
    if cfg.act_quant and swapped:
        loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        calib = calibrate(m, (x for i, (x, _) in enumerate(loader) if i < cfg.calib_batches))
        key = placement_key(layers) if placement is not None else None
        if key is not None and key in placement:
            outs, blocks = placement[key]
            place_quantizers(m, outs, blocks, cfg)
        else:
            outs = add_output_quantizers(m, topo.input_shape, cfg) if cfg.fuse_outputs else []
            if outs:
                blocks = add_block_quantizers(m, topo, outs, cfg) if cfg.fuse_adds else []
            if key is not None:
                placement[key] = (list(outs), list(blocks))
        if outs:
            calibrate(m, (x for i, (x, _) in enumerate(loader) if i < cfg.calib_batches))
    qat = {"steps": 0, "wall_s": 0.0, "loss": None}
    qat_kept = None
    if cfg.epochs > 0 or (cfg.max_steps or 0) > 0:
        loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
        steps = int(round(cfg.epochs * len(loader)))
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps) if steps else cfg.max_steps
        tcfg = TrainConfig(epochs=max(1, int(-(-steps // len(loader)))), batch_size=cfg.batch_size, lr=cfg.lr,
                           weight_decay=0.0, label_smoothing=0.0, warmup_frac=0.02, seed=cfg.seed, max_steps=steps)
        before = copy.deepcopy(m.state_dict()) if cfg.keep_best else None
        acc_before = evaluate(m, bundle.loader("val", 256)) if cfg.keep_best else None
        qat = fit(m, loader, tcfg, desc="QAT fine-tune", progress=progress)
        if cfg.keep_best:
            acc_after = evaluate(m, bundle.loader("val", 256))
            qat_kept = acc_after >= acc_before
            qat.update(val_before=acc_before, val_after=acc_after)
            if not qat_kept:  # a short fine-tune can hurt a well-converged model; the calibrated one stays
                m.load_state_dict(before)
    freeze(m)
    m.eval()
    info = {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in m.parameters()) + sum(q.qweight.numel() for q in quant_layers(m).values()),
        "removed_channels": removed,
        "unprunable_grouped": topo.unprunable_grouped,  # kept whole: grouped convs tie their channels (topology)
        "folded_batchnorm": len(folded),
        "quantized_layers": len(swapped),
        "float_layers": len(topo.layers) - len(swapped),
        "calibration_batches": calib,
        "output_quantized_layers": len(outs),
        "input_quantized_blocks": len(blocks),
        "qat_steps": qat["steps"],
        "qat_wall_s": round(qat["wall_s"], 2),
        "qat_val_before": qat.get("val_before"),
        "qat_val_after": qat.get("val_after"),
        "qat_kept": qat_kept,  # None: no fine-tuning or no check; False: fine-tuning lowered val accuracy, undone
        "lower_wall_s": round(time.time() - t0, 2),
        **storage_report(m, topo, layers),
    }
    return m, info


def lowered_structure(model: nn.Module) -> dict:
    """What :func:`rebuild_lowered` needs besides the policy to rebuild ``model``'s modules: the layers with an
    output quantizer and the blocks with input (and output) quantizers. Plain JSON."""
    from hirelc.qmodules import BLOCK_IN, BLOCK_OUT

    return {
        "output_quantized": sorted(n for n, q in quant_layers(model).items() if getattr(q, "out_act", None) is not None),
        "block_quantized": [n for n, m in model.named_modules() if isinstance(getattr(m, BLOCK_IN, None), ActQuant)],
        "block_output_quantized": [n for n, m in model.named_modules()
                                   if isinstance(getattr(m, BLOCK_OUT, None), ActQuant)],
    }


def save_lowered(path: str | Path, model: nn.Module, model_cfg, policy: Policy, layers: dict[str, LayerPolicy],
                 topo: Topology, lower_cfg: LowerConfig) -> None:
    """Save a lowered model as tensors and JSON only: its state_dict beside the recipe that rebuilds its modules
    (model config, per-layer policy, lowering options, where quantizers sit). No Python objects are pickled, so
    loading the file (``weights_only=True``) can never run code from it."""
    runs.atomic_torch_save(
        {
            "format": LOWERED_FORMAT,
            "version": LOWERED_VERSION,
            "state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            "model_config": model_cfg.to_dict(),
            "policy": policy.to_dict(),
            "layers": {k: v.to_dict() for k, v in layers.items()},
            "topology": topo.to_dict(),
            "lower_config": asdict(lower_cfg),
            "structure": lowered_structure(model),
        },
        path,
    )


def rebuild_lowered(model_cfg, layers: dict[str, LayerPolicy], lower_cfg: LowerConfig, structure: dict) -> nn.Module:
    """The modules of a lowered model, without its values: a fresh timm model cut to the policy's kept counts,
    BatchNorms folded, quantized layers swapped in and frozen, quantizers where ``structure`` says. Which
    channels were kept does not matter here; the saved state_dict supplies every value."""
    from hirelc.models import build_model

    model = build_model(model_cfg).eval()
    shape = (1, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
    topo = build_topology(model, shape)
    unknown = sorted(set(layers) ^ set(topo.names))
    if unknown:
        raise ValueError(f"the policy's layers do not match the model ({unknown[0]!r})")
    prune(model, topo, layers)  # weight norms of the fresh model: any choice of the same counts will do
    fold_batchnorm(model, shape)
    swap_quantized(model, layers, lower_cfg.act_signed, lower_cfg.percentile, lower_cfg.reduce_range)
    qls = quant_layers(model)
    for n in structure.get("output_quantized", []):
        qls[n].out_act = ActQuant(signed=lower_cfg.act_signed, percentile=lower_cfg.percentile)
    outs = set(structure.get("block_output_quantized", []))
    for b in structure.get("block_quantized", []):
        attach_block_quantizers(model.get_submodule(b), output=b in outs, signed=lower_cfg.act_signed,
                                percentile=lower_cfg.percentile)
    freeze(model)
    return model


def load_lowered(path: str | Path) -> dict:
    """Read a lowered-model file (tensors and JSON, loaded with ``weights_only=True``) and rebuild the model.

    Corrupt, foreign, older or tampered files are a one-line error; nothing in the file is ever executed.
    """
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"lowered model not found: {p} (run `hirelc lower` first)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HirelcError(f"lowered model {p} is corrupt or holds more than tensors and plain data "
                          f"({type(e).__name__}: {first[:160]}); run `hirelc lower` again") from None
    if not isinstance(blob, dict) or blob.get("format") != LOWERED_FORMAT:
        raise HirelcError(f"{p} is not a hirelc lowered model")
    if blob.get("version") != LOWERED_VERSION:
        raise HirelcError(f"{p}: lowered-model version {blob.get('version')!r} is not this hirelc's "
                          f"({LOWERED_VERSION}); run `hirelc lower` again")
    from hirelc.models import ModelConfig

    try:
        mcfg = ModelConfig.from_dict(blob["model_config"])
        layers = {k: LayerPolicy.from_dict(v) for k, v in blob["layers"].items()}
        lcfg = LowerConfig(**blob["lower_config"])
        sd = blob["state_dict"]
        model = rebuild_lowered(mcfg, layers, lcfg, blob.get("structure") or {})
        own = model.state_dict()
        if set(own) != set(sd) or any(tuple(own[k].shape) != tuple(sd[k].shape) or own[k].dtype != sd[k].dtype
                                      for k in own):
            raise ValueError("its tensors do not fit the model its recipe describes")
        model.load_state_dict(sd, strict=True)
    except HirelcError:
        raise
    except Exception as e:
        raise HirelcError(f"lowered model {p} is corrupt: {type(e).__name__}: {e}") from None
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HirelcError(f"lowered model {p} holds non-finite values ({name})")
    model.eval()
    blob["model"] = model
    return blob


def lower_run(run_dir: str | Path, policy: Policy, bundle, cfg: LowerConfig, progress: bool = True) -> dict:
    """The `hirelc lower` stage: baseline of ``run_dir`` + ``policy`` -> lowered.pt + lower_report.json."""
    from hirelc.latency import stored_prediction
    from hirelc.train import load_baseline

    rd = Path(run_dir)
    model, mcfg, meta = load_baseline(rd)
    if meta.get("data", {}).get("fingerprint") != bundle.fingerprint:
        raise HirelcError(
            f"the data given ({bundle.name}, fingerprint {bundle.fingerprint}) is not the data the baseline in "
            f"{rd} was trained on ({meta.get('data', {}).get('fingerprint')})"
        )
    topo = build_topology(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    layers = policy.resolve(list(topo.layers))
    lowered, info = lower_model(model, topo, layers, bundle, cfg, progress=progress)
    val = evaluate(lowered, bundle.loader("val", 256))
    test = evaluate(lowered, bundle.loader("test", 256))
    report = {
        "model": mcfg.to_dict(),
        "data": bundle.describe(),
        "policy": policy.to_dict(),
        "lower_config": asdict(cfg),
        "accuracy": {
            "baseline_val": meta["val_acc"],
            "baseline_test": meta["test_acc"],
            "lowered_val": val,
            "lowered_test": test,
            "test_drop": meta["test_acc"] - test,
        },
        **info,
        # from the run directory's latency table (the one a --max-latency-ms search used), when there is one
        "predicted_latency": stored_prediction(rd, topo, layers),
        "layers": {k: v.to_dict() for k, v in layers.items()},
        "warnings": [f"policy rule {p!r} matches no layer of {mcfg.name}" for p in policy.unmatched(topo.names)],
    }
    save_lowered(rd / runs.LOWERED_MODEL, lowered, mcfg, policy, layers, topo, cfg)
    runs.atomic_write_json(rd / runs.LOWER_REPORT, report)
    return report
