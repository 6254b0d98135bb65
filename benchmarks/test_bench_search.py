"""Per-step overhead of the search: surrogate query and an agent step, on synthetic layers."""

import numpy as np

from hirelc.policy import LayerPolicy
from hirelc.search.surrogate import Surrogate
from hirelc.topology import LayerSpec

SPECS = [LayerSpec(f"l{i}", "conv", 64, 64, (3, 3), 36864, 1 << 20, f"b{i // 2}", i, True) for i in range(20)]
SENS = {"layer": {s.name: 0.5 for s in SPECS}, "block": {s.block: 0.5 for s in SPECS}}


def _policy(rng):
    return {s.name: LayerPolicy(bits=int(rng.choice([4, 5, 6, 8])), keep_ratio=float(rng.choice([0.5, 1.0])))
            for s in SPECS}


def test_surrogate_query(benchmark):
    rng = np.random.default_rng(0)
    sur = Surrogate(SPECS, SENS["layer"], members=3, seed=0)
    pols = [_policy(rng) for _ in range(16)]
    sur.fit(pols, [80.0 + rng.random() for _ in pols])
    mean, std = benchmark(lambda: sur.predict(pols[:4]))
    assert len(mean) == 4


def test_surrogate_fit(benchmark):
    """Refitting the bootstrap ensemble after a cycle's real evaluations (24 points)."""
    rng = np.random.default_rng(1)
    pols = [_policy(rng) for _ in range(24)]
    accs = [80.0 + 5 * rng.random() for _ in pols]

    def fit():
        sur = Surrogate(SPECS, SENS["layer"], members=3, seed=0)
        sur.fit(pols, accs)
        return sur

    assert benchmark.pedantic(fit, rounds=3, iterations=1).n_train == 24


def test_lla_agent_step(benchmark):
    """One low-level agent step as a cycle runs it: the PPO policy's action, then the block env's reward with
    the accuracy drop predicted by the surrogate for the whole policy."""
    from stable_baselines3 import PPO

    from hirelc.search.agents import single_thread
    from hirelc.search.config import SearchConfig
    from hirelc.search.lla import LLAEnv
    from hirelc.search.space import Constraints, Strategy, uniform_policy

    rng = np.random.default_rng(2)
    pols = [_policy(rng) for _ in range(12)]
    sur = Surrogate(SPECS, SENS["layer"], members=3, seed=0)
    sur.fit(pols, [80.0 + 5 * rng.random() for _ in pols])
    base = uniform_policy(SPECS, 8, 1.0)
    cfg = SearchConfig()
    block = [s for s in SPECS if s.block == "b1"]
    env = LLAEnv(block, Constraints.from_config(cfg).narrowed(4, Strategy.BOTH), 0.2, 0.5, base,
                 lambda lay: 90.0 - float(sur.predict([lay])[0][0]), cfg, alpha=1.0, beta=1.0)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=8, seed=0, device="cpu", verbose=0,
                policy_kwargs=dict(net_arch=[64, 64]))
    obs, _ = env.reset()

    def step():
        nonlocal obs
        action, _ = model.predict(obs, deterministic=False)
        obs, reward, done, _, _ = env.step(action)
        if done:
            obs, _ = env.reset()
        return reward

    with single_thread():
        reward = benchmark(step)
    assert np.isfinite(reward)
