"""Typed configuration of the search: reward weights, search effort, action-space levels and the budget.

Every option is a field of a frozen dataclass that validates itself, so a run's configuration can be printed,
saved and compared; there is no loose dict of options anywhere in the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hirelc.errors import HirelcError
from hirelc.options import SCREENINGS, SURROGATE_PRIORS
from hirelc.policy import ALLOWED_BITS, FORMAT_KEYS


@dataclass(frozen=True)
class RewardConfig:
    """Reward weights of both agent levels (the method's reference values unless marked "here")."""

    # Low level, per step: alpha*acc + beta*(1-cr)*60 + 20*exp(-10|cr-t|) - gamma*2*std(last 5) - 12*(1-cr)*s
    alpha: float = 1.0  # weight of the piecewise accuracy reward (100 for a drop under 1 point)
    beta: float = 1.0  # weight of the compression reward
    gamma: float = 1.0  # weight of the stability penalty (std of recent rewards)
    alt_alpha: float = 0.6  # the third LLA agent leans towards compression (here: the reference only says "other")
    alt_beta: float = 1.6
    compression_scale: float = 60.0
    target_bonus: float = 20.0
    target_sharpness: float = 10.0
    stability_scale: float = 2.0
    stability_window: int = 5
    sensitivity_penalty: float = 12.0
    # High level, per allocation: balance + sensitivity match + gap + feedback.
    hla_balance: float = -10.0  # times the variance of the blocks' aggressiveness (0 = mildest level, 1 = harshest)
    hla_gap: float = -50.0  # times |params-weighted mean level / global target - 1|
    hla_match: float = -20.0  # times mean |safety - sensitivity| (sensitive blocks should get mild levels; here)
    hla_feedback: float = -2.0  # times the predicted accuracy drop (points) of the allocation's policy (here)
    hla_alt_feedback: float = -5.0  # the third HLA agent weighs accuracy more (here)


SEARCH_MODES = ("hierarchical", "flat", "random")


@dataclass(frozen=True)
class SearchConfig:
    """Effort, action space and switches of one search.

    Levels and the HLA's level grid follow the method's reference grid; ``levels`` is the reference grid for a 4x (0.25) target
    and is scaled by ``target_fraction / 0.25`` for other targets, so the middle level is always the target.
    """

    seed: int = 0
    cycles: int = 4  # active-learning cycles after the warm-up
    hla_timesteps: int = 256  # per HLA agent per cycle (one timestep = one whole allocation)
    lla_timesteps: int = 512  # per LLA agent per block per cycle
    lla_episode_len: int = 8  # steps per LLA episode (the stability term needs a reward history)
    candidates_per_cycle: int = 16  # distinct candidate policies proposed per cycle
    real_evals_per_cycle: int = 4  # half (rounded up) most promising, the rest most uncertain
    warmup_real_evals: int = 8  # random valid policies (one of them the uniform policy meeting the budget)
    min_surrogate_points: int = 6  # below this many real results the logit-MSE proxy shapes rewards
    bit_levels: tuple[int, ...] = (4, 5, 6, 8)  # offered weight widths (any order; must include 8)
    max_prune: float = 0.6  # smallest keep ratio offered is 1 - max_prune
    keep_steps: int = 7  # keep levels: linspace(1, 1 - max_prune, keep_steps)
    group_sizes: tuple[int, ...] = (32, 64)  # per-group granularities offered (ONNX block sizes)
    levels: tuple[float, ...] = (0.35, 0.30, 0.25, 0.20, 0.15)  # HLA levels, mildest first
    level_min_bits: tuple[int, ...] = (6, 6, 5, 5, 4)  # min_bits each level sets for its block's LLA
    default_target_fraction: float = 0.25  # used when the budget states no ratio and no size
    mode: str = "hierarchical"  # hierarchical (HiReLC) | flat (one PPO agent over all layers, no HLA: HAQ-like)
    #                             | random (random valid policies repaired into the budget; no agents)
    ensemble: bool = True  # three agents per level (PPO, A2C, PPO with other weights) vs one PPO
    use_surrogate: bool = True  # False: the logit-MSE proxy shapes rewards throughout (ablation)
    fisher_guided: bool = True  # False: uniform sensitivity everywhere in the search (ablation)
    fill_budget: bool = False  # after repair, loosen the most sensitive layers while the budget still holds
    # Adaptive fidelity: when the warm-up's real evaluations do not separate (the best scores more than
    # fidelity_gap points under the baseline, or all lie within fidelity_spread points of one another while
    # under it), every real evaluation's fine-tune is doubled and the warm-up scored again, at most
    # fidelity_doublings times; the rest of the search runs at the length reached. 0 turns it off.
    fidelity_doublings: int = 2
    fidelity_gap: float = 25.0
    fidelity_spread: float = 0.5
    surrogate_members: int = 5  # bootstrap ensemble size (uncertainty = std across members)
    # What ranks a cycle's candidates for the "promising" real evaluations once a surrogate exists: "surrogate"
    # (its mean prediction) or "proxy" (the logit-MSE proxy of every candidate, mapped to accuracy by a line fitted
    # to the real results; the surrogate still shapes the agents' rewards and picks the "uncertain" ones).
    screening: str = "surrogate"
    # What the surrogate learns from its few real results: "none" (accuracy from the policy's features alone) or
    # "proxy" (a correction to the cold-start proxy mapped to accuracy by a line through those results: the
    # surrogate then predicts what the proxy says until the results show otherwise; hirelc.search.surrogate).
    surrogate_prior: str = "none"
    # Random policies, repaired into the budget, added to each cycle's candidates beside the agents' (0: none), so
    # the screening also weighs candidates the agents would not propose.
    random_candidates: int = 0
    # Proxy-screened warm-up: draw this many random policies repaired into the budget, score each with the
    # logit-MSE proxy (~0.15 s each on resnet18, ~2 s on deit_tiny; a real evaluation costs more) and really
    # evaluate the ones it ranks best beside the uniform anchor; 0: the warm-up evaluates random policies as drawn.
    # In ``mode="random"`` ``random_candidates`` does the same for each cycle (random search screened by the proxy).
    warmup_pool: int = 0
    # weight formats (hirelc.policy.FORMAT_KEYS) the space offers; None = all. The pipeline sets the ones the
    # run directory's latency table finds no slower than int8, so the default space holds only fast formats.
    formats: tuple[str, ...] | None = None
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        bits = tuple(sorted(set(self.bit_levels)))
        if not bits or any(b not in ALLOWED_BITS for b in bits) or 8 not in bits:
            raise HirelcError(f"bit_levels must be a subset of {ALLOWED_BITS} containing 8, got {self.bit_levels}")
        if not (0.0 <= self.max_prune < 1.0) or self.keep_steps < 1:
            raise HirelcError("max_prune must be in [0, 1) and keep_steps >= 1")
        if any(g < 2 for g in self.group_sizes):
            raise HirelcError(f"group sizes must be >= 2, got {self.group_sizes}")
        if len(self.levels) != len(self.level_min_bits) or list(self.levels) != sorted(self.levels, reverse=True):
            raise HirelcError("levels must be descending (mildest first) with one min_bits per level")
        if min(self.cycles, self.warmup_real_evals - 1, self.real_evals_per_cycle, self.candidates_per_cycle) < 0:
            raise HirelcError("cycles, evaluations and candidates must be non-negative (warm-up >= 1)")
        if self.fidelity_doublings < 0 or not (self.fidelity_gap > 0 and self.fidelity_spread >= 0):
            raise HirelcError("fidelity_doublings must be >= 0, fidelity_gap > 0 and fidelity_spread >= 0")
        if min(self.hla_timesteps, self.lla_timesteps, self.lla_episode_len) < 1:
            raise HirelcError("timesteps and episode length must be >= 1")
        if self.random_candidates < 0:
            raise HirelcError("random_candidates must be >= 0")
        if self.warmup_pool < 0:
            raise HirelcError("warmup_pool must be >= 0")
        if self.screening not in SCREENINGS:
            raise HirelcError(f"unknown screening {self.screening!r} (use {', '.join(SCREENINGS)})")
        if self.surrogate_prior not in SURROGATE_PRIORS:
            raise HirelcError(f"unknown surrogate prior {self.surrogate_prior!r} (use {', '.join(SURROGATE_PRIORS)})")
        if self.mode not in SEARCH_MODES:
            raise HirelcError(f"unknown search mode {self.mode!r} (use {', '.join(SEARCH_MODES)})")
        if self.formats is not None:
            if "w8" not in self.formats or any(f not in FORMAT_KEYS for f in self.formats):
                raise HirelcError(f"formats must be a subset of {FORMAT_KEYS} containing w8, got {self.formats}")
            object.__setattr__(self, "formats", tuple(f for f in FORMAT_KEYS if f in self.formats))
            if not any(f.startswith("w4") for f in self.formats):
                bits = tuple(b for b in bits if b > 4)
        object.__setattr__(self, "bit_levels", bits)

    @property
    def keep_levels(self) -> tuple[float, ...]:
        """Offered keep ratios, 1.0 first (mildest) down to ``1 - max_prune``."""
        n = self.keep_steps
        if n == 1 or self.max_prune == 0.0:
            return (1.0,)
        return tuple(round(1.0 - self.max_prune * i / (n - 1), 6) for i in range(n))


PRESETS: dict[str, SearchConfig] = {
    # ~9 real evaluations and a few hundred RL steps per agent: minutes with a 10-20 s evaluation. Its warm-up
    # evaluates the proxy's best 4 of 64 random feasible policies: with so few real evaluations the warm-up
    # winner is often the search's (docs/results.md, "A warm-up screened by the proxy").
    "quick": SearchConfig(
        cycles=2, hla_timesteps=96, lla_timesteps=192, candidates_per_cycle=8, real_evals_per_cycle=2,
        warmup_real_evals=5, min_surrogate_points=4, surrogate_members=3, warmup_pool=64,
    ),
    "standard": SearchConfig(),
    # Closer to the reference's effort (it warms up with 50-100 policies and runs 4 cycles).
    "thorough": SearchConfig(
        cycles=6, hla_timesteps=1024, lla_timesteps=2048, candidates_per_cycle=32, real_evals_per_cycle=6,
        warmup_real_evals=24, min_surrogate_points=10, bit_levels=(2, 3, 4, 5, 6, 8), keep_steps=13,
    ),
}


@dataclass(frozen=True)
class Budget:
    """What the winner must meet. Any field left None is unconstrained."""

    target_ratio: float | None = None  # effective storage ratio (fp32 bits / compressed bits), at least
    max_size_bytes: int | None = None  # predicted ONNX file size, at most
    max_latency_ms: float | None = None  # predicted ONNX Runtime latency, at most
    # max_size_bytes counts 2-bit codes four per byte (a file exported at opset >= 25, INT2); out of repr so that
    # a search state written before the field existed still resumes (the search's identity adds it when set)
    int2_storage: bool = field(default=False, repr=False)

    def __post_init__(self):
        for name in ("target_ratio", "max_size_bytes", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):  # NaN passes every comparison: refuse it up front
                raise HirelcError(f"budget: {name.replace('_', ' ')} must be a finite number, got {v}")
        if self.target_ratio is not None and self.target_ratio <= 0:
            raise HirelcError(f"target ratio must be positive, got {self.target_ratio}")
        if self.max_size_bytes is not None and self.max_size_bytes <= 0:
            raise HirelcError(f"max size must be positive, got {self.max_size_bytes} bytes")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise HirelcError(f"max latency must be positive, got {self.max_latency_ms} ms")
