"""Training the search's stable-baselines3 agents leaves nothing behind in the temporary folder (SB3's default
logger would make an empty ``$TMPDIR/SB3-<date-time>`` folder per agent)."""

from __future__ import annotations

import glob
import tempfile

import gymnasium as gym
import numpy as np

from hirelc.search.agents import AGENT_KINDS, train_agent, train_ensemble


class _Tiny(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(3, 0.1 * self.t, np.float32), float(action[0]), self.t >= 4, False, {}


def test_agents_leave_no_sb3_folder_behind(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_before = set(glob.glob("/tmp/SB3-*"))

    for i, kind in enumerate(("ppo", "a2c")):
        train_agent(kind, _Tiny(), seed=i, timesteps=32)
    agents = train_ensemble(lambda kind: _Tiny(), [1, 2, 3], AGENT_KINDS, 32)

    assert len(agents) == 3
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("SB3-")) == []
    assert set(glob.glob("/tmp/SB3-*")) - real_before == set()
