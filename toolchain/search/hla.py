"""High-level agents: split the global storage budget into one (level, strategy) decision per block.

**Levels.** A level is a block's storage budget as a fraction of its fp32 storage. The grid is the
reference's ``(0.35, 0.30, 0.25, 0.20, 0.15)``, which is centred on a 4x target (fraction 0.25); for a target
fraction ``t`` it is scaled by ``t / 0.25``, so the middle level is always the global target and "one level
more/less aggressive" keeps its meaning at any ratio. Level index 0 is the mildest.

**min_bits.** Each level index sets its block's LLA ``min_bits`` through ``SearchConfig.level_min_bits``
(default ``6, 6, 5, 5, 4``: the two mildest levels 6 bits, the middle two 5, the harshest 4). When even the
most aggressive policy under that floor and strategy cannot reach the level's fraction, min_bits is lowered
one offered bit width at a time until it can (or none is left).

**Fisher guidance.** A block with normalised sensitivity > 0.7 is moved one level milder, < 0.3 one level
harsher, after the agent acts (so the agent learns around the shift).

**Voting.** Each agent's deterministic allocation is decoded (with the shift); the block's budget is the mean of
the agents' fractions, its level index the grid level nearest to that mean (ties: milder), its strategy the
majority vote, ties (all agents disagree) going to the safest strategy in the order quantize > prune > both.
Finally, while the predicted global fraction exceeds the target, the least sensitive block that can still be
tightened moves one level harsher (or, at the harshest level, switches to ``both``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from hirelc.search.agents import agent_seed, ensemble_kinds, train_ensemble
from hirelc.search.config import Budget, RewardConfig, SearchConfig
from hirelc.search.space import (
    STRATEGIES,
    Constraints,
    Layers,
    Strategy,
    most_aggressive_policy,
    share_group_keeps,
    storage_fraction,
    uniform_policy,
)
from hirelc.topology import LayerSpec

HIGH, LOW = 0.7, 0.3  # Fisher thresholds (normalised block sensitivity)


@dataclass(frozen=True)
class BlockAllocation:
    """The HLA's decision for one block."""

    level: float  # storage budget, fraction of the block's fp32 storage
    level_index: int  # nearest grid level (0 = mildest); sets min_bits
    strategy: Strategy
    min_bits: int

    def to_dict(self) -> dict:
        return {"level": round(self.level, 6), "level_index": self.level_index, "strategy": self.strategy.value,
                "min_bits": self.min_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockAllocation":
        return cls(float(d["level"]), int(d["level_index"]), Strategy(d["strategy"]), int(d["min_bits"]))


Allocation = dict[str, BlockAllocation]


def blocks_of(specs: list[LayerSpec]) -> dict[str, list[LayerSpec]]:
    """Layers grouped by block, blocks in model order."""
    out: dict[str, list[LayerSpec]] = {}
    for s in specs:
        out.setdefault(s.block, []).append(s)
    return out


def target_fraction(specs: list[LayerSpec], budget: Budget, config: SearchConfig) -> float:
    """The global storage fraction to aim at: 1/target_ratio, or size / fp32 bytes, whichever is tighter."""
    cands = []
    if budget.target_ratio:
        cands.append(1.0 / budget.target_ratio)
    if budget.max_size_bytes:
        cands.append(budget.max_size_bytes / (4.0 * sum(s.params for s in specs)))
    return min(cands) if cands else config.default_target_fraction


def level_grid(config: SearchConfig, target: float) -> np.ndarray:
    """The level fractions for a global target fraction (mildest first; middle level = target)."""
    ref = np.asarray(config.levels)
    return ref * (target / ref[len(ref) // 2])


def fisher_shift(index: int, sensitivity: float, n_levels: int) -> int:
    """One level milder above 0.7 sensitivity, one harsher below 0.3 (clamped to the grid)."""
    if sensitivity > HIGH:
        index -= 1
    elif sensitivity < LOW:
        index += 1
    return int(np.clip(index, 0, n_levels - 1))


def vote_levels(fractions: np.ndarray) -> np.ndarray:
    """Per-block budget: the mean over agents of ``fractions`` (agents, blocks)."""
    return np.asarray(fractions, dtype=float).mean(axis=0)


def vote_strategies(votes: np.ndarray) -> list[Strategy]:
    """Per-block majority over agents of strategy indices (agents, blocks); ties -> the safest (lowest index)."""
    votes = np.asarray(votes, dtype=int)
    counts = np.stack([(votes == i).sum(0) for i in range(len(STRATEGIES))])  # (3, blocks)
    return [STRATEGIES[int(i)] for i in counts.argmax(0)]  # argmax picks the first (safest) of equal counts


def nearest_level(grid: np.ndarray, fraction: float) -> int:
    return int(np.argmin(np.abs(grid - fraction)))  # ties: the lower (milder) index


def block_floor(specs_b: list[LayerSpec], c: Constraints) -> float:
    """The smallest storage fraction a block can reach under ``c``."""
    return storage_fraction(specs_b, most_aggressive_policy(specs_b, c))


def min_bits_for(
    specs_b: list[LayerSpec], index: int, fraction: float, strategy: Strategy, base: Constraints, config: SearchConfig
) -> int:
    """The level's nominal min_bits, lowered while the block could not reach ``fraction`` with it."""
    options = [b for b in base.bits if b >= base.min_bits]  # descending
    mb = max([b for b in options if b <= config.level_min_bits[index]] or [options[-1]])
    if strategy == Strategy.PRUNE:
        return mb  # int8 throughout: min_bits does not bind
    for b in [b for b in options if b < mb]:
        if block_floor(specs_b, base.narrowed(mb, strategy)) <= fraction:
            break
        mb = b
    return mb


def make_allocation(
    blocks: Mapping[str, list[LayerSpec]], fractions: Sequence[float], strategies: Sequence[Strategy],
    grid: np.ndarray, base: Constraints, config: SearchConfig,
) -> Allocation:
    out = {}
    for (name, specs_b), f, st in zip(blocks.items(), fractions, strategies, strict=True):
        i = nearest_level(grid, f)
        out[name] = BlockAllocation(float(f), i, Strategy(st), min_bits_for(specs_b, i, f, st, base, config))
    return out


def predicted_fraction(blocks: Mapping[str, list[LayerSpec]], alloc: Allocation, base: Constraints) -> float:
    """Params-weighted global fraction if every block lands on its level (or its floor, if that is higher)."""
    num = den = 0.0
    for name, specs_b in blocks.items():
        a = alloc[name]
        p = sum(s.params for s in specs_b)
        num += p * max(a.level, block_floor(specs_b, base.narrowed(a.min_bits, a.strategy)))
        den += p
    return num / den


def meet_budget(
    blocks: Mapping[str, list[LayerSpec]], alloc: Allocation, block_sens: Mapping[str, float], target: float,
    grid: np.ndarray, base: Constraints, config: SearchConfig,
) -> Allocation:
    """Tighten the least sensitive blocks one step at a time until the predicted fraction meets ``target``."""
    alloc = dict(alloc)
    order = sorted(blocks, key=lambda b: (block_sens.get(b, 0.0), list(blocks).index(b)))
    while predicted_fraction(blocks, alloc, base) > target * (1 + 1e-9):
        for b in order:
            a = alloc[b]
            if a.level_index < len(grid) - 1:
                i = a.level_index + 1
                a = dataclasses.replace(a, level_index=i, level=min(a.level, float(grid[i])))
            elif a.strategy != Strategy.BOTH:
                a = dataclasses.replace(a, strategy=Strategy.BOTH)
            else:
                continue
            alloc[b] = dataclasses.replace(
                a, min_bits=min_bits_for(blocks[b], a.level_index, a.level, a.strategy, base, config)
            )
            break
        else:
            break  # nothing left to tighten: the floor of the space (check_budget_feasible ran before)
    return alloc


def block_default(specs_b: list[LayerSpec], a: BlockAllocation, base: Constraints) -> Layers:
    """A simple block policy meeting the allocation: the mildest uniform (bits, keep) within its level."""
    c = base.narrowed(a.min_bits, a.strategy)
    for bits in [b for b in c.bits if b >= c.min_bits and (a.strategy != Strategy.PRUNE or b == 8)]:
        for keep in c.keeps if a.strategy != Strategy.QUANTIZE else (1.0,):
            lay = share_group_keeps(specs_b, uniform_policy(specs_b, bits, keep))
            if storage_fraction(specs_b, lay) <= a.level:
                return lay
    return most_aggressive_policy(specs_b, c)


def allocation_policy(blocks: Mapping[str, list[LayerSpec]], alloc: Allocation, base: Constraints) -> Layers:
    out: Layers = {}
    for name, specs_b in blocks.items():
        out.update(block_default(specs_b, alloc[name], base))
    return out


class HLAEnv(gym.Env):
    """One step = one allocation of (level, strategy) to every block; the episode ends after it.

    Observation (constant): block sensitivities, block parameter shares, and 4x the target fraction.
    """

    def __init__(
        self, specs: list[LayerSpec], block_sens: Mapping[str, float], target: float, config: SearchConfig,
        predict_drop: Callable[[Layers], float], feedback_weight: float,
    ):
        self.blocks = blocks_of(specs)
        self.names = list(self.blocks)
        self.sens = np.array([float(block_sens.get(b, 0.0)) for b in self.names])
        params = np.array([sum(s.params for s in self.blocks[b]) for b in self.names], dtype=float)
        self.share = params / params.sum()
        self.target, self.config, self.rewards = target, config, config.rewards
        self.grid = level_grid(config, target)
        self.base = Constraints.from_config(config)
        self.predict_drop, self.feedback_weight = predict_drop, feedback_weight
        self._drops: dict[tuple, float] = {}
        n = len(self.names)
        self.action_space = gym.spaces.MultiDiscrete([len(self.grid), len(STRATEGIES)] * n)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2 * n + 1,), np.float32)
        self._obs = np.concatenate([self.sens, self.share, [4 * target]]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def decode(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Strategy]]:
        """(shifted level indices, their fractions, strategies) of a raw action."""
        a = np.asarray(action, dtype=int).reshape(len(self.names), 2)
        idx = np.array([fisher_shift(i, s, len(self.grid)) for i, s in zip(a[:, 0], self.sens, strict=True)])
        return idx, self.grid[idx], [STRATEGIES[i] for i in a[:, 1]]

    def allocation(self, action: np.ndarray) -> Allocation:
        _, fr, st = self.decode(action)
        return make_allocation(self.blocks, fr, st, self.grid, self.base, self.config)

    def reward(self, action: np.ndarray) -> float:
        idx, fr, st = self.decode(action)
        r = self.rewards
        aggr = idx / max(1, len(self.grid) - 1)  # 0 mildest .. 1 harshest
        balance = r.hla_balance * float(np.var(aggr))
        match = r.hla_match * float(np.mean(np.abs((1 - aggr) - self.sens)))
        gap = r.hla_gap * abs(float(self.share @ fr) / self.target - 1)
        key = (tuple(idx), tuple(st))
        if key not in self._drops:
            alloc = make_allocation(self.blocks, fr, st, self.grid, self.base, self.config)
            self._drops[key] = float(self.predict_drop(allocation_policy(self.blocks, alloc, self.base)))
        return balance + match + gap + self.feedback_weight * self._drops[key]

    def step(self, action: np.ndarray):
        return self._obs.copy(), self.reward(action), True, False, {}


def allocate(
    specs: list[LayerSpec], block_sens: Mapping[str, float], budget: Budget, config: SearchConfig,
    predict_drop: Callable[[Layers], float], cycle: int,
) -> Allocation:
    """Train the HLA ensemble for one cycle and return the voted, budget-meeting allocation."""
    target = target_fraction(specs, budget, config)
    kinds = ensemble_kinds(config.ensemble)
    r: RewardConfig = config.rewards

    def make_env(kind: str) -> HLAEnv:
        w = r.hla_alt_feedback if kind == "ppo_alt" else r.hla_feedback
        return HLAEnv(specs, block_sens, target, config, predict_drop, w)

    seeds = [agent_seed(config.seed, cycle, "hla", k) for k in range(len(kinds))]
    agents = train_ensemble(make_env, seeds, kinds, config.hla_timesteps)
    env = agents[0][1]
    obs, _ = env.reset()
    decoded = [env.decode(model.predict(obs, deterministic=True)[0]) for model, _ in agents]
    fractions = vote_levels(np.stack([d[1] for d in decoded]))
    strategies = vote_strategies(np.stack([[STRATEGIES.index(s) for s in d[2]] for d in decoded]))
    alloc = make_allocation(env.blocks, fractions, strategies, env.grid, env.base, config)
    return meet_budget(env.blocks, alloc, block_sens, target, env.grid, env.base, config)
