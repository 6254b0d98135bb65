"""Low-level agents: one independent ensemble per block choosing ``[bits, keep, scheme, granularity]`` per layer.

Reward per step (the method's LLA reward), with ``cr`` the block's storage fraction (cost.py on the block's layers, so scale
and bias overheads count) and ``t`` its HLA level::

    alpha * acc_reward(drop) + beta * (1 - cr) * 60 + 20 * exp(-10 |cr - t|)
        - gamma * 2 * std(last 5 rewards) - 12 * (1 - cr) * block sensitivity

``drop`` is the predicted accuracy drop (points) of the whole model with this block's choice and the current
incumbent everywhere else. The std is over this episode's last five base rewards (this step included).

**Voting.** Each agent's deterministic action vector is weighted by ``softmax(mean reward / 10)``, where the
mean is the per-step reward over its last quarter of training episodes (what it converged to); the weighted
mean of the index vectors is rounded half up and then masked (:func:`~hirelc.search.space.decode_block`).
On the binary scheme axis this is a weighted majority; the other axes are ordinal (mildest first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from hirelc.search.agents import agent_seed, ensemble_kinds, train_ensemble
from hirelc.search.config import SearchConfig
from hirelc.search.hla import BlockAllocation
from hirelc.search.space import (
    STRATEGIES,
    Constraints,
    Layers,
    decode_block,
    policy_key,
    storage_fraction,
)
from hirelc.topology import LayerSpec

WEIGHT_TEMPERATURE = 10.0  # reward units; a 10-point better agent gets e times the weight


def acc_reward(drop: float) -> float:
    """Piecewise-linear in the drop (points): 100 under 1, 60 at 5, 10 at 15, then -2/point, floored at -50."""
    d = max(0.0, float(drop))
    if d < 1:
        return 100.0
    if d < 5:
        return 100.0 - 10.0 * (d - 1)
    if d < 15:
        return 60.0 - 5.0 * (d - 5)
    return max(-50.0, 10.0 - 2.0 * (d - 15))


def ensemble_weights(scores: np.ndarray, temperature: float = WEIGHT_TEMPERATURE) -> np.ndarray:
    """Softmax of the agents' mean rewards."""
    z = np.asarray(scores, dtype=float) / temperature
    w = np.exp(z - z.max())
    return w / w.sum()


def combine_actions(actions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of index vectors (agents, dims), rounded half up to integers (dims,)."""
    a, w = np.asarray(actions, dtype=float), np.asarray(weights, dtype=float)
    return np.floor(w @ a / w.sum() + 0.5).astype(int)


class LLAEnv(gym.Env):
    """A block's configuration game: every step proposes a full configuration of the block's layers."""

    def __init__(
        self, specs_b: list[LayerSpec], constraints: Constraints, target: float, block_sens: float,
        base_layers: Layers, predict_drop: Callable[[Layers], float], config: SearchConfig,
        alpha: float, beta: float,
    ):
        self.specs, self.c, self.target, self.sens = specs_b, constraints, target, float(block_sens)
        self.base, self.predict_drop = base_layers, predict_drop
        self.r, self.alpha, self.beta, self.ep_len = config.rewards, alpha, beta, config.lla_episode_len
        self.action_space = gym.spaces.MultiDiscrete(np.tile(constraints.nvec, len(specs_b)))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (9,), np.float32)
        self.episode_means: list[float] = []  # mean per-step reward of each finished episode
        self._all: list[float] = []
        self._hist: list[float] = []
        self._t, self._cr, self._drop = 0, target, 0.0

    def _obs(self) -> np.ndarray:
        strat = [float(self.c.strategy == s) for s in STRATEGIES]
        return np.array([4 * self.target, self.c.min_bits / 8, *strat, self.sens, 4 * self._cr,
                         min(self._drop, 50.0) / 50, self._t / self.ep_len], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._hist, self._t, self._cr, self._drop = [], 0, self.target, 0.0
        return self._obs(), {}

    def evaluate(self, action: np.ndarray) -> tuple[Layers, float, float, float]:
        """(block layers, storage fraction, predicted drop, reward before the stability term) of an action."""
        layers = decode_block(self.specs, action, self.c)
        cr = storage_fraction(self.specs, layers)
        drop = float(self.predict_drop({**self.base, **layers}))
        r = self.r
        base = (self.alpha * acc_reward(drop) + self.beta * (1 - cr) * r.compression_scale
                + r.target_bonus * math.exp(-r.target_sharpness * abs(cr - self.target))
                - r.sensitivity_penalty * (1 - cr) * self.sens)
        return layers, cr, drop, base

    def step(self, action: np.ndarray):
        _, self._cr, self._drop, base = self.evaluate(action)
        self._hist.append(base)
        window = self._hist[-self.r.stability_window:]
        reward = base - self.r.gamma * self.r.stability_scale * (float(np.std(window)) if len(window) > 1 else 0.0)
        self._all.append(reward)
        self._t += 1
        done = self._t >= self.ep_len
        if done:
            self.episode_means.append(float(np.mean(self._all[-self.ep_len:])))
        return self._obs(), reward, done, False, {}

    def converged_reward(self) -> float:
        """Mean per-step reward over the last quarter of finished episodes (all steps if none finished)."""
        eps = self.episode_means
        if not eps:
            return float(np.mean(self._all)) if self._all else 0.0
        return float(np.mean(eps[-max(1, len(eps) // 4):]))


@dataclass
class BlockProposal:
    """What one block's ensemble proposes: the vote first, then distinct alternatives for exploration."""

    voted: Layers
    options: list[Layers]  # distinct block policies; options[0] is the vote
    weights: list[float]  # the agents' vote weights


def propose_block(
    specs_b: list[LayerSpec], alloc: BlockAllocation, block_sens: float, base_layers: Layers,
    predict_drop: Callable[[Layers], float], config: SearchConfig, cycle: int, block_index: int,
    samples_per_agent: int = 2,
) -> BlockProposal:
    """Train the block's LLA ensemble for this cycle, vote, and sample alternatives from the agents' policies."""
    c = Constraints.from_config(config).narrowed(alloc.min_bits, alloc.strategy)
    r = config.rewards
    kinds = ensemble_kinds(config.ensemble)

    def make_env(kind: str) -> LLAEnv:
        a, b = (r.alt_alpha, r.alt_beta) if kind == "ppo_alt" else (r.alpha, r.beta)
        return LLAEnv(specs_b, c, alloc.level, block_sens, base_layers, predict_drop, config, a, b)

    seeds = [agent_seed(config.seed, cycle, "lla", block_index, k) for k in range(len(kinds))]
    agents = train_ensemble(make_env, seeds, kinds, config.lla_timesteps)
    obs, _ = agents[0][1].reset()
    det = np.stack([model.predict(obs, deterministic=True)[0] for model, _ in agents])  # (agents, layers*4)
    weights = ensemble_weights(np.array([env.converged_reward() for _, env in agents]))
    voted = decode_block(specs_b, combine_actions(det, weights), c)
    options, seen = [], set()
    raw = [*det] + [model.predict(obs, deterministic=False)[0] for model, _ in agents for _ in range(samples_per_agent)]
    for lay in [voted] + [decode_block(specs_b, a, c) for a in raw]:
        key = policy_key(specs_b, lay)
        if key not in seen:
            seen.add(key)
            options.append(lay)
    return BlockProposal(voted, options, [float(w) for w in weights])
