"""The active-learning search loop: HLAs allocate, LLAs propose, real evaluations decide.

Phase 0 (warm-up) really evaluates random valid policies plus the mildest uniform policy that meets the
budget (with ``SearchConfig.warmup_pool``, the random ones the logit-MSE proxy ranks best in a larger pool).
Each cycle ``c = 1..cycles`` then: trains the surrogate on every earlier real result (or, while it has
fewer than ``min_surrogate_points`` or ``use_surrogate=False``, uses the logit-MSE proxy), trains the HLA
ensemble (allocation), trains one LLA ensemble per block (with the incumbent elsewhere), assembles distinct
candidates from the votes, the agents' own actions and samples of their stochastic policies (plus one-layer
mutations when those run out), repairs candidates outside the budget greedily, and really evaluates the most
promising (highest predicted accuracy) and the most uncertain (highest ensemble std) ones. The winner is the
best *really evaluated* policy meeting the budget.

**Screening, per cycle** (``SearchResult.cycles``, ``search.json``): how many candidates were put together, how
many distinct new ones met the budget (all of them are screened), by what (surrogate or proxy), how many went to a
real evaluation, the range of the screening's predictions, and whether the proxy saturated (every candidate at
its cap, or all alike: it cannot rank them, and the milder candidates go first).

**Adaptive fidelity** (``SearchConfig.fidelity_doublings``, evaluators with ``max_fidelity``): a real evaluation
is a short fine-tune, and when it is too short every candidate scores near the bottom and they cannot be told
apart. The warm-up checks that: when its best score is far under the baseline's, or all of its scores are alike
under it, the fine-tune length is doubled and the warm-up scored again, until they separate or the doublings run
out. Every later evaluation runs at the length reached; only results at that length compete (winner, surrogate,
front), and the earlier ones stay in the log, marked by their ``fidelity``, and count as real evaluations.

Baselines on the same loop (``SearchConfig.mode``): ``flat`` drops the high level and the ensembles (one PPO
agent proposes for every layer at once with the global target as its level, as HAQ does); ``random`` drops
every agent and the surrogate (random valid policies, repaired into the budget; with ``random_candidates`` the
proxy's best of a pool that large). Both spend the same number of real evaluations as the hierarchical search.

**Reproducibility.** Everything random in phase ``p`` is seeded from ``(seed, p, ...)`` and depends only on the
real results of earlier phases, so no RNG state or agent needs saving: the state file holds the real results,
the phase index and the surrogate weights, is written atomically after every real evaluation, and a resumed
search re-derives the interrupted phase's plan and skips what it already evaluated. Same seed, same policy.

**Batches.** Each phase first plans all of its real evaluations, then hands them to the evaluator at once: an
evaluator with a ``real_accuracies`` method (:class:`BatchEvaluator`, e.g. one that runs them as Ray tasks) may
run them in parallel, one without is called one policy at a time. Results are committed (logged, checkpointed) in
the plan's order, never in completion order, so the number of workers changes neither the history nor the winner.
The candidate screening by the proxy goes through ``proxy_drops`` the same way when the evaluator has one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from hirelc.cost import effective_ratio, policy_storage
from hirelc.errors import HirelcError
from hirelc.policy import LayerPolicy, Policy
from hirelc.runs import SEARCH_LOG, SEARCH_STATE, atomic_torch_save, atomic_write_text
from hirelc.search.agents import single_thread, torch_threads
from hirelc.search.config import Budget, SearchConfig
from hirelc.search.hla import Allocation, BlockAllocation, allocate, blocks_of, target_fraction
from hirelc.search.lla import BlockProposal, propose_block
from hirelc.search.space import (
    Constraints,
    Layers,
    Strategy,
    check_budget_feasible,
    decode,
    encode,
    loosen,
    policy_key,
    predicted_bytes,
    random_policy,
    share_group_keeps,
    storage_fraction,
    tighten,
    uniform_grid,
    valid_mask,
)
from hirelc.search.surrogate import ProxyLine, Surrogate, spearman
from hirelc.topology import LayerSpec

STATE_VERSION = 1
# One search.jsonl line per real evaluation. cycle 0 is the warm-up; kind: warmup-uniform | warmup-random |
# warmup-screened | random | random-screened | promising | uncertain; predicted_acc / _std: what screened the
# candidate (the surrogate, or with screening="proxy" the calibrated proxy; null without either), surrogate_acc:
# the surrogate's own prediction (null without one), predicted_bytes / _latency_ms: the evaluator's;
# storage_bytes = weights + qparams + biases; wall_s since the search started, eval_s of this evaluation;
# fidelity: how many times the evaluation's fine-tune was doubled (see SearchConfig.fidelity_doublings).
LOG_KEYS = (
    "cycle", "kind", "policy", "predicted_acc", "predicted_std", "surrogate_acc", "proxy_drop", "real_acc",
    "effective_ratio", "storage_bytes", "predicted_bytes", "predicted_latency_ms", "meets_budget", "wall_s", "eval_s",
    "fidelity",
)


def surrogate_prediction(rec: Mapping) -> float | None:
    """The surrogate's predicted accuracy of a logged real evaluation (logs written before ``surrogate_acc``
    existed hold it as ``predicted_acc``, when the surrogate screened)."""
    return rec["surrogate_acc"] if "surrogate_acc" in rec else rec.get("predicted_acc")


UNIFORM_SENSITIVITY = 0.5  # fisher_guided=False: neutral (no Fisher shift), equal for every layer and block


class Evaluator(Protocol):
    """What the search needs from the model side (it never sees the model itself)."""

    baseline_accuracy: float  # validation accuracy of the fp32 model, %
    proxy_cap: float | None  # the largest drop proxy_drop returns (saturation), None if it has none

    def proxy_drop(self, layers: dict[str, LayerPolicy]) -> float:
        """Cold-start accuracy-drop proxy: 20 * logit MSE on a calibration batch, capped at ``proxy_cap`` (points)."""

    def real_accuracy(self, layers: dict[str, LayerPolicy]) -> float:
        """Lower the policy, fine-tune briefly (QAT), return validation accuracy in % (expensive)."""

    def predict_bytes(self, layers: dict[str, LayerPolicy]) -> float | None:
        """Predicted ONNX file size in bytes, None if unknown."""

    def predict_latency_ms(self, layers: dict[str, LayerPolicy]) -> float | None:
        """Predicted ONNX Runtime latency in ms, None if unknown."""


class FidelityEvaluator(Evaluator, Protocol):
    """An evaluator whose real evaluation can fine-tune longer: ``real_accuracy(layers, fidelity=f)`` (and
    ``real_accuracies(batch, fidelity=f)`` when it has that) fine-tunes ``2**f`` times as long, for ``f`` up to
    ``max_fidelity``. The engine passes ``fidelity`` only to evaluators that declare ``max_fidelity > 0``."""

    max_fidelity: int


class BatchEvaluator(Evaluator, Protocol):
    """An evaluator that scores many policies at once (possibly in parallel); the engine uses these when present."""

    def real_accuracies(self, batch: Sequence[dict[str, LayerPolicy]]) -> Iterator[tuple[float, float]]:
        """``(real accuracy %, seconds it took)`` of each policy, yielded in ``batch``'s order."""

    def proxy_drops(self, batch: Sequence[dict[str, LayerPolicy]]) -> list[float]:
        """:meth:`Evaluator.proxy_drop` of each policy, in ``batch``'s order."""


class _OnProxyLine:
    """A surrogate fitted as a correction to the proxy line (``SearchConfig.surrogate_prior="proxy"``): it
    predicts the same way, from each policy's proxy drop (memoised by the search) mapped by the line."""

    def __init__(self, sur: Surrogate, line: ProxyLine, drops: Callable[[Sequence[Layers]], list[float]]):
        self.sur, self.line, self.drops = sur, line, drops

    def predict(self, policies: Sequence[Layers]) -> tuple[np.ndarray, np.ndarray]:
        return self.sur.predict(policies, prior=self.line(self.drops(policies)))


@dataclass(frozen=True)
class _Planned:
    """One real evaluation a phase plans: the policy, why it was chosen, the screening's prediction and the
    surrogate's own (the same unless the proxy screened)."""

    layers: Layers
    kind: str
    pred: float | None = None
    std: float | None = None
    surrogate: float | None = None


@dataclass
class SearchResult:
    """The winner (best really evaluated policy meeting the budget) and how the search got there."""

    layers: dict[str, LayerPolicy]
    accuracy: float  # its real accuracy, %
    effective_ratio: float
    n_real_evals: int
    wall_s: float
    surrogate_spearman: float | None  # rank correlation of pre-training predictions with real accuracy
    history: list[dict] = field(default_factory=list)  # one record per real evaluation (as in search.jsonl)
    cycles: list[dict] = field(default_factory=list)  # per active-learning cycle: how its candidates were screened
    allocation: dict[str, dict] = field(default_factory=dict)  # last cycle's HLA decision per block

    def policy(self, name: str = "hirelc-search") -> Policy:
        return Policy.from_layers(self.layers, name)


def run_search(
    specs: list[LayerSpec],
    sensitivity: Mapping[str, Mapping[str, float]] | None,
    evaluator: Evaluator,
    config: SearchConfig,
    budget: Budget,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Search a per-layer policy; ``sensitivity`` is :func:`fisher_sensitivity`'s output (None: uniform).

    Writes ``search.jsonl`` (one line per real evaluation) and ``search_state.pt`` into ``run_dir`` when
    given; ``resume=True`` continues from the state file if there is one.
    """
    check_budget_feasible(specs, config, budget, evaluator.predict_bytes, evaluator.predict_latency_ms)
    search = _Search(specs, sensitivity, evaluator, config, budget, Path(run_dir) if run_dir else None)
    if resume:
        search.load()
    else:
        search.start_fresh()
    return search.run(progress)


def _prepare_sensitivity(
    specs: list[LayerSpec], sensitivity: Mapping[str, Mapping[str, float]] | None, fisher_guided: bool
) -> tuple[dict[str, float], dict[str, float]]:
    if sensitivity is None or not fisher_guided:
        return ({s.name: UNIFORM_SENSITIVITY for s in specs}, {s.block: UNIFORM_SENSITIVITY for s in specs})
    layer, block = sensitivity.get("layer", {}), sensitivity.get("block", {})
    return (
        {s.name: float(layer.get(s.name, 0.0)) for s in specs},
        {s.block: float(block.get(s.block, 0.0)) for s in specs},
    )


class _Search:
    """One search's mutable state; ``run_search`` is its only user."""

    def __init__(
        self, specs: list[LayerSpec], sensitivity: Mapping[str, Mapping[str, float]] | None, evaluator: Evaluator,
        config: SearchConfig, budget: Budget, run_dir: Path | None,
    ):
        self.specs, self.ev, self.config, self.budget, self.run_dir = specs, evaluator, config, budget, run_dir
        self.layer_sens, self.block_sens = _prepare_sensitivity(specs, sensitivity, config.fisher_guided)
        self.blocks = blocks_of(specs)
        self.base = Constraints.from_config(config)
        self.records: list[dict] = []  # JSON records, one per real evaluation
        self.layers: list[Layers] = []  # the same evaluations as LayerPolicies
        self.phase = 0  # phases completed (0: nothing, 1: warm-up done, c + 1: cycle c done)
        self.wall_offset = 0.0
        self.surrogate_state: dict | None = None  # {"phase": p, "weights": ...}
        self.allocation: Allocation = {}
        self._proxy: dict[tuple, float] = {}
        self.cycle_stats: dict[int, dict] = {}  # phase -> screening figures (see cycle())
        # fine-tune doublings the evaluator allows (0: it has no such knob), and the ones in use now
        self.max_fidelity = min(config.fidelity_doublings, int(getattr(evaluator, "max_fidelity", 0) or 0))
        self.fidelity = 0
        self._t0 = time.perf_counter()
        self._bar = None
        self._threads = torch.get_num_threads()

    # ---- state -------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        # cycles may grow on resume: phases are seeded independently of how many follow
        config = dataclasses.replace(self.config, cycles=0)
        identity = {"config": repr(config), "budget": repr(self.budget), "layers": [s.name for s in self.specs]}
        if self.budget.int2_storage:
            identity["int2_storage"] = True
        return identity

    def start_fresh(self) -> None:
        """Forget any earlier search in ``run_dir`` (its state file and log)."""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / SEARCH_STATE).unlink(missing_ok=True)
            atomic_write_text(self.run_dir / SEARCH_LOG, "")

    def load(self) -> None:
        path = self.run_dir / SEARCH_STATE if self.run_dir else None
        if path is None or not path.is_file():
            return self.start_fresh()
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # any unreadable file is the same user-facing problem
            raise HirelcError(f"search state {path} is unreadable ({type(e).__name__}); delete it or run without "
                              "--resume") from None
        if state.get("version") != STATE_VERSION or state.get("identity") != self._identity():
            raise HirelcError(f"search state {path} belongs to a different search (config, budget or model differ); "
                              "delete it or run without --resume")
        self.records = state["records"]
        self.layers = [{n: LayerPolicy.from_dict(d) for n, d in r["policy"].items()} for r in self.records]
        self.phase, self.wall_offset = state["phase"], state["wall_s"]
        self.surrogate_state = state["surrogate"]
        self.allocation = {b: BlockAllocation.from_dict(a) for b, a in state["allocation"].items()}
        self.cycle_stats = {int(c["cycle"]): c for c in state.get("cycles", [])}
        # the length in use is the longest any result was scored at (a doubling is saved with its first result)
        self.fidelity = max((r.get("fidelity", 0) for r in self.records), default=0)
        atomic_write_text(self.run_dir / SEARCH_LOG, "".join(json.dumps(r) + "\n" for r in self.records))

    def save(self) -> None:
        if self.run_dir is None:
            return
        state = {"version": STATE_VERSION, "identity": self._identity(), "records": self.records, "phase": self.phase,
                 "wall_s": self.wall(), "surrogate": self.surrogate_state,
                 "allocation": {b: a.to_dict() for b, a in self.allocation.items()},
                 "cycles": [self.cycle_stats[c] for c in sorted(self.cycle_stats)]}
        atomic_torch_save(state, self.run_dir / SEARCH_STATE)

    def wall(self) -> float:
        """Seconds the search has taken, resumed parts included; evaluations an evaluator took from a cache count
        what they cost when they ran (its ``saved_seconds``), so searches that share one stay comparable in time."""
        return self.wall_offset + time.perf_counter() - self._t0 + getattr(self.ev, "saved_seconds", 0.0)

    # ---- budget and predictions ----------------------------------------------------------------------------
    def proxy_drop(self, layers: Layers) -> float:
        """The evaluator's cold-start proxy, memoised, run with the caller's thread count (RL runs on one; an
        evaluator that pins its own count, as ``RealEvaluator`` does, keeps it).

        Agents compose one block's choice with the incumbent elsewhere; the whole-policy masks (tied keeps,
        group sizes that another block's pruning stopped dividing) are applied here, before anything is lowered.
        """
        layers = share_group_keeps(self.specs, layers)
        key = policy_key(self.specs, layers)
        if key not in self._proxy:
            with torch_threads(self._threads):
                self._proxy[key] = float(self.ev.proxy_drop(layers))
        return self._proxy[key]

    def proxy_drops(self, batch: Sequence[Layers]) -> list[float]:
        """:meth:`proxy_drop` of many policies: those not memoised go to the evaluator's ``proxy_drops`` at once
        when it has one (which may spread them over workers), else one by one."""
        masked = [share_group_keeps(self.specs, lay) for lay in batch]
        missing: dict[tuple, Layers] = {}
        for lay in masked:
            key = policy_key(self.specs, lay)
            if key not in self._proxy:
                missing.setdefault(key, lay)
        many = getattr(self.ev, "proxy_drops", None)
        if missing and many is not None:
            with torch_threads(self._threads):
                values = many(list(missing.values()))
            self._proxy.update({k: float(v) for k, v in zip(missing, values, strict=True)})
        return [self.proxy_drop(lay) for lay in masked]

    def meets_budget(self, layers: Layers) -> bool:
        b = self.budget
        if b.target_ratio is not None and effective_ratio(self.specs, layers) < b.target_ratio * (1 - 1e-9):
            return False
        if b.max_size_bytes is not None:
            if predicted_bytes(self.specs, layers, self.ev.predict_bytes) > b.max_size_bytes:
                return False
        if b.max_latency_ms is not None:
            lat = self.ev.predict_latency_ms(layers)
            return lat is not None and lat <= b.max_latency_ms
        return True

    def uniform_meeting_budget(self) -> Layers:
        """The mildest (largest storage) uniform policy that meets the budget: the warm-up's safe anchor."""
        grid = uniform_grid(self.specs, self.config)
        ok = [p for p in grid if self.meets_budget(p)]
        if ok:
            return max(ok, key=lambda p: storage_fraction(self.specs, p))
        lay = self.repair(grid[0], self._base_constraints())
        if not self.meets_budget(lay):
            raise HirelcError(f"no policy in the action space meets all of the budget {self.budget}")
        return lay

    def incumbent(self, before_phase: int) -> Layers:
        best = self.best(before_phase)
        return self.layers[best] if best is not None else self.uniform_meeting_budget()

    def current(self, i: int) -> bool:
        """Whether real evaluation ``i`` ran at the fine-tune length in use (only those compete)."""
        return self.records[i].get("fidelity", 0) == self.fidelity

    def best(self, before_phase: int | None = None) -> int | None:
        idx = [i for i, r in enumerate(self.records) if self.current(i)
               and r["meets_budget"] and (before_phase is None or r["cycle"] < before_phase)]
        return max(idx, key=lambda i: (self.records[i]["real_acc"], -i)) if idx else None

    # ---- real evaluation -----------------------------------------------------------------------------------
    def real_evals(self, cycle: int, plan: Sequence[_Planned]) -> None:
        """Really evaluate a phase's plan (each policy once per phase) and commit every result in the plan's order.

        Policies this phase evaluated (at the fidelity in use) before an interruption are skipped. The evaluator
        gets the rest at once (see :class:`BatchEvaluator`); each result is logged (search.jsonl) and checkpointed
        as soon as it and every result before it in the plan are in, so a killed search loses at most what was
        still running.
        """
        done = {policy_key(self.specs, self.layers[i]) for i, r in enumerate(self.records)
                if r["cycle"] == cycle and self.current(i)}
        todo: list[_Planned] = []
        for p in plan:
            layers = share_group_keeps(self.specs, p.layers)  # whole-policy masks (tied keeps, group sizes)
            key = policy_key(self.specs, layers)
            if key not in done:
                done.add(key)
                todo.append(dataclasses.replace(p, layers=layers))
        if not todo:
            return
        results = self._real_accuracies([p.layers for p in todo])
        for p, (acc, eval_s) in zip(todo, results, strict=True):
            self._commit(cycle, p, float(acc), float(eval_s))

    def _real_accuracies(self, batch: list[Layers]) -> Iterator[tuple[float, float]]:
        kw = {"fidelity": self.fidelity} if self.max_fidelity > 0 else {}
        many = getattr(self.ev, "real_accuracies", None)
        if many is not None:
            return iter(many(batch, **kw))
        return self._one_by_one(batch, kw)

    def _one_by_one(self, batch: list[Layers], kw: dict) -> Iterator[tuple[float, float]]:
        for layers in batch:  # lazily: each result is committed before the next evaluation starts
            t = time.perf_counter()
            acc = float(self.ev.real_accuracy(layers, **kw))
            yield acc, time.perf_counter() - t

    def _commit(self, cycle: int, p: _Planned, acc: float, eval_s: float) -> None:
        layers = p.layers
        proxy = self.proxy_drop(layers)
        size, lat = self.ev.predict_bytes(layers), self.ev.predict_latency_ms(layers)
        storage = policy_storage(self.specs, layers)
        rec = {
            "cycle": cycle, "kind": p.kind, "policy": {n: lp.to_dict() for n, lp in layers.items()},
            "predicted_acc": p.pred, "predicted_std": p.std, "surrogate_acc": p.surrogate, "proxy_drop": proxy,
            "real_acc": acc,
            "effective_ratio": storage["effective_ratio"], "storage_bytes": storage["storage_bits"] / 8,
            "predicted_bytes": None if size is None else float(size),
            "predicted_latency_ms": None if lat is None else float(lat), "meets_budget": self.meets_budget(layers),
            "wall_s": self.wall(), "eval_s": eval_s, "fidelity": self.fidelity,
        }
        self.records.append(rec)
        self.layers.append(layers)
        if self.run_dir is not None:
            with open(self.run_dir / SEARCH_LOG, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.save()
        self._progress(1)

    def _progress(self, n: int) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        b = self.best()
        if b is not None:
            r = self.records[b]
            self._bar.set_postfix(best_acc=f"{r['real_acc']:.2f}", ratio=f"{r['effective_ratio']:.2f}x")

    # ---- phases --------------------------------------------------------------------------------------------
    def run(self, progress: bool) -> SearchResult:
        c = self.config
        total = (c.warmup_real_evals + c.cycles * c.real_evals_per_cycle
                 + sum(r.get("fidelity", 0) < self.fidelity for r in self.records))  # warm-ups scored again
        with tqdm(total=total, disable=not progress, desc="search", unit="eval") as bar:
            self._bar = bar
            self._progress(len(self.records))
            if self.phase == 0:
                self.warmup()
                self.phase = 1
                self.save()
            for cycle in range(self.phase, c.cycles + 1):
                self.cycle(cycle)
                self.phase = cycle + 1
                self.save()
            self._bar = None
        return self.result()

    def warmup(self) -> None:
        rng = np.random.default_rng([self.config.seed, 0])
        anchor = self.uniform_meeting_budget()
        plan = [_Planned(anchor, "warmup-uniform")]
        n_random, pool = self.config.warmup_real_evals - 1, self.config.warmup_pool
        screen: dict = {}
        if pool > 0 and n_random > 0:
            # the proxy ranks a pool of random feasible policies; the best-ranked go to a real evaluation
            drawn = self.random_feasible(pool, [self.config.seed, 0, 5], {policy_key(self.specs, anchor)}, 20 * pool)
            picks, screen = self.proxy_best(drawn, n_random)
            plan += [_Planned(lay, "warmup-screened") for lay in picks]
        else:
            for _ in range(n_random):
                # repaired into the budget in every mode: a warm-up outside it teaches the surrogate about policies
                # the search may not return, and spends a real evaluation on one (the same warm-up for every mode)
                lay = self.repair(random_policy(self.specs, rng, self.base), self._base_constraints())
                plan.append(_Planned(lay, "warmup-random"))
        # Each level's decision depends only on that level's results, so a resumed warm-up re-derives it.
        # A single warm-up evaluation (nothing to rank, as with no cycles to follow) is not scored again.
        levels = self.max_fidelity if len(plan) > 1 else 0
        restored = self.fidelity  # a resumed warm-up: the bar already counts the levels up to this one
        doubled: list[str] = []
        for level in range(levels + 1):
            self.fidelity = level
            self.real_evals(0, plan)
            scored = [r for i, r in enumerate(self.records) if r["cycle"] == 0 and self.current(i)]
            feasible = [r for r in scored if r["meets_budget"]]
            # judged on the policies the search could return (all of them, where none meets the budget)
            why = self.unseparated([r["real_acc"] for r in feasible or scored])
            if why is None or level == levels:
                break
            doubled.append(why)
            if self._bar is not None and level + 1 > restored:
                self._bar.total += len(plan)
                self._bar.refresh()
        warm = [r for i, r in enumerate(self.records) if r["cycle"] == 0 and self.current(i)]
        self.cycle_stats[0] = {"cycle": 0, "screened_by": "warm-up", "candidates": len(plan),
                               "feasible": sum(r["meets_budget"] for r in warm),
                               "real_evals": sum(r["cycle"] == 0 for r in self.records), "proxy_saturated": None,
                               "fidelity": self.fidelity, "fidelity_doubled_because": doubled,
                               # None: the fine-tune could not be lengthened, so separation was not asked
                               "separated": (why is None) if levels > 0 else None}
        if screen:  # a screened warm-up: how many the proxy weighed (the anchor besides), and what it said
            self.cycle_stats[0].update(screened_by="warm-up (random pool screened by the proxy)",
                                       candidates=1 + screen.pop("pool"), **screen)

    def proxy_rank(self, pool: Sequence[Layers]) -> tuple[list[int], dict]:
        """Indices of ``pool`` by proxy drop, smallest first, and the screening's figures: the range of the drops
        and whether the proxy saturated on them. A saturated proxy (every drop at its cap, or all alike) cannot
        rank: it is reported, and the milder policies (more storage: more left to fine-tune) go first instead of
        an arbitrary order, as they do between equal drops."""
        drops = np.array(self.proxy_drops(pool))  # one batch, maybe spread over workers
        mild = np.array([storage_fraction(self.specs, c) for c in pool])
        order = [int(i) for i in np.lexsort((-mild, drops))]
        return order, {"proxy_drop": [float(drops.min()), float(drops.max())], "proxy_saturated": self.saturated(drops)}

    def proxy_best(self, pool: Sequence[Layers], n: int) -> tuple[list[Layers], dict]:
        """The ``n`` policies of ``pool`` the proxy ranks best (:meth:`proxy_rank`), and the screening's figures
        with the pool's size."""
        if not pool:
            return [], {"pool": 0, "proxy_drop": None, "proxy_saturated": None}
        order, figures = self.proxy_rank(pool)
        return [pool[i] for i in order[:n]], {"pool": len(pool), **figures}

    def saturated(self, drops: np.ndarray) -> bool:
        """Whether the proxy cannot rank these drops: every one at its cap, or all alike."""
        cap = getattr(self.ev, "proxy_cap", None)
        return bool(len(drops) > 1 and ((cap is not None and drops.min() >= cap - 1e-9)
                                        or drops.max() - drops.min() <= 1e-9))

    def unseparated(self, accs: Sequence[float]) -> str | None:
        """Why these real scores cannot tell candidates apart (the fine-tune is too short), or None if they can."""
        c, base = self.config, float(self.ev.baseline_accuracy)
        best, worst = max(accs), min(accs)
        if base - best > c.fidelity_gap:
            return f"the best scored {best:.1f} %, {base - best:.1f} points under the baseline's {base:.1f} %"
        if len(accs) > 1 and best - worst < c.fidelity_spread and base - best > c.fidelity_spread:
            return (f"all {len(accs)} scored within {best - worst:.2f} points of one another "
                    f"({worst:.1f}-{best:.1f} %)")
        return None

    def _base_constraints(self) -> dict[str, Constraints]:
        return {b: self.base for b in self.blocks}

    def evaluated_before(self, phase: int) -> set:
        """The policy keys of every real evaluation of the phases before ``phase``."""
        return {policy_key(self.specs, self.layers[i]) for i, r in enumerate(self.records) if r["cycle"] < phase}

    def random_cycle(self, phase: int) -> None:
        """Random search: fresh random policies, repaired into the budget, none evaluated twice; with
        ``random_candidates`` a pool that many strong, of which the proxy's best are evaluated."""
        done = self.evaluated_before(phase)
        n, pool = self.config.real_evals_per_cycle, self.config.random_candidates
        if pool > 0:
            drawn = self.random_feasible(pool, [self.config.seed, phase, 3], done, 20 * pool)
            picks, screen = self.proxy_best(drawn, n)
            plan = [_Planned(lay, "random-screened") for lay in picks]
            self.cycle_stats[phase] = {"cycle": phase, "screened_by": "proxy (random pool)",
                                       "candidates": screen.pop("pool"), "feasible": len(drawn),
                                       "real_evals": len(plan), **screen}
        else:
            drawn = self.random_feasible(n, [self.config.seed, phase, 3], done, 50 * n)
            plan = [_Planned(lay, "random") for lay in drawn]
            self.cycle_stats[phase] = {"cycle": phase, "screened_by": "none (random)", "candidates": len(plan),
                                       "feasible": len(plan), "real_evals": len(plan), "proxy_saturated": None}
        self.real_evals(phase, plan)  # skips what this phase evaluated before an interruption

    def flat_allocation(self) -> Allocation:
        """No high level: every block gets the global target as its level and the whole action space."""
        target = target_fraction(self.specs, self.budget, self.config)
        mid = len(self.config.levels) // 2
        a = BlockAllocation(level=target, level_index=mid, strategy=Strategy.BOTH, min_bits=min(self.base.bits))
        return {b: a for b in self.blocks}

    def surrogate_for(self, phase: int) -> Surrogate | None:
        """The surrogate trained on all real results of earlier phases (None: the proxy shapes rewards)."""
        prev = [i for i, r in enumerate(self.records) if r["cycle"] < phase and self.current(i)]
        if not self.config.use_surrogate or len(prev) < self.config.min_surrogate_points:
            return None
        sur = Surrogate(self.specs, self.layer_sens, self.config.surrogate_members, seed=self.config.seed)
        acc = [self.records[i]["real_acc"] for i in prev]
        line = prior = None
        if self.config.surrogate_prior == "proxy":  # the proxy's drops of the same results: a function of them
            drops = [self.records[i]["proxy_drop"] for i in prev]
            line = ProxyLine(drops, acc)
            prior = line(drops)
        if self.surrogate_state and self.surrogate_state["phase"] == phase:
            sur.load_state_dict(self.surrogate_state["weights"])
        else:
            sur.fit([self.layers[i] for i in prev], acc, prior=prior)
            self.surrogate_state = {"phase": phase, "weights": sur.state_dict()}
            self.save()
        return sur if line is None else _OnProxyLine(sur, line, self.proxy_drops)

    def drop_predictor(self, sur: Surrogate | None) -> Callable[[Layers], float]:
        if sur is None:
            return self.proxy_drop
        cache: dict[tuple, float] = {}
        base = float(self.ev.baseline_accuracy)

        def predict(layers: Layers) -> float:
            key = policy_key(self.specs, layers)
            if key not in cache:
                cache[key] = base - float(sur.predict([layers])[0][0])
            return cache[key]

        return predict

    def cycle(self, phase: int) -> None:
        cfg = self.config
        if cfg.mode == "random":
            return self.random_cycle(phase)
        with single_thread():  # everything but the evaluator's calls is tiny-MLP work
            sur = self.surrogate_for(phase)
            predict_drop = self.drop_predictor(sur)
            incumbent = self.incumbent(phase)
            if cfg.mode == "flat":  # one agent sees every layer; no allocation, no ensemble
                self.allocation = self.flat_allocation()
                sens = float(np.mean(list(self.block_sens.values())))
                flat_cfg = dataclasses.replace(cfg, ensemble=False)
                proposals = {"all": propose_block(self.specs, next(iter(self.allocation.values())), sens, incumbent,
                                                  predict_drop, flat_cfg, phase, 0)}
            else:
                self.allocation = allocate(self.specs, self.block_sens, self.budget, cfg, predict_drop, phase)
                proposals = {
                    b: propose_block(sb, self.allocation[b], self.block_sens[b], incumbent, predict_drop, cfg, phase,
                                     i)
                    for i, (b, sb) in enumerate(self.blocks.items())
                }
            cands, assembled = self.candidates(proposals, phase)
            n_random = 0
            if cfg.random_candidates:
                taken = self.evaluated_before(phase) | {policy_key(self.specs, c) for c in cands}
                extra = self.random_candidates(phase, taken)
                cands, n_random = cands + extra, len(extra)
            mean, std = sur.predict(cands) if sur is not None and cands else (None, None)
        stats = {"cycle": phase, "screened_by": "surrogate" if sur is not None else "proxy",
                 "candidates": assembled, "feasible": len(cands), "real_evals": 0, "proxy_saturated": None}
        if cfg.random_candidates:
            stats["random_candidates"] = n_random  # of the feasible ones: random policies beside the agents'
        self.cycle_stats[phase] = stats
        if not cands:
            return
        n_prom = math.ceil(cfg.real_evals_per_cycle / 2)
        sur_mean = mean
        if mean is not None and cfg.screening == "proxy":
            calibrated = self.calibrated_proxy(cands, stats)
            if calibrated is not None:  # the proxy, mapped to accuracy, ranks; the surrogate's spread picks the rest
                mean = calibrated
                stats["screened_by"] = "proxy calibrated on real results (uncertainty: surrogate)"
        if mean is not None:
            prom = list(np.argsort(-mean, kind="stable")[:n_prom])
            rest = [i for i in np.argsort(-std, kind="stable") if i not in prom]
            stats["predicted_acc"] = [float(mean.min()), float(mean.max())]
        else:
            order, figures = self.proxy_rank(cands)
            stats.update(figures)
            prom = order[:n_prom]
            rest = [i for i in np.random.default_rng([cfg.seed, phase, 2]).permutation(len(cands)) if i not in prom]
        n_unc = cfg.real_evals_per_cycle - n_prom
        chosen = [(i, "promising") for i in prom] + [(i, "uncertain") for i in rest[:n_unc]]
        stats["real_evals"] = len(chosen)
        self.real_evals(phase, [_Planned(cands[i], kind, None if mean is None else float(mean[i]),
                                         None if std is None else float(std[i]),
                                         None if sur_mean is None else float(sur_mean[i])) for i, kind in chosen])

    def calibrated_proxy(self, cands: Sequence[Layers], stats: dict) -> np.ndarray | None:
        """Predicted accuracy (%) of each candidate from its proxy drop, by a line fitted to the real results at
        the fine-tune length in use (accuracy falling with the drop); None when the proxy cannot rank these
        candidates (saturated or alike) or the real results show no such fall."""
        drops = np.array(self.proxy_drops(cands))
        stats["proxy_drop"] = [float(drops.min()), float(drops.max())]
        stats["proxy_saturated"] = self.saturated(drops)
        seen = [(r["proxy_drop"], r["real_acc"]) for i, r in enumerate(self.records)
                if self.current(i) and r.get("proxy_drop") is not None]
        if stats["proxy_saturated"] or len(seen) < 2:
            return None
        line = ProxyLine(*zip(*seen, strict=True))
        if line.slope >= 0:  # a proxy that does not track real accuracy here says nothing: the surrogate ranks
            return None
        return line(drops)

    def candidates(self, proposals: Mapping[str, BlockProposal], phase: int) -> tuple[list[Layers], int]:
        """Distinct, budget-meeting, not yet evaluated candidates (votes first, then combinations and mutations),
        and how many were put together to find them."""
        cfg, rng = self.config, np.random.default_rng([self.config.seed, phase, 1])
        block_c = {b: self.base.narrowed(a.min_bits, a.strategy) for b, a in self.allocation.items()}
        done = self.evaluated_before(phase)
        out: list[Layers] = []
        seen: set[tuple] = set()
        assembled = 0  # candidates put together (before dropping repeats, evaluated and infeasible ones)
        for attempt in range(20 * max(1, cfg.candidates_per_cycle)):
            if len(out) >= cfg.candidates_per_cycle:
                break
            assembled += 1
            lay: Layers = {}
            for prop in proposals.values():
                lay.update(prop.voted if attempt == 0 else prop.options[rng.integers(len(prop.options))])
            if attempt > 0 and policy_key(self.specs, lay) in seen:
                lay = self.mutate(lay, rng, block_c)
            key = policy_key(self.specs, lay)
            if key in seen:
                continue
            seen.add(key)
            lay = self.repair(lay, block_c)
            key = policy_key(self.specs, lay)
            if key not in done and self.meets_budget(lay) and all(policy_key(self.specs, o) != key for o in out):
                out.append(lay)
        return out, assembled

    def random_candidates(self, phase: int, taken: set) -> list[Layers]:
        """``config.random_candidates`` random policies repaired into the budget, none in ``taken`` (evaluated
        before, or already a candidate), for the cycle's screening to weigh beside the agents' proposals."""
        n = self.config.random_candidates
        return self.random_feasible(n, [self.config.seed, phase, 4], taken, 20 * n)

    def random_feasible(self, n: int, seed: list[int], taken: set, tries: int) -> list[Layers]:
        """Up to ``n`` distinct random policies repaired into the budget and not in ``taken`` (which they join),
        from ``tries`` draws of the generator seeded with ``seed``."""
        rng, out = np.random.default_rng(seed), []
        for _ in range(tries):
            if len(out) >= n:
                break
            lay = self.repair(random_policy(self.specs, rng, self.base), self._base_constraints())
            key = policy_key(self.specs, lay)
            if key not in taken and self.meets_budget(lay):
                taken.add(key)
                out.append(lay)
        return out

    def mutate(self, layers: Layers, rng: np.random.Generator, block_c: Mapping[str, Constraints]) -> Layers:
        """Re-draw one random axis of one random layer among its valid levels."""
        s = self.specs[int(rng.integers(len(self.specs)))]
        c = block_c[s.block]
        action = encode(s, layers[s.name], c)
        axis = int(rng.integers(len(action)))
        action[axis] = rng.choice(np.flatnonzero(valid_mask(s, c)[axis]))
        return share_group_keeps(self.specs, {**layers, s.name: decode(s, action, c)})

    def repair(self, layers: Layers, block_c: Mapping[str, Constraints]) -> Layers:
        """Bring a candidate inside the budget: first within its blocks' HLA constraints, then the whole space.

        With a latency budget the latency is fixed first, by moves that lower the predicted latency (pruning,
        coarser scales: fewer bits can make a layer slower); then storage, by moves that keep it in budget.
        With ``fill_budget`` a candidate inside the budget then spends what is left of it (:func:`loosen`,
        within its blocks' constraints).
        """
        lay = self._into_budget(layers, block_c)
        if self.config.fill_budget and self.meets_budget(lay):
            lay = loosen(self.specs, lay, block_c, self.layer_sens, self.meets_budget)
        return lay

    def _into_budget(self, layers: Layers, block_c: Mapping[str, Constraints]) -> Layers:
        if self.meets_budget(layers):
            return layers
        lay, fits = layers, None
        if self.budget.max_latency_ms is not None:
            def latency(p: Layers) -> float:
                v = self.ev.predict_latency_ms(p)
                return math.inf if v is None else float(v)

            def fits(p: Layers) -> bool:
                return latency(p) <= self.budget.max_latency_ms

            for c in (block_c, self.base):
                if not fits(lay):
                    lay = tighten(self.specs, lay, c, self.layer_sens, fits, cost=latency)
            if not fits(lay):
                return lay
        for c in (block_c, self.base):
            if self.meets_budget(lay):
                break
            lay = tighten(self.specs, lay, c, self.layer_sens, self.meets_budget, allowed=fits)
        return lay

    def result(self) -> SearchResult:
        best = self.best()
        if best is None:
            raise HirelcError(f"no really evaluated policy meets the budget {self.budget}")
        pairs = [(surrogate_prediction(r), r["real_acc"]) for r in self.records
                 if surrogate_prediction(r) is not None]
        rho = spearman(*zip(*pairs, strict=True)) if len(pairs) >= 3 else float("nan")
        return SearchResult(
            layers=dict(self.layers[best]), accuracy=self.records[best]["real_acc"],
            effective_ratio=self.records[best]["effective_ratio"], n_real_evals=len(self.records), wall_s=self.wall(),
            surrogate_spearman=None if math.isnan(rho) else rho, history=[dict(r) for r in self.records],
            cycles=[dict(self.cycle_stats[c]) for c in sorted(self.cycle_stats)],
            allocation={b: a.to_dict() for b, a in self.allocation.items()},
        )

