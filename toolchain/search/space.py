"""The per-layer action space, its masks, and the moves the search makes inside it.

A layer's action is four indices ``[bits, keep, scheme, granularity]`` into the offered levels
(:class:`Constraints`). Every ordinal axis is ordered mildest first, so index 0 is always the safest choice:

=============  ===========================================================================
axis           levels (index 0 first)
=============  ===========================================================================
bits           offered bit widths, descending (8, 6, 5, 4 ...)
keep           offered keep ratios, descending (1.0 ... 1 - max_prune)
scheme         symmetric, asymmetric
granularity    per-tensor, per-channel, per-group(g) for g descending (coarse to fine)
=============  ===========================================================================

**Masking.** A choice is invalid when the export cannot represent it (:func:`hirelc.policy.check_layer`:
per-group on a depthwise conv, a group size that does not divide the input dim, keep < 1 on a layer whose
channels cannot be pruned; per-group with 5..8 bits, which ONNX Runtime's integer kernels cannot run, is
decoded as per-channel) or when the block's HLA decision forbids it (bits below ``min_bits``; the strategy), or
when it is a weight format the space does not offer (``SearchConfig.formats``: the latency table's slow formats,
decoded as per-channel, then symmetric).
The axes are independent, so the mask is one boolean vector per axis. An invalid raw index is mapped to the
nearest valid index on its axis (ties go to the lower, i.e. milder, index); the agent is never penalised for it.

**Strategies** (chosen per block by the HLA):

* ``quantize``: no pruning (keep 1.0 everywhere); bits anywhere in ``[min_bits, 8]``.
* ``prune``: int8 everywhere (bits 8); keep ratios free on prunable layers.
* ``both``: bits in ``[min_bits, 8]`` and keep ratios free.

Layers in one prune group share the keep ratio of the group's *leader* (its first prunable layer in model
order); other prunable members copy it, non-prunable members keep 1.0 (their shape follows the group anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

from hirelc.cost import group_keeps, kept_shape, layer_storage_bits, policy_storage
from hirelc.errors import HirelcError
from hirelc.policy import (  # noqa: F401 (uniform_policy: part of the search space API)
    Granularity,
    LayerPolicy,
    PerChannel,
    PerGroup,
    PerTensor,
    Scheme,
    check_layer,
    format_key,
    uniform_policy,
)
from hirelc.search.config import Budget, SearchConfig
from hirelc.topology import LayerSpec

Layers = dict[str, LayerPolicy]
SCHEMES = (Scheme.SYMMETRIC, Scheme.ASYMMETRIC)
N_AXES = 4  # bits, keep, scheme, granularity


class Strategy(str, Enum):
    QUANTIZE = "quantize"
    PRUNE = "prune"
    BOTH = "both"


STRATEGIES = (Strategy.QUANTIZE, Strategy.PRUNE, Strategy.BOTH)  # also the safety order used to break ties


@dataclass(frozen=True)
class Constraints:
    """The levels a layer may choose from: the configured space narrowed by its block's HLA decision."""

    bits: tuple[int, ...]  # descending
    keeps: tuple[float, ...]  # descending, starting at 1.0
    group_sizes: tuple[int, ...]  # descending
    min_bits: int = 2
    strategy: Strategy = Strategy.BOTH
    formats: tuple[str, ...] | None = None  # offered weight formats (format_key); None = all

    def __post_init__(self):
        if 8 not in self.bits or self.keeps[0] != 1.0 or self.min_bits > 8:
            raise HirelcError("constraints need 8 bits, keep 1.0 first and min_bits <= 8")

    @classmethod
    def from_config(cls, config: SearchConfig) -> "Constraints":
        """The whole configured space, unconstrained by any HLA decision."""
        return cls(
            bits=tuple(sorted(config.bit_levels, reverse=True)),
            keeps=config.keep_levels,
            group_sizes=tuple(sorted(set(config.group_sizes), reverse=True)),
            min_bits=min(config.bit_levels),
            formats=config.formats,
        )

    def offers(self, suffix: str) -> bool:
        """Whether any offered format carries ``suffix`` ("-asym", "-group")."""
        return self.formats is None or any(suffix in f for f in self.formats)

    def narrowed(self, min_bits: int, strategy: Strategy) -> "Constraints":
        return dataclasses.replace(self, min_bits=min_bits, strategy=Strategy(strategy))

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        return (PerTensor(), PerChannel(), *(PerGroup(g) for g in self.group_sizes))

    @property
    def nvec(self) -> tuple[int, int, int, int]:
        """Number of levels on each axis (the MultiDiscrete shape of one layer)."""
        return (len(self.bits), len(self.keeps), len(SCHEMES), len(self.granularities))


ConstraintsArg = Constraints | Mapping[str, Constraints]  # one for all layers, or one per block


def _for(spec: LayerSpec, constraints: ConstraintsArg) -> Constraints:
    return constraints if isinstance(constraints, Constraints) else constraints[spec.block]


def valid_mask(spec: LayerSpec, c: Constraints) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One boolean vector per axis: which levels this layer may take under ``c``."""
    bits = np.array([b >= c.min_bits for b in c.bits])
    if c.strategy == Strategy.PRUNE:
        bits = np.array([b == 8 for b in c.bits])
    may_prune = spec.prunable and c.strategy != Strategy.QUANTIZE
    keep = np.array([k == 1.0 or may_prune for k in c.keeps])
    scheme = np.array([s is Scheme.SYMMETRIC or c.offers("-asym") for s in SCHEMES])
    # per-group also needs <= 4 bits: decode() turns it into per-channel where the bits chosen are higher
    low_bits = any(ok and b <= 4 for b, ok in zip(c.bits, bits, strict=True))
    gran = np.array([check_layer(spec, LayerPolicy(4, 1.0, Scheme.SYMMETRIC, g)) is None
                     and (low_bits or not isinstance(g, PerGroup)) and (c.offers("-group") or not isinstance(g, PerGroup))
                     for g in c.granularities])
    return bits, keep, scheme, gran


def nearest_valid(index: int, mask: np.ndarray) -> int:
    """The valid index closest to ``index`` (ties: the lower, milder one)."""
    valid = np.flatnonzero(mask)
    return int(valid[np.argmin(np.abs(valid - int(index)))])  # argmin returns the first (lower) of a tie


def decode(spec: LayerSpec, action: np.ndarray, c: Constraints) -> LayerPolicy:
    """Map one layer's raw action ``[bits, keep, scheme, granularity]`` to the nearest valid LayerPolicy."""
    masks = valid_mask(spec, c)
    i_b, i_k, i_s, i_g = (nearest_valid(int(a), m) for a, m in zip(action, masks, strict=True))
    gran = c.granularities[i_g]
    if isinstance(gran, PerGroup) and c.bits[i_b] > 4:  # 8-bit containers take per-channel scales at most
        gran = PerChannel()
    lp = LayerPolicy(c.bits[i_b], c.keeps[i_k], SCHEMES[i_s], gran)
    if c.formats is not None and format_key(lp) not in c.formats:  # a combination that runs slow here
        if isinstance(gran, PerGroup):
            lp = dataclasses.replace(lp, granularity=PerChannel())
        if format_key(lp) not in c.formats:
            lp = dataclasses.replace(lp, scheme=Scheme.SYMMETRIC)
    return lp


def encode(spec: LayerSpec, lp: LayerPolicy, c: Constraints) -> np.ndarray:
    """The action indices of ``lp`` (nearest level on each ordinal axis)."""
    bits = lp.bits if lp.bits is not None else 8
    i_b = int(np.argmin([abs(b - bits) for b in c.bits]))
    i_k = int(np.argmin([abs(k - lp.keep_ratio) for k in c.keeps]))
    grans = c.granularities
    i_g = grans.index(lp.granularity) if lp.granularity in grans else 1
    return np.array([i_b, i_k, SCHEMES.index(lp.scheme), i_g])


def share_group_keeps(specs: list[LayerSpec], layers: Layers) -> Layers:
    """Make every prunable member of a prune group copy the keep ratio of the group's leader, then mask
    per-group granularities that pruning made unrepresentable (see :func:`mask_pruned_groups`)."""
    leader: dict[int, float] = {}
    out = dict(layers)
    for s in specs:
        if s.name not in out or not s.prunable or s.prune_group < 0:
            continue
        lp = out[s.name]
        if s.prune_group not in leader:
            leader[s.prune_group] = lp.keep_ratio
        elif lp.keep_ratio != leader[s.prune_group]:
            out[s.name] = dataclasses.replace(lp, keep_ratio=leader[s.prune_group])
    return mask_pruned_groups(specs, out)


def mask_pruned_groups(specs: list[LayerSpec], layers: Layers) -> Layers:
    """Per-group -> per-channel where pruning another layer's outputs left an input dim the group size no longer
    divides (the export could not block it). A cross-layer mask: it needs the keep ratios of every layer, so
    it only acts when ``specs`` covers the producing group too."""
    keeps = group_keeps([s for s in specs if s.name in layers], layers)
    out = dict(layers)
    for s in specs:
        lp = out.get(s.name)
        if lp is None or not lp.quantized or not isinstance(lp.granularity, PerGroup):
            continue
        _, inn = kept_shape(s, out, keeps)
        if inn % lp.granularity.group_size:
            out[s.name] = dataclasses.replace(lp, granularity=PerChannel())
    return out


def decode_block(specs: list[LayerSpec], action: np.ndarray, c: Constraints) -> Layers:
    """Decode a block's flat action (``N_AXES`` entries per layer, in ``specs`` order) into LayerPolicies."""
    rows = np.asarray(action).reshape(len(specs), N_AXES)
    return share_group_keeps(specs, {s.name: decode(s, row, c) for s, row in zip(specs, rows, strict=True)})


def random_policy(specs: list[LayerSpec], rng: np.random.Generator, constraints: ConstraintsArg) -> Layers:
    """A uniformly random valid choice on every axis of every layer."""
    layers = {}
    for s in specs:
        c = _for(s, constraints)
        action = [rng.choice(np.flatnonzero(m)) for m in valid_mask(s, c)]
        layers[s.name] = decode(s, np.array(action), c)
    return share_group_keeps(specs, layers)




def most_aggressive_policy(specs: list[LayerSpec], constraints: ConstraintsArg) -> Layers:
    """Fewest storage bits the constraints allow: lowest bits, lowest keep, symmetric per-tensor."""
    layers = {}
    for s in specs:
        c = _for(s, constraints)
        bits, keep, _, _ = valid_mask(s, c)
        layers[s.name] = decode(s, np.array([np.flatnonzero(bits)[-1], np.flatnonzero(keep)[-1], 0, 0]), c)
    return share_group_keeps(specs, layers)


def storage_fraction(specs: list[LayerSpec], layers: Layers) -> float:
    """Storage of ``specs`` under ``layers`` as a fraction of their fp32 storage (1 / effective ratio).

    On a subset of the model (one block), input channels pruned by another block's group are ignored.
    """
    return 1.0 / policy_storage(specs, layers)["effective_ratio"]


def policy_key(specs: list[LayerSpec], layers: Layers) -> tuple[LayerPolicy, ...]:
    """A hashable identity of a policy (LayerPolicy is a frozen dataclass)."""
    return tuple(layers[s.name] for s in specs)


def max_achievable_ratio(specs: list[LayerSpec], config: SearchConfig) -> float:
    """Effective ratio of the most aggressive valid policy in the configured action space."""
    return policy_storage(specs, most_aggressive_policy(specs, Constraints.from_config(config)))["effective_ratio"]


def uniform_grid(specs: list[LayerSpec], config: SearchConfig) -> list[Layers]:
    """Every uniform (bits, keep) policy of the space, mildest first, plus the most aggressive policy."""
    c = Constraints.from_config(config)
    grid = [uniform_policy(specs, b, k) for b in c.bits for k in c.keeps]
    return grid + [most_aggressive_policy(specs, c)]


def check_budget_feasible(
    specs: list[LayerSpec], config: SearchConfig, budget: Budget,
    predict_bytes: Callable[[Layers], float | None] | None = None,
    predict_latency_ms: Callable[[Layers], float | None] | None = None,
) -> None:
    """Raise HirelcError, before any training, if no policy of the action space can meet ``budget``.

    Sizes use ``predict_bytes`` when given (else the weights' storage bytes, a lower bound); a latency budget
    needs ``predict_latency_ms``. Both are checked over the uniform grid plus the most aggressive policy.
    """
    if budget.target_ratio is not None:
        best = max_achievable_ratio(specs, config)
        if budget.target_ratio > best * (1 + 1e-9):
            raise HirelcError(
                f"target ratio {budget.target_ratio:g}x is impossible: the most aggressive policy in the action "
                f"space reaches {best:.1f}x"
            )
    grid = uniform_grid(specs, config) if budget.max_size_bytes or budget.max_latency_ms else []
    if budget.max_size_bytes is not None:
        smallest = min(predicted_bytes(specs, p, predict_bytes) for p in grid)
        if smallest > budget.max_size_bytes:
            raise HirelcError(
                f"max size {budget.max_size_bytes} bytes is impossible: the smallest policy in the action space "
                f"is predicted at {smallest:.0f} bytes"
            )
    if budget.max_latency_ms is not None:
        lat = [predict_latency_ms(p) for p in grid] if predict_latency_ms else [None]
        if any(t is None for t in lat):
            raise HirelcError("a latency budget needs an evaluator that predicts latency")
        if min(lat) > budget.max_latency_ms:
            raise HirelcError(
                f"max latency {budget.max_latency_ms:g} ms is impossible: the fastest uniform policy in the action "
                f"space is predicted at {min(lat):.2f} ms"
            )


def predicted_bytes(specs: list[LayerSpec], layers: Layers, predict: Callable[[Layers], float | None] | None) -> float:
    """The predictor's size, or the weights' storage bytes (a lower bound on any file) when it has none."""
    b = predict(layers) if predict else None
    return float(b) if b is not None else policy_storage(specs, layers)["storage_bits"] / 8


def _bits(spec: LayerSpec, lp: LayerPolicy, layers: Layers, keeps: dict[int, float]) -> int:
    """Storage bits of one layer under ``lp`` with the prune-group keeps ``keeps``."""
    return layer_storage_bits(spec, lp, *kept_shape(spec, layers, keeps))[0]


Move = tuple[LayerSpec, LayerPolicy, list[LayerSpec], int]  # layer, its new policy, layers touched, bits saved


def _prune_groups(specs: list[LayerSpec]) -> tuple[dict[int, str], dict[int, list[LayerSpec]]]:
    """Each prune group's leader (its first prunable layer) and every layer whose storage its keep ratio sets."""
    leaders = {s.prune_group: s.name for s in reversed(specs) if s.prunable and s.prune_group >= 0}
    coupled = {g: [t for t in specs if g in (t.prune_group, t.input_group)] for g in leaders}
    return leaders, coupled


def _one_level_moves(specs: list[LayerSpec], cur: Layers, constraints: ConstraintsArg,
                     groups: tuple[dict[int, str], dict[int, list[LayerSpec]]], compress: bool) -> Iterator[Move]:
    """Every single-level move from ``cur``, in model order and per layer on bits, keep, granularity.

    ``compress``: one bit level down, one keep level down on a prune-group leader, a coarser granularity;
    otherwise the same moves back. Yields :data:`Move` tuples; the storage bits saved are negative for moves
    that add bits. A keep move touches every layer its group's keep ratio sets.
    """
    leaders, coupled = groups
    keeps = group_keeps(specs, cur)
    for s in specs:
        c = _for(s, constraints)
        idx, masks = encode(s, cur[s.name], c), valid_mask(s, c)
        for axis in (0, 1, 3):  # bits, keep, granularity (the scheme's zero-points are negligible)
            if axis == 1 and leaders.get(s.prune_group) != s.name:
                continue  # only a group's leader moves its keep ratio
            # bits and keep compress towards higher indices, granularity (finest last) towards lower ones
            up = compress != (axis == 3)
            ok = np.flatnonzero(masks[axis])
            nxt = ok[ok > idx[axis]] if up else ok[ok < idx[axis]]
            if nxt.size == 0:
                continue
            step = idx.copy()
            step[axis] = nxt.min() if up else nxt.max()
            lp = decode(s, step, c)
            if axis == 1:
                touched, tk = coupled[s.prune_group], {**keeps, s.prune_group: lp.keep_ratio}
                saved = sum(_bits(t, cur[t.name], cur, keeps) - _bits(t, cur[t.name], cur, tk) for t in touched)
            else:
                touched, saved = [s], _bits(s, cur[s.name], cur, keeps) - _bits(s, lp, cur, keeps)
            yield s, lp, touched, saved


def _sensitivity(touched: list[LayerSpec], sensitivity: Mapping[str, float]) -> float:
    return sum(float(sensitivity.get(t.name, 0.0)) for t in touched) + 1e-6


def tighten(
    specs: list[LayerSpec], layers: Layers, constraints: ConstraintsArg, sensitivity: Mapping[str, float],
    done: Callable[[Layers], bool], max_steps: int = 10_000, cost: Callable[[Layers], float] | None = None,
    allowed: Callable[[Layers], bool] | None = None,
) -> Layers:
    """Greedily compress ``layers`` until ``done(layers)``, cheapest accuracy first; returns the last policy.

    Each step takes the single valid move (one bit level down; one keep level down on a prune-group leader; a
    coarser granularity) with the lowest ``sensitivity of the touched layers / cost saved``, and stops when
    ``done`` holds or no move saves anything. The cost is storage bits, or ``cost(policy)`` when given (e.g.
    predicted latency, which fewer bits can raise); moves whose result fails ``allowed`` are never taken.
    Brings a candidate inside the budget instead of discarding it.
    """
    groups = _prune_groups(specs)
    cur = dict(layers)
    for _ in range(max_steps):
        if done(cur):
            break
        cur_cost = cost(cur) if cost is not None else 0.0
        best: tuple[float, LayerSpec, LayerPolicy] | None = None
        for s, lp, touched, saved in _one_level_moves(specs, cur, constraints, groups, compress=True):
            new = {**cur, s.name: lp} if cost is not None or allowed is not None else None
            if cost is not None:
                saved = cur_cost - cost(new)
            if saved <= 0 or (allowed is not None and not allowed(new)):
                continue
            score = _sensitivity(touched, sensitivity) / saved
            if best is None or score < best[0]:
                best = (score, s, lp)
        if best is None:
            break
        cur = share_group_keeps(specs, {**cur, best[1].name: best[2]})
    return cur


def loosen(
    specs: list[LayerSpec], layers: Layers, constraints: ConstraintsArg, sensitivity: Mapping[str, float],
    fits: Callable[[Layers], bool], max_steps: int = 2_000,
) -> Layers:
    """Spend what a candidate leaves of its budget: the reverse of :func:`tighten`.

    Each step takes, among the valid moves back (one bit level up; one keep level up on a prune-group leader;
    a finer granularity), the one with the most ``sensitivity of the touched layers / storage bits added`` whose
    result still ``fits``; it stops when none fits. A repaired candidate far inside its budget (compressed
    further than the budget asks, so less accurate than it need be) ends next to the budget's edge instead.
    """
    groups = _prune_groups(specs)
    cur = dict(layers)
    if not fits(cur):
        return cur
    for _ in range(max_steps):
        moves = [(_sensitivity(touched, sensitivity) / max(-saved, 1), s.name, lp)
                 for s, lp, touched, saved in _one_level_moves(specs, cur, constraints, groups, compress=False)
                 if lp != cur[s.name]]
        moves.sort(key=lambda m: -m[0])
        for _, name, lp in moves:
            new = share_group_keeps(specs, {**cur, name: lp})
            if new != cur and fits(new):  # (a move the group's shared keep undoes is no move)
                cur = new
                break
        else:
            break
    return cur
