"""Creating and training the stable-baselines3 agents of both levels, reproducibly.

Every agent's seed is a function of (search seed, cycle, block, agent index) only, so a resumed search
re-creates exactly the agents an uninterrupted one would have had; agents are therefore never saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np

AGENT_KINDS = ("ppo", "a2c", "ppo_alt")  # the ensemble; "ppo_alt" trains on the alternative reward weights


def agent_seed(*parts: int | str) -> int:
    """A 31-bit seed derived from any mix of ints and strings (stable across processes, unlike hash())."""
    ints = [p if isinstance(p, int) else int.from_bytes(str(p).encode()[:16].ljust(16, b"\0"), "little") for p in parts]
    return int(np.random.SeedSequence([abs(i) for i in ints]).generate_state(1)[0] % (2**31 - 1))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block, restoring the previous count after."""
    import torch  # imported on use: the search's config types load without torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """One thread: the agents' and the surrogate's tiny MLPs only lose time to thread pools."""
    return torch_threads(1)


def ensemble_kinds(ensemble: bool) -> tuple[str, ...]:
    return AGENT_KINDS if ensemble else AGENT_KINDS[:1]


def quiet_logger():
    """An SB3 logger with no folder and no outputs.

    Left to itself, ``learn()`` calls ``stable_baselines3.common.utils.configure_logger``, which (with
    ``verbose=0`` and no ``tensorboard_log``) still calls ``logger.configure(None, [""])``, and that makes
    an empty ``$TMPDIR/SB3-<date-time>`` folder (or ``$SB3_LOGDIR``) for every agent. ``configure`` itself
    always creates a folder, so the logger is built directly and handed over with ``set_logger``, which makes
    ``_setup_learn`` keep it.
    """
    from stable_baselines3.common.logger import Logger  # heavy: imported when an agent is built

    return Logger(folder=None, output_formats=[])


def train_agent(kind: str, env: gym.Env, seed: int, timesteps: int):
    """Build a small PPO or A2C for ``env`` and train it for ``timesteps`` environment steps."""
    from stable_baselines3 import A2C, PPO  # heavy: imported only when a search runs

    common = dict(seed=seed, device="cpu", verbose=0, policy_kwargs=dict(net_arch=[64, 64]))
    if kind == "a2c":
        model = A2C("MlpPolicy", env, n_steps=8, learning_rate=1e-3, ent_coef=0.01, **common)
    else:
        n_steps = int(np.clip(timesteps // 4, 16, 256)) // 2 * 2
        model = PPO(
            "MlpPolicy", env, n_steps=n_steps, batch_size=n_steps // 2, n_epochs=4, learning_rate=1e-3,
            ent_coef=0.01, **common,
        )
    model.set_logger(quiet_logger())  # else learn() leaves an empty $TMPDIR/SB3-<time> folder behind
    model.learn(total_timesteps=timesteps)
    return model


def train_ensemble(
    make_env: Callable[[str], gym.Env], seeds: Sequence[int], kinds: Sequence[str], timesteps: int
) -> list[tuple[object, gym.Env]]:
    """Train one agent per kind on its own env (``make_env(kind)``); returns (model, env) pairs."""
    out = []
    with single_thread():
        for kind, seed in zip(kinds, seeds, strict=True):
            env = make_env(kind)
            out.append((train_agent(kind, env, seed, timesteps), env))
    return out
