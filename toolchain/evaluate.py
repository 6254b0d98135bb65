"""How the search scores a candidate policy on the real model (the search itself never sees the model).

* :meth:`RealEvaluator.proxy_drop` — cold start: the candidate's logits on a calibration batch, computed by
  :class:`FastProxy` on the baseline itself (pruning masked, weights fake-quantized; with ``proxy_bn`` BatchNorm
  statistics re-estimated as lowering does) rather than by lowering it, compared with the baseline's;
  ``20 * MSE`` capped at 50 points stands in for the accuracy drop.
* :meth:`RealEvaluator.real_accuracy` — lower the candidate, run a short QAT fine-tune on a training subset,
  and measure validation accuracy. This is what decides the winner.
* Both run torch on ``RealEvaluator.threads`` threads (1 by default), whatever the caller's count: a float sum
  split over another number of threads rounds differently, and a short QAT amplifies that into another accuracy,
  so a fixed count is what makes a policy score the same in this process and on any worker (hirelc.parallel).
* :meth:`RealEvaluator.predict_bytes` — bytes of the exported ONNX file, from the layer shapes and their
  on-disk containers (int4 packed two per byte, int8 one per byte, fp32 scales), plus everything the policy
  does not touch (norms, embeddings) in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hirelc import __version__, runs
from hirelc.cost import group_keeps, kept_shape, scale_count
from hirelc.errors import HirelcError
from hirelc.export import ORT_PROBE, export_lowered
from hirelc.export.onnx_export import INT2_ZERO_POINT_BYTES, fold_graph_bytes
from hirelc.kernels import choose_qparams, container_bits, fake_quantize
from hirelc.latency import lowered_on_noise, predict_latency
from hirelc.lower import (
    LowerConfig,
    bn_fold_factors,
    channel_saliency,
    fold_batchnorm,
    lower_model,
    saliency_batches,
    select_channels,
)
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, Scheme, get_policy
from hirelc.qmodules import weight_code_bits
from hirelc.topology import Topology, conv_bn_pairs, dependency_graph, out_pruning_fn
from hirelc.train import evaluate, predict_logits

ONNX_OVERHEAD_BYTES = 4096  # graph structure, names and attributes of a small model (when not measured)

PROXY_CAP = 50.0  # points: the logit-MSE proxy's largest drop (20 x MSE beyond it says only 'ruined')


class EvalCache:
    """Real evaluations kept in a folder for the searches that share it (the runs of one ablation seed), by a
    digest of everything that decides one: ``identity`` (baseline, data, evaluator settings, build), the
    policy and the fine-tune length. An entry holds the accuracy and what the evaluation cost when it ran; one
    that cannot be read is evaluated again and rewritten."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self._id = json.dumps({**identity, "hirelc": __version__}, sort_keys=True, default=str)

    def key(self, layers: dict[str, LayerPolicy], fidelity: int) -> str:
        what = {"id": self._id, "fidelity": fidelity, "policy": {n: lp.to_dict() for n, lp in sorted(layers.items())}}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> tuple[float, float] | None:
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
            acc, seconds = float(entry["real_acc"]), float(entry["eval_s"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return (acc, seconds) if math.isfinite(acc) and math.isfinite(seconds) and seconds >= 0 else None

    def put(self, key: str, acc: float, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_json(self.folder / f"{key}.json", {"real_acc": acc, "eval_s": seconds})


class Predictors:
    """Size and latency predictions of a policy, available before any training (budget checks use them)."""

    def __init__(self, model: nn.Module, topo: Topology, latency_table: dict | None = None,
                 graph_bytes: int | None = None, int2: bool = False):
        self.topo = topo
        self.latency_table = latency_table
        self.graph_bytes = ONNX_OVERHEAD_BYTES if graph_bytes is None else int(graph_bytes)
        self.other_params = sum(p.numel() for p in model.parameters()) - sum(s.params for s in topo.layers)
        self.int2 = bool(int2)  # the file is exported at an opset with INT2 (2-bit codes four per byte)

    def predict_bytes(self, layers: dict[str, LayerPolicy]) -> float:
        return predict_onnx_bytes(self.topo, layers, self.other_params, self.graph_bytes, int2=self.int2)

    def predict_latency_ms(self, layers: dict[str, LayerPolicy]) -> float | None:
        """Batch-8 ONNX Runtime latency from the per-layer table, when one was measured."""
        if self.latency_table is None:
            return None
        return predict_latency(self.latency_table, self.topo, layers)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on ``n`` intra-op threads inside the block (the caller's count restored after)."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


MAX_FIDELITY = 3


# A real evaluation fine-tunes at the final lowering's learning rate. Measured on 8 policies of a resnet18 16x
# study, each scored under 3 evaluator seeds: at 5e-4 the noise between seeds (sd 0.92 points) exceeded the
# spread between policies (sd 0.74), and one score ranked the policies' final test accuracy with Spearman 0.64;
# at 2e-5 the noise fell to 0.57 and the spread rose to 1.30, and the Spearman to 0.86 (docs/method.md).
EVAL_LR = LowerConfig.lr


def evaluation_lower_config(qat_steps: int = 40, batch_size: int = 64, lr: float = EVAL_LR,
                            seed: int = 0) -> LowerConfig:
    """How a real evaluation lowers a candidate: ``qat_steps`` of fine-tuning, scored as it is (no keep-best)."""
    return LowerConfig(epochs=0, max_steps=qat_steps, lr=lr, batch_size=batch_size, calib_batches=4,
                       keep_best=False, seed=seed)


class RealEvaluator:
    """Scores policies by lowering the real model; sizes of the subsets trade fidelity for search time.

    Every score is a function of the policy and these arguments only (seeded data order and QAT, ``threads``
    torch threads), so any process holding a copy (:meth:`for_workers`) gives a policy the same score.
    """

    proxy_cap = PROXY_CAP

    def __init__(self, model: nn.Module, topo: Topology, bundle, predictors: Predictors, *, qat_steps: int = 40,
                 train_samples: int = 2048, val_samples: int = 1000, calib_samples: int = 256, batch_size: int = 64,
                 lr: float = EVAL_LR, seed: int = 0, threads: int = 1, proxy_bn: bool = False):
        if threads < 1:
            raise HirelcError(f"an evaluation needs at least one thread, got {threads}")
        self.model, self.topo, self.seed, self.threads = model.eval(), topo, seed, threads
        # real_accuracy(fidelity=f) fine-tunes 2**f times qat_steps (the search's adaptive fidelity); none without QAT
        self.max_fidelity = MAX_FIDELITY if qat_steps > 0 else 0
        # the proxy re-estimates BatchNorm statistics as lowering does (FastProxy's bn_batches): exact, but about
        # three times the cost of a proxy call, and measured to rank searched candidates no better (docs/method.md)
        self.proxy_bn = proxy_bn
        self.predictors = predictors
        self.cfg = evaluation_lower_config(qat_steps, batch_size, lr, seed)
        self._sub = _SubsetBundle(bundle, train_samples, val_samples, seed)
        self._placement: dict = {}  # where lowering put quantizers, per set of layer formats (lower.placement_key)
        self.calib_x = bundle.subset("train", calib_samples, seed=seed + 1).x
        with torch_threads(threads):
            self.base_logits = predict_logits(self.model, self.calib_x)
            self.baseline_accuracy = evaluate(self.model, self._sub.loader("val", 256))
        self.eval_seconds: list[float] = []
        self._saliency: dict[str, torch.Tensor] | None = None
        self._fast: FastProxy | None = None
        self.cache: EvalCache | None = None  # see use_cache
        self.cache_hits, self.saved_seconds = 0, 0.0

    def identity(self) -> dict:
        """What decides a real evaluation besides the baseline, the data and the policy."""
        return {"seed": self.seed, "threads": self.threads, "lower": dataclasses.asdict(self.cfg),
                "samples": [len(self._sub.train.x), len(self._sub.val.x)], "calib": len(self.calib_x)}

    def use_cache(self, folder: str | Path, identity: dict) -> None:
        """Take real evaluations from ``folder`` where one of the same policy was made with the same ``identity``
        (plus :meth:`identity`), and keep each new one there. A hit reports the seconds the evaluation took when
        it ran, and adds them to ``saved_seconds``, so that a search's clock counts the work as if done."""
        self.cache = EvalCache(folder, {**identity, **self.identity()})

    def real_accuracies(self, batch, fidelity: int = 0) -> Iterator[tuple[float, float]]:
        """``(accuracy, seconds)`` of each policy in order, lazily (a search commits each before the next runs)."""
        for layers in batch:
            key = self.cache.key(layers, fidelity) if self.cache is not None else None
            hit = self.cache.get(key) if key is not None else None
            if hit is not None:
                self.cache_hits += 1
                self.saved_seconds += hit[1]
                yield hit
                continue
            t = time.perf_counter()
            acc = self.real_accuracy(layers, fidelity)
            seconds = time.perf_counter() - t
            if key is not None:
                self.cache.put(key, acc, seconds)
            yield acc, seconds

    def saliency(self, layers: dict[str, LayerPolicy] | None = None) -> dict[str, torch.Tensor] | None:
        """The baseline's channel saliency, measured once (every candidate prunes the same model); None when
        ``layers`` prunes nothing. Without ``layers``: measured now whether or not a candidate prunes."""
        if self.cfg.importance != "taylor" or (layers is not None and all(lp.keep_ratio >= 1.0
                                                                          for lp in layers.values())):
            return None
        if self._saliency is None:
            with torch_threads(self.threads):
                self._saliency = channel_saliency(copy.deepcopy(self.model), self.topo,
                                                  saliency_batches(self._sub, self.cfg))
        return self._saliency

    def proxy_drop(self, layers: dict[str, LayerPolicy]) -> float:
        # called for every agent step: emulated on the baseline, no copy, no dependency graph, no calibration
        saliency = self.saliency(layers)
        with torch_threads(self.threads):
            if self._fast is None:
                self._fast = FastProxy(self.model, self.topo, reduce_range=self.cfg.reduce_range,
                                       bn_batches=self.bn_batches() if self.proxy_bn else ())
            logits = self._fast.logits(layers, self.calib_x, saliency=saliency)
            mse = F.mse_loss(logits, self.base_logits).item()
        return min(20.0 * mse, PROXY_CAP)

    def bn_batches(self) -> list[torch.Tensor]:
        """The training batches lowering re-estimates BatchNorm statistics on (its loader, seed and count)."""
        if self.cfg.bn_batches <= 0:
            return []
        loader = self._sub.loader("train", self.cfg.batch_size, shuffle=True, seed=self.cfg.seed)
        return [x for x, _ in itertools.islice(loader, self.cfg.bn_batches)]

    def real_accuracy(self, layers: dict[str, LayerPolicy], fidelity: int = 0) -> float:
        if not 0 <= fidelity <= self.max_fidelity:
            raise HirelcError(f"fidelity must be in 0..{self.max_fidelity}, got {fidelity}")
        t0 = time.time()
        saliency = self.saliency(layers)
        cfg = dataclasses.replace(self.cfg, max_steps=self.cfg.max_steps * 2 ** fidelity) if fidelity else self.cfg
        with torch_threads(self.threads):
            lowered, _ = lower_model(self.model, self.topo, layers, self._sub, cfg, progress=False,
                                     saliency=saliency, placement=self._placement, probe=ORT_PROBE)
            acc = evaluate(lowered, self._sub.loader("val", 256))
        self.eval_seconds.append(time.time() - t0)
        return acc

    def predict_bytes(self, layers: dict[str, LayerPolicy]) -> float:
        return self.predictors.predict_bytes(layers)

    def predict_latency_ms(self, layers: dict[str, LayerPolicy]) -> float | None:
        return self.predictors.predict_latency_ms(layers)

    def for_workers(self) -> RealEvaluator:
        """A copy to send to other processes (:mod:`hirelc.parallel`) that scores every policy exactly as this one.

        The baseline's saliency is measured here first, so every process prunes the same channels; the copy
        leaves behind what a worker does not need or rebuilds itself: the proxy's folded model, the timings and
        the test split.
        """
        self.saliency()
        out = copy.copy(self)
        out._fast, out.eval_seconds, out._placement = None, [], dict(self._placement)
        out._sub = copy.copy(self._sub)
        out._sub.test = None
        return out


FOLD_NAME_BYTES = 8  # a 4-bit layer's code initializer is renamed ``<layer>.qweight.int4`` (measured on test models)


def predict_onnx_bytes(topo: Topology, layers: dict[str, LayerPolicy], other_params: int,
                       graph_bytes: int = ONNX_OVERHEAD_BYTES, int2: bool = False) -> float:
    """Predicted size of model.onnx: containers as written by the exporter, scales in fp32, plus ``graph_bytes``
    for the graph itself (nodes, names, attributes: see :func:`measure_graph_bytes`). ``int2``: the export's opset
    has INT2/UINT2 (:data:`~hirelc.export.onnx_export.INT2_OPSET`), so 2-bit codes are stored four per byte."""
    specs = list(topo.layers)
    keeps = group_keeps(specs, layers)
    total = 4 * other_params + graph_bytes
    for s in specs:
        out, inn = kept_shape(s, layers, keeps)
        lp = layers[s.name]
        n_w = out * inn * (math.prod(s.kernel) if s.kernel else 1)
        total += 4 * out  # bias (BN folding gives every conv one)
        if lp.bits is None:
            total += 4 * n_w
            continue
        width = container_bits(lp.bits)
        g = lp.granularity
        n_scales = scale_count(g, out, inn, math.prod(s.kernel) if s.kernel else 1)
        total += n_scales * (4 + width / 8)  # fp32 scale + zero-point (always written)
        total += 8  # activation scale + zero-point
        if width != 4 or isinstance(g, PerGroup):  # int8 codes, or 4-bit blocks straight into DequantizeLinear
            total += math.ceil(n_w * width / 8)
            continue
        # the "fold" export: packed codes widened to int8 in the graph. Asymmetric 2- and 3-bit codes minus their
        # zero point always fit INT4 (one Cast); 4-bit ones may not (Cast, Cast, Sub, Cast)
        asym = lp.scheme is Scheme.ASYMMETRIC
        int4 = math.ceil(n_w / 2) + fold_graph_bytes(s.name, asym and lp.bits == 4) + FOLD_NAME_BYTES
        if not (int2 and lp.bits <= 2):
            total += int4
            continue
        # INT2: symmetric codes take one Cast; asymmetric ones whose difference to the zero point leaves [-2, 1]
        # take the longer chain and a zero-point tensor of their own (the exporter keeps INT4 where that costs
        # more, so the smaller of the two bounds the file)
        int2_bytes = math.ceil(n_w / 4) + fold_graph_bytes(s.name, asym) + FOLD_NAME_BYTES
        if asym:
            int2_bytes += INT2_ZERO_POINT_BYTES + math.ceil(n_scales / 4)
        total += min(int4, int2_bytes)
    return float(total)


def measure_graph_bytes(model: nn.Module, topo: Topology) -> int:
    """Bytes of the exported graph beyond its tensors: the model lowered int8 everywhere (ranges from noise, no
    training) is exported once and its file size compared with the tensor bytes predicted for it.

    A transformer's graph is large beside its weights (deit_tiny: ~930 nodes, ~140 kB of a 2.8 MB int8 file), so
    a fixed allowance under-predicts it by 5 %. Pruning and bit-widths change tensor shapes, not nodes; a float
    layer has fewer nodes than a quantized one, so the int8 graph is the upper bound.
    """
    layers = get_policy("int8").resolve(list(topo.layers))
    lowered = lowered_on_noise(model, topo, layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        export_lowered(lowered, topo.input_shape, path, check_runtime=False)
        size = path.stat().st_size
    return max(0, int(size - Predictors(model, topo, graph_bytes=0).predict_bytes(layers)))


class FastProxy:
    """A candidate's logits computed on the baseline itself, without lowering it.

    BatchNorm is folded once into a private copy. A candidate's pruning is emulated by zeroing, at every layer
    writing them, the output channels :func:`~hirelc.lower.select_channels` removes: that is what physical
    removal computes, since a removed channel then contributes nothing downstream and every activation that
    follows maps 0 to 0 (a removed head's q, k and v all vanish, so its output does). Quantization is emulated
    by fake-quantizing each weight at its bits, scheme and granularity after zeroing the rows and input columns
    pruning removes, so per-tensor and per-channel scales are those of the pruned layer (per-group blocks run
    over the unpruned input dim). A LayerNorm over a pruned stream (a ViT's embedding) normalises over the kept
    channels only, as it would after removal. Activation quantization is not emulated.

    ``bn_batches``: the batches lowering re-estimates BatchNorm statistics on after pruning
    (:func:`~hirelc.lower.recalibrate_batchnorm`). With them, a candidate that removes channels first runs them
    through the float baseline with its pruning masked (every BatchNorm in train mode, a plain average over the
    batches), then folds the fresh statistics into the weights it fake-quantizes: the order lowering follows
    (prune, re-estimate, fold, quantize). Without them the baseline's statistics stay, which overstates what
    pruning costs a network with BatchNorm.
    """

    def __init__(self, model: nn.Module, topo: Topology, reduce_range: bool = True,
                 bn_batches: Sequence[torch.Tensor] = ()):
        self.model, self.topo, self.reduce_range = model, topo, reduce_range
        self.folded = copy.deepcopy(model).eval()
        fold_batchnorm(self.folded, topo.input_shape)
        self.mods = {s.name: self.folded.get_submodule(s.name) for s in topo.layers}
        self._masks: dict[str, torch.Tensor] = {}
        for name, m in self.mods.items():
            m.register_forward_hook(lambda _m, _i, out, n=name: self._mask(n, out))
        self.norms_of = self._stream_norms()
        for names in self.norms_of.values():
            for n in names:
                self.folded.get_submodule(n).register_forward_hook(lambda m, i, out, n=n: self._norm(n, m, i[0], out))
        # the float baseline, BatchNorms unfolded, that re-estimates their statistics under a candidate's pruning
        self.bn_x = list(bn_batches)
        self.stats: nn.Module | None = None
        self._bns: dict[str, nn.modules.batchnorm._BatchNorm] = {}
        self.pairs: dict[str, str] = {}  # conv -> the BatchNorm folded into it (only needed to re-estimate)
        if self.bn_x:
            self.stats = copy.deepcopy(model).eval()
            self._bns = {n: m for n, m in self.stats.named_modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
            if not self._bns:
                self.stats = None
        if self.stats is not None:
            self.pairs = dict(conv_bn_pairs(model, topo.input_shape))
            for name in self.mods:  # a removed channel is zero after its BatchNorm, as if it were not there
                self.stats.get_submodule(self.pairs.get(name, name)).register_forward_hook(
                    lambda _m, _i, out, n=name: self._mask(n, out))
            for names in self.norms_of.values():
                for n in names:
                    self.stats.get_submodule(n).register_forward_hook(
                        lambda m, i, out, n=n: self._norm(n, m, i[0], out))
        # agents change one block at a time: most layers' weights repeat from call to call
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cached_elems = 0

    CACHE_ELEMS = 64_000_000  # fake-quantized weights kept between calls (256 MB of fp32)

    def _weight(self, name: str, lp: LayerPolicy, out_drop: tuple, in_drop: tuple,
                folded: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's weight pruned and fake-quantized; ``folded``: with other BatchNorm statistics folded in
        (re-estimated for one candidate: not kept between calls)."""
        w = self.mods[name].weight.detach() if folded is None else folded
        if lp.bits is None and not out_drop and not in_drop:
            return w
        key = (name, lp, out_drop, in_drop)
        if folded is None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        w = w.clone()
        if out_drop:
            w[list(out_drop)] = 0
        if in_drop:
            w[:, list(in_drop)] = 0
        if lp.bits is not None:
            gran = lp.granularity
            if isinstance(gran, PerGroup) and w.shape[1] % gran.group_size:
                gran = PerChannel()
            bits = weight_code_bits(lp, self.reduce_range)
            scale, zp = choose_qparams(w, bits, lp.scheme, gran)
            w = fake_quantize(w, scale, zp, bits, lp.scheme, gran)
        if folded is not None:
            return w
        self._cache[key] = w
        self._cached_elems += w.numel()
        while self._cached_elems > self.CACHE_ELEMS and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_elems -= old.numel()
        return w

    def _stream_norms(self) -> dict[str, list[str]]:
        """LayerNorms inside each prunable group (those reading a pruned stream), by group leader."""
        leaders = [s.name for s in self.topo.layers if s.prunable and s.kind != "attn_qkv"]
        if not any(isinstance(m, nn.LayerNorm) for m in self.model.modules()) or not leaders:
            return {}
        work = copy.deepcopy(self.model)
        names = {m: n for n, m in work.named_modules()}
        dg = dependency_graph(work, self.topo.input_shape)
        out: dict[str, list[str]] = {}
        for leader in leaders:
            mod = work.get_submodule(leader)
            found = [names[dep.target.module] for dep, _ in dg.get_pruning_group(mod, out_pruning_fn(mod), idxs=[0])
                     if isinstance(dep.target.module, nn.LayerNorm)]
            if found:
                out[leader] = sorted(set(found))
        return out

    def _norm(self, name: str, m: nn.LayerNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        mask = self._masks.get(name)
        if mask is None:
            return None
        kept = mask.bool()
        y = torch.zeros_like(out)
        y[..., kept] = F.layer_norm(x[..., kept], (int(kept.sum()),), m.weight[kept] if m.weight is not None else None,
                                    m.bias[kept] if m.bias is not None else None, m.eps)
        return y

    def _mask(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        mask = self._masks.get(name)
        if mask is None:
            return None
        shape = [1] * out.dim()
        shape[1 if isinstance(self.mods[name], nn.Conv2d) else -1] = -1
        return out * mask.reshape(shape)

    @torch.no_grad()
    def logits(self, layers: dict[str, LayerPolicy], x: torch.Tensor, saliency=None,
               batch_size: int = 256) -> torch.Tensor:
        specs = {s.name: s for s in self.topo.layers}
        selection = select_channels(self.model, self.topo, layers, saliency=saliency)
        out_drop: dict[str, list[int]] = {}
        in_drop: dict[str, list[int]] = {}
        for leader, (idxs, _) in selection.items():
            spec = specs[leader]
            if spec.kind == "attn_qkv":  # rows of q, k and v; the projection reads the heads' dims once
                out_drop[leader] = idxs
                dim = self.mods[leader].weight.shape[0] // 3
                for s in self.topo.layers:
                    if s.input_group == spec.prune_group:
                        in_drop[s.name] = [i for i in idxs if i < dim]
                continue
            for s in self.topo.layers:
                if s.prune_group == spec.prune_group:
                    out_drop[s.name] = idxs
                elif s.input_group == spec.prune_group and getattr(self.mods[s.name], "groups", 1) == 1:
                    in_drop[s.name] = idxs  # a reader (depthwise convs lose whole channels: they are writers)
        params: dict[str, torch.Tensor] = {}
        self._masks = {}
        for name, m in self.mods.items():
            od = out_drop.get(name, ())
            if od:
                mask = torch.ones(m.weight.shape[0], dtype=m.weight.dtype)
                mask[list(od)] = 0
                self._masks[name] = mask
        for leader, norms in self.norms_of.items():
            if leader in selection:
                mask = torch.ones(self.mods[leader].weight.shape[0])
                mask[selection[leader][0]] = 0
                for n in norms:
                    self._masks[n] = mask
        try:
            refolded = self._refold(params) if selection and self.stats is not None else {}
            for name in self.mods:
                od, idr = tuple(out_drop.get(name, ())), tuple(in_drop.get(name, ()))
                params[f"{name}.weight"] = self._weight(name, layers[name], od, idr, refolded.get(name))
            outs = [torch.func.functional_call(self.folded, params, (x[i:i + batch_size],))
                    for i in range(0, len(x), batch_size)]
        finally:
            self._masks = {}
        return torch.cat(outs)

    def _refold(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-estimate every BatchNorm's statistics under the masks in place (see the class docstring); the
        weights of the convs they fold into come back, their biases and the statistics of BatchNorms left
        unfolded go into ``params``."""
        assert self.stats is not None
        for bn in self._bns.values():
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches, as recalibrate_batchnorm takes it
            bn.train()
        try:
            for xb in self.bn_x:
                self.stats(xb)
        finally:
            for bn in self._bns.values():
                bn.eval()
        out: dict[str, torch.Tensor] = {}
        folded_bns = set()
        for conv, bn_name in self.pairs.items():
            base, bn = self.model.get_submodule(conv), self._bns.get(bn_name)
            if bn is None:
                continue
            scale, shift = bn_fold_factors(bn)
            out[conv] = base.weight.detach() * scale.reshape(-1, 1, 1, 1)
            bias = base.bias.detach() if base.bias is not None else torch.zeros_like(scale)
            params[f"{conv}.bias"] = (bias * scale + shift).detach()
            folded_bns.add(bn_name)
        for n, bn in self._bns.items():
            if n not in folded_bns:
                params[f"{n}.running_mean"] = bn.running_mean.clone()
                params[f"{n}.running_var"] = bn.running_var.clone()
        return out


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
