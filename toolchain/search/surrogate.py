"""Surrogate of real accuracy: an MLP over policy features, used only to shape RL rewards and pick candidates.

Architecture as the reference: hidden [64, 32], ReLU, dropout 0.3, output ``sigmoid * 100`` (accuracy, %).
Uncertainty comes from a small **bootstrap ensemble** (each member trained on a resample of the real results,
early-stopped on its out-of-bag points); ``std`` is the spread of the members' predictions. Unlike MC dropout
this is deterministic at prediction time, so a resumed search makes exactly the same choices.

With a **prior** (``fit(..., prior=...)``, one accuracy per policy from something cheaper than a real
evaluation: the search passes its cold-start proxy mapped to accuracy, :class:`ProxyLine`), each member learns a
correction to it: its output is ``sigmoid(net(x) + logit(prior / 100))`` and starts at zero correction. Five real
results cannot teach an MLP over a hundred features much; this way it predicts what the prior says until the
results show otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from hirelc.cost import policy_storage
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, PerTensor, Scheme
from hirelc.search.agents import single_thread
from hirelc.topology import LayerSpec

Layers = dict[str, LayerPolicy]
N_LAYER_FEATURES = 8
N_GLOBAL_FEATURES = 5


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 points or a constant input."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined; scipy would warn or raise here
        return float("nan")
    return float(spearmanr(x, y).statistic)


def policy_features(specs: list[LayerSpec], layers: Layers, sensitivity: Mapping[str, float]) -> np.ndarray:
    """Fixed-length feature vector of a whole-model policy: per-layer features in model order + global ones.

    Per layer: bits/8, keep, asymmetric, per-tensor / per-channel / per-group one-hot, and Fisher-weighted
    bit and channel reductions ``s*(1 - bits/8)``, ``s*(1 - keep)``. Global: 4/effective ratio (1 at int8),
    params-weighted mean bits/8 and keep, Fisher-weighted mean bit and channel reductions.
    """
    total = sum(s.params for s in specs)
    s_tot = sum(float(sensitivity.get(s.name, 0.0)) for s in specs) or 1.0
    rows, glob = [], np.zeros(N_GLOBAL_FEATURES - 1)
    for s in specs:
        lp, sens = layers[s.name], float(sensitivity.get(s.name, 0.0))
        b = (lp.bits or 32) / 8
        g = lp.granularity
        rows.append([
            min(b, 4.0), lp.keep_ratio, float(lp.scheme == Scheme.ASYMMETRIC),
            float(isinstance(g, PerTensor)), float(isinstance(g, PerChannel)), float(isinstance(g, PerGroup)),
            sens * max(0.0, 1 - b), sens * (1 - lp.keep_ratio),
        ])
        share = s.params / total
        glob += [share * min(b, 4.0), share * lp.keep_ratio, sens / s_tot * max(0.0, 1 - b),
                 sens / s_tot * (1 - lp.keep_ratio)]
    ratio = policy_storage(specs, layers)["effective_ratio"]
    return np.concatenate([np.asarray(rows).ravel(), [4.0 / ratio], glob]).astype(np.float32)


def _mlp(n_in: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    for h in hidden:
        mods += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
        n_in = h
    return nn.Sequential(*mods, nn.Linear(n_in, 1))  # logit of accuracy / 100


class Surrogate:
    """Bootstrap ensemble of small MLPs mapping policy features to accuracy (%)."""

    def __init__(
        self, specs: list[LayerSpec], sensitivity: Mapping[str, float], members: int = 5, seed: int = 0,
        hidden: tuple[int, ...] = (64, 32), dropout: float = 0.3, max_epochs: int = 400, patience: int = 40,
    ):
        self.specs, self.sensitivity = specs, dict(sensitivity)
        self.members, self.seed, self.hidden, self.dropout = members, seed, hidden, dropout
        self.max_epochs, self.patience = max_epochs, patience
        self.n_features = len(specs) * N_LAYER_FEATURES + N_GLOBAL_FEATURES
        self.nets: list[nn.Sequential] = []
        self.mu = np.zeros(self.n_features, np.float32)
        self.sd = np.ones(self.n_features, np.float32)
        self.n_train = 0
        self.with_prior = False

    def features(self, policies: Sequence[Layers]) -> torch.Tensor:
        x = np.stack([policy_features(self.specs, p, self.sensitivity) for p in policies])  # (N, F)
        return torch.from_numpy((x - self.mu) / self.sd)

    def fit(self, policies: Sequence[Layers], accuracy: Sequence[float], prior: Sequence[float] | None = None) -> None:
        """Train every member from scratch on a bootstrap resample; early stop on its out-of-bag MSE.

        ``prior``: an accuracy (%) per policy that the members correct rather than replace (module docstring);
        :meth:`predict` then needs one per policy too. Seeded by ``(seed, number of points)`` inside a forked RNG,
        so refitting on the same data gives the same weights and the caller's global RNG state is untouched.
        """
        raw = np.stack([policy_features(self.specs, p, self.sensitivity) for p in policies])  # (N, F)
        self.mu, self.sd = raw.mean(0), np.maximum(raw.std(0), 0.1).astype(np.float32)
        x = torch.from_numpy((raw - self.mu) / self.sd)  # (N, F)
        y = torch.tensor(np.asarray(accuracy, np.float32) / 100).clamp(1e-3, 1 - 1e-3)  # (N,)
        n = len(y)
        self.with_prior = prior is not None
        offset = self._offset(prior, n)
        rng = np.random.default_rng([self.seed, n])
        self.nets = []
        with torch.random.fork_rng(devices=[]), single_thread():
            torch.manual_seed(int(rng.integers(2**31)))
            for _ in range(self.members):
                idx = rng.integers(0, n, n)
                oob = np.setdiff1d(np.arange(n), idx)
                val = oob if oob.size else idx  # tiny samples can have no out-of-bag point
                self.nets.append(self._train_one(x, y, offset, torch.from_numpy(idx), torch.from_numpy(val)))
        self.n_train = n

    def _offset(self, prior: Sequence[float] | None, n: int) -> torch.Tensor:
        """The prior in logit space (zeros without one), checked against what the surrogate was fitted with."""
        if (prior is not None) != self.with_prior:
            raise ValueError("this surrogate was fitted " + ("with" if self.with_prior else "without") +
                             " a prior accuracy per policy; predict the same way")
        if prior is None:
            return torch.zeros(n)
        p = np.asarray(prior, np.float32)
        if p.shape != (n,) or not np.isfinite(p).all():
            raise ValueError(f"the prior needs one finite accuracy per policy ({n}), got shape {p.shape}")
        return torch.logit(torch.from_numpy(p / 100).clamp(1e-3, 1 - 1e-3))

    def _train_one(self, x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, idx: torch.Tensor,
                   val: torch.Tensor) -> nn.Sequential:
        net = _mlp(self.n_features, self.hidden, self.dropout)
        with torch.no_grad():  # start at the mean accuracy (or the prior) so early epochs fit the differences
            net[-1].bias.fill_(0.0 if self.with_prior else float(torch.logit(y[idx].mean())))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        best, best_state, bad = float("inf"), None, 0
        for _ in range(self.max_epochs):  # full batch: at most a few hundred points
            net.train()
            loss = (torch.sigmoid(net(x[idx]).squeeze(-1) + offset[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                v = float((torch.sigmoid(net(x[val]).squeeze(-1) + offset[val]) - y[val]).pow(2).mean())
            if v < best - 1e-9:
                best, best_state, bad = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net.eval()

    @torch.no_grad()
    def predict(self, policies: Sequence[Layers], prior: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (across members) of predicted accuracy in %, one per policy (``prior``: as in :meth:`fit`)."""
        x = self.features(policies)  # (N, F)
        offset = self._offset(prior, len(policies))
        with single_thread():
            preds = torch.stack([torch.sigmoid(net(x).squeeze(-1) + offset) * 100 for net in self.nets])  # (M, N)
        return preds.mean(0).numpy().astype(float), preds.std(0, unbiased=False).numpy().astype(float)

    def state_dict(self) -> dict:
        return {"nets": [n.state_dict() for n in self.nets], "mu": torch.from_numpy(np.asarray(self.mu)),
                "sd": torch.from_numpy(np.asarray(self.sd)), "n_train": self.n_train, "with_prior": self.with_prior}

    def load_state_dict(self, state: dict) -> None:
        self.nets = []
        for sd in state["nets"]:
            net = _mlp(self.n_features, self.hidden, self.dropout)
            net.load_state_dict(sd)
            self.nets.append(net.eval())
        self.mu, self.sd, self.n_train = state["mu"].numpy(), state["sd"].numpy(), state["n_train"]
        self.with_prior = bool(state.get("with_prior", False))


class ProxyLine:
    """The cold-start proxy's drop mapped to accuracy (%) by a least-squares line through real results, falling
    with the drop; flat at their mean when they do not fall with it (then it says nothing either way)."""

    def __init__(self, drops: Sequence[float], accuracy: Sequence[float]):
        x, y = np.asarray(drops, dtype=float), np.asarray(accuracy, dtype=float)
        if x.size == 0 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("a proxy line needs as many finite drops as accuracies, at least one")
        self.x0, self.y0 = float(x.mean()), float(y.mean())
        slope = float(np.cov(x, y, bias=True)[0, 1] / np.var(x)) if np.ptp(x) > 1e-9 else 0.0
        self.slope = min(slope, 0.0)

    def __call__(self, drops: Sequence[float]) -> np.ndarray:
        return self.y0 + self.slope * (np.asarray(drops, dtype=float) - self.x0)
