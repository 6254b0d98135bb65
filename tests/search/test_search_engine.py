import dataclasses
import json
import math
import shutil

import pytest
import torch
from scipy.stats import spearmanr
from search_synth import BLOCK_SENS, SENS, SyntheticEvaluator, make_specs

from hirelc.errors import HirelcError
from hirelc.pipeline import format_cycle
from hirelc.policy import LayerPolicy, check_layer
from hirelc.runs import SEARCH_LOG, SEARCH_STATE
from hirelc.search import Budget, SearchConfig, run_search
from hirelc.search.engine import LOG_KEYS

SENSITIVITY = {"layer": SENS, "block": BLOCK_SENS}
CFG = SearchConfig(
    seed=3, cycles=2, hla_timesteps=16, lla_timesteps=32, lla_episode_len=4, candidates_per_cycle=6,
    real_evals_per_cycle=2, warmup_real_evals=5, min_surrogate_points=4, surrogate_members=3,
)
BUDGET = Budget(target_ratio=6.0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted search, shared by the tests that only read it."""
    specs = make_specs()
    ev = SyntheticEvaluator(specs)
    run_dir = tmp_path_factory.mktemp("full")
    result = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, run_dir=run_dir, progress=False)
    return specs, ev, run_dir, result


def test_impossible_budget_fails_before_any_evaluation(tmp_path):
    specs = make_specs()
    ev = SyntheticEvaluator(specs)
    with pytest.raises(HirelcError, match="target ratio 500x is impossible"):
        run_search(specs, SENSITIVITY, ev, CFG, Budget(target_ratio=500), run_dir=tmp_path, progress=False)
    assert ev.real_calls == ev.proxy_calls == 0 and not (tmp_path / SEARCH_STATE).exists()


def test_winner_is_really_evaluated_and_meets_the_budget(full_run):
    specs, ev, _, result = full_run
    assert result.n_real_evals == ev.real_calls == CFG.warmup_real_evals + CFG.cycles * CFG.real_evals_per_cycle
    assert result.effective_ratio >= BUDGET.target_ratio
    winner = [h for h in result.history if h["policy"] == {n: lp.to_dict() for n, lp in result.layers.items()}]
    assert winner and winner[0]["real_acc"] == result.accuracy
    assert result.accuracy == max(h["real_acc"] for h in result.history if h["meets_budget"])
    for h in result.history:  # every evaluated policy is one the export can represent
        assert all(check_layer(s, LayerPolicy.from_dict(h["policy"][s.name])) is None for s in specs)
    assert set(result.allocation) == {"stem", "blocks.0", "blocks.1", "head"}
    assert [h["predicted_acc"] is None for h in result.history] == [True] * 5 + [False] * 4
    assert all(h["surrogate_acc"] == h["predicted_acc"] for h in result.history)  # the surrogate screened
    # four predictions made before their real evaluation (at least three are needed): their rank correlation
    pred, real = zip(*[(h["predicted_acc"], h["real_acc"]) for h in result.history[5:]], strict=True)
    rho = spearmanr(pred, real).statistic
    assert math.isfinite(rho) and isinstance(result.surrogate_spearman, float)
    assert -1 <= result.surrogate_spearman <= 1 and result.surrogate_spearman == pytest.approx(rho)
    assert result.policy().resolve(specs) == result.layers


def test_search_log_has_one_line_per_real_evaluation(full_run):
    _, ev, run_dir, result = full_run
    lines = [json.loads(x) for x in (run_dir / SEARCH_LOG).read_text().splitlines()]
    assert len(lines) == ev.real_calls == len(result.history)
    assert all(tuple(x) == LOG_KEYS for x in lines)
    assert [x["cycle"] for x in lines] == [0] * 5 + [1, 1, 2, 2]
    assert [x["kind"] for x in lines[5:7]] == ["promising", "uncertain"]
    assert all(x["wall_s"] >= 0 and x["eval_s"] >= 0 and x["proxy_drop"] >= 0 for x in lines)


def test_resume_after_an_interruption_gives_the_same_policy(full_run, tmp_path):
    specs, _, _, result = full_run
    with pytest.raises(KeyboardInterrupt):  # dies at the 7th real evaluation (inside cycle 1)
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs, fail_at=7), CFG, BUDGET, tmp_path, progress=False)
    assert len((tmp_path / SEARCH_LOG).read_text().splitlines()) == 6
    ev = SyntheticEvaluator(specs)
    resumed = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, tmp_path, resume=True, progress=False)
    assert ev.real_calls == 3  # only what was left
    assert resumed.layers == result.layers and resumed.accuracy == result.accuracy
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in result.history]
    assert len((tmp_path / SEARCH_LOG).read_text().splitlines()) == 9


def test_resume_extends_a_finished_search_by_more_cycles(full_run, tmp_path):
    specs, _, _, result = full_run
    one = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), _cycles(1), BUDGET, tmp_path, progress=False)
    assert one.n_real_evals == 7
    # two predictions only: too few for a rank correlation, even though two distinct points would rank perfectly
    assert sum(h["predicted_acc"] is not None for h in one.history) == 2 and one.surrogate_spearman is None
    ev = SyntheticEvaluator(specs)
    two = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, tmp_path, resume=True, progress=False)
    assert ev.real_calls == 2 and two.layers == result.layers
    assert two.surrogate_spearman == result.surrogate_spearman  # over the resumed search's whole history
    assert [h["policy"] for h in two.history] == [h["policy"] for h in result.history]


def test_resume_refuses_the_state_of_a_different_search(full_run, tmp_path):
    specs, _, run_dir, _ = full_run
    shutil.copy(run_dir / SEARCH_STATE, tmp_path / SEARCH_STATE)
    other = SearchConfig(**{**CFG.__dict__, "seed": 4})
    with pytest.raises(HirelcError, match="different search"):
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), other, BUDGET, tmp_path, resume=True, progress=False)


def test_ablations_and_a_size_budget_run(tmp_path):
    specs = make_specs()
    ev = SyntheticEvaluator(specs)
    cfg = SearchConfig(**{**_cycles(1).__dict__, "ensemble": False, "use_surrogate": False, "fisher_guided": False})
    budget = Budget(max_size_bytes=int(ev.predict_bytes({s.name: LayerPolicy(5) for s in specs})))
    result = run_search(specs, None, ev, cfg, budget, run_dir=None, progress=False)
    assert ev.predict_bytes(result.layers) <= budget.max_size_bytes
    assert result.surrogate_spearman is None and all(h["predicted_acc"] is None for h in result.history)
    assert result.n_real_evals == 7


def _cycles(n: int) -> SearchConfig:
    return SearchConfig(**{**CFG.__dict__, "cycles": n})


@pytest.mark.parametrize("mode", ["flat", "random"])
def test_baseline_modes_spend_the_same_real_evaluations_inside_the_budget(mode, full_run):
    specs, _, _, hier = full_run
    ev = SyntheticEvaluator(specs)
    cfg = SearchConfig(**{**CFG.__dict__, "mode": mode})
    result = run_search(specs, SENSITIVITY, ev, cfg, BUDGET, run_dir=None, progress=False)
    assert result.n_real_evals == ev.real_calls == hier.n_real_evals
    assert result.effective_ratio >= BUDGET.target_ratio
    kinds = [h["kind"] for h in result.history]
    if mode == "random":  # no agent, no surrogate: every evaluation after the uniform anchor is random
        assert kinds[0] == "warmup-uniform" and set(kinds[1:]) == {"warmup-random", "random"}
        assert all(h["meets_budget"] for h in result.history)
        assert all(h["predicted_acc"] is None for h in result.history)
    else:  # one agent over all layers: every block gets the same (global) level
        assert {tuple(sorted(a.items())) for a in result.allocation.values()} == {
            tuple(sorted(next(iter(result.allocation.values())).items()))}
        assert "promising" in kinds


def test_random_mode_resumes_to_the_same_policy(tmp_path):
    specs = make_specs()
    cfg = SearchConfig(**{**CFG.__dict__, "mode": "random"})
    whole = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, None, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs, fail_at=7), cfg, BUDGET, tmp_path, progress=False)
    resumed = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, tmp_path, resume=True,
                         progress=False)
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in whole.history]


def test_unknown_search_mode_is_refused():
    with pytest.raises(HirelcError, match="unknown search mode 'haq'"):
        SearchConfig(mode="haq")


class _SlowLowBitsEvaluator(SyntheticEvaluator):
    """Predicts latency the way ONNX Runtime behaves on CPUs here: 2..4-bit layers run slower than 8-bit ones."""

    def predict_latency_ms(self, layers):
        from hirelc.cost import group_keeps, kept_shape

        keeps = group_keeps(self.specs, layers)
        total = 0.0
        for s in self.specs:
            out, inn = kept_shape(s, layers, keeps)
            slow = 2.0 if (layers[s.name].bits or 32) <= 4 else 1.0
            total += slow * out * inn / (s.out_features * s.in_features)
        return total


def test_a_latency_budget_search_explores_beyond_its_anchor():
    """Candidates are repaired into a latency budget by pruning (not by cutting bits, which slows layers)."""
    specs = make_specs()
    ev = _SlowLowBitsEvaluator(specs)
    full = ev.predict_latency_ms({s.name: LayerPolicy(8) for s in specs})
    budget = Budget(target_ratio=6.0, max_latency_ms=0.6 * full)
    result = run_search(specs, SENSITIVITY, ev, CFG, budget, run_dir=None, progress=False)
    assert ev.predict_latency_ms(result.layers) <= budget.max_latency_ms
    meeting = [h for h in result.history if h["meets_budget"]]
    assert len(meeting) >= 4, [h["kind"] for h in meeting]
    assert {h["kind"] for h in meeting} - {"warmup-uniform"}


def test_the_proxy_sees_whole_policy_masks():
    """A block's per-group choice whose input another block prunes to 48 channels reaches the evaluator
    (which lowers it) as per-channel, not as a policy the lowering would refuse."""
    from hirelc.policy import PerChannel, PerGroup
    from hirelc.search.engine import _Search

    specs = make_specs()
    seen = []

    class Recording(SyntheticEvaluator):
        def proxy_drop(self, layers):
            seen.append(layers)
            return super().proxy_drop(layers)

    search = _Search(specs, SENSITIVITY, Recording(specs), CFG, BUDGET, None)
    layers = {s.name: LayerPolicy(8) for s in specs}
    layers["blocks.0.pw"] = LayerPolicy(8, keep_ratio=0.5)  # 96 -> 48 outputs, read by blocks.0.proj
    layers["blocks.0.proj"] = LayerPolicy(4, granularity=PerGroup(32))
    search.proxy_drop(layers)
    assert seen[-1]["blocks.0.proj"].granularity == PerChannel()


def test_fill_budget_spends_a_latency_budget_the_repair_overshot():
    """Repairing into a latency budget prunes candidates past what the storage budget needs; with fill_budget
    they get the leftover back (lower effective ratio, still inside both budgets) and evaluate better."""
    import dataclasses

    specs = make_specs()
    seen = {}
    for fill in (False, True):
        ev = _SlowLowBitsEvaluator(specs)
        full = ev.predict_latency_ms({s.name: LayerPolicy(8) for s in specs})
        budget = Budget(target_ratio=6.0, max_latency_ms=0.6 * full)
        result = run_search(specs, SENSITIVITY, ev, dataclasses.replace(CFG, fill_budget=fill), budget,
                            run_dir=None, progress=False)
        cycles = [h for h in result.history if h["cycle"] > 0]
        assert cycles and all(h["meets_budget"] for h in cycles)
        seen[fill] = (sum(h["effective_ratio"] for h in cycles) / len(cycles), max(h["real_acc"] for h in cycles))
    assert seen[True][0] < seen[False][0] and seen[True][1] > seen[False][1], seen


def test_every_cycle_reports_how_its_candidates_were_screened(full_run):
    _, _, _, result = full_run
    by_cycle = {c["cycle"]: c for c in result.cycles}
    assert sorted(by_cycle) == [0, 1, 2]
    for c in range(3):  # the real evaluations each phase logged
        assert by_cycle[c]["real_evals"] == sum(h["cycle"] == c for h in result.history)
    assert by_cycle[0]["feasible"] == sum(h["meets_budget"] for h in result.history if h["cycle"] == 0)
    for c in (1, 2):
        s = by_cycle[c]
        assert s["screened_by"] == "surrogate"  # four warm-up points train it from cycle 1 on
        assert s["candidates"] >= s["feasible"] >= s["real_evals"] >= 1
        assert s["feasible"] <= CFG.candidates_per_cycle and s["predicted_acc"][0] <= s["predicted_acc"][1]


class _RuinedProxy(SyntheticEvaluator):
    """A proxy at its cap for every policy: it says nothing about which candidate is better."""

    def proxy_drop(self, layers):
        self.proxy_calls += 1
        return 50.0


def test_a_saturated_proxy_is_reported_and_milder_candidates_go_first():
    from hirelc.search.space import storage_fraction

    specs = make_specs()
    cfg = SearchConfig(**{**CFG.__dict__, "use_surrogate": False, "cycles": 1})
    result = run_search(specs, SENSITIVITY, _RuinedProxy(specs), cfg, BUDGET, progress=False)
    (c1,) = [c for c in result.cycles if c["cycle"] == 1]
    assert c1["screened_by"] == "proxy" and c1["proxy_saturated"] is True and c1["proxy_drop"] == [50.0, 50.0]
    promising = [h for h in result.history if h["kind"] == "promising"]
    assert promising
    mildest_evaluated = max(storage_fraction(specs, {n: LayerPolicy.from_dict(d) for n, d in h["policy"].items()})
                            for h in result.history if h["cycle"] == 1)
    first = {n: LayerPolicy.from_dict(d) for n, d in promising[0]["policy"].items()}
    assert storage_fraction(specs, first) == pytest.approx(mildest_evaluated)
    honest = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, progress=False)
    assert [c["proxy_saturated"] for c in honest.cycles if c["cycle"] == 1] == [False]


def test_screening_figures_survive_a_resume(full_run, tmp_path):
    specs, _, _, result = full_run
    with pytest.raises(KeyboardInterrupt):
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs, fail_at=8), CFG, BUDGET, tmp_path, progress=False)
    resumed = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), CFG, BUDGET, tmp_path, resume=True,
                         progress=False)
    assert resumed.cycles == result.cycles


def test_every_mode_spends_the_same_warm_up_inside_the_budget(full_run):
    """The warm-up's random policies are repaired into the budget in every mode, so the hierarchical, flat and
    random searches start from the same feasible points and differ only in what they propose afterwards."""
    specs, _, _, hier = full_run
    warm = {"full": [h for h in hier.history if h["cycle"] == 0]}
    for mode in ("random", "flat"):
        cfg = SearchConfig(**{**CFG.__dict__, "mode": mode})
        result = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, run_dir=None, progress=False)
        warm[mode] = [h for h in result.history if h["cycle"] == 0]
    for mode, rows in warm.items():
        assert len(rows) == CFG.warmup_real_evals and all(h["meets_budget"] for h in rows), mode
        assert [h["policy"] for h in rows] == [h["policy"] for h in warm["full"]], mode
        assert [h["real_acc"] for h in rows] == [h["real_acc"] for h in warm["full"]], mode


def test_proxy_screening_ranks_candidates_by_the_proxy_fitted_to_real_results(full_run):
    """With ``screening="proxy"`` the cycle's candidates are predicted from their proxy drop by a line fitted to
    the real results. The synthetic proxy is an exact linear function of real accuracy, so the line recovers
    every candidate's accuracy; the surrogate (the default), trained on a few points, does not."""
    specs, _, _, default = full_run
    cfg = SearchConfig(**{**CFG.__dict__, "screening": "proxy"})
    result = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, run_dir=None, progress=False)
    for c in (c for c in result.cycles if c["cycle"] > 0):
        assert c["screened_by"].startswith("proxy calibrated") and c["proxy_saturated"] is False
    screened = [h for h in result.history if h["cycle"] > 0]
    assert screened and all(h["predicted_acc"] == pytest.approx(h["real_acc"], abs=1e-6) for h in screened)
    assert all(h["predicted_std"] is not None for h in screened)  # the surrogate still gives the uncertainty
    # the surrogate's own predictions are logged beside the proxy's, and its rank correlation is computed on them
    assert all(h["surrogate_acc"] is not None for h in screened)
    assert any(h["surrogate_acc"] != pytest.approx(h["predicted_acc"], abs=1e-6) for h in screened)
    own = spearmanr([h["surrogate_acc"] for h in screened], [h["real_acc"] for h in screened]).statistic
    assert result.surrogate_spearman == pytest.approx(own)
    by_default = [h for h in default.history if h["cycle"] > 0]
    assert not all(h["predicted_acc"] == pytest.approx(h["real_acc"], abs=1e-6) for h in by_default)
    # the warm-up is shared: the screening changes only what follows it
    assert [h["policy"] for h in result.history if h["cycle"] == 0] == [
        h["policy"] for h in default.history if h["cycle"] == 0]


class _BackwardProxy(SyntheticEvaluator):
    """A proxy that predicts larger drops for the more accurate policies: real results contradict it."""

    def proxy_drop(self, layers):
        return 40.0 - 0.5 * super().proxy_drop(layers)  # 15-40 points: under the cap, never saturated


@pytest.mark.parametrize("evaluator", [_RuinedProxy, _BackwardProxy])
def test_proxy_screening_falls_back_to_the_surrogate_when_the_proxy_cannot_rank(evaluator):
    specs = make_specs()
    cfg = SearchConfig(**{**CFG.__dict__, "screening": "proxy", "cycles": 1})
    result = run_search(specs, SENSITIVITY, evaluator(specs), cfg, BUDGET, progress=False)
    (c1,) = [c for c in result.cycles if c["cycle"] == 1]
    assert c1["screened_by"] == "surrogate"
    assert c1["proxy_saturated"] is (evaluator is _RuinedProxy)
    plain = run_search(specs, SENSITIVITY, evaluator(specs), SearchConfig(**{**cfg.__dict__, "screening": "surrogate"}),
                       BUDGET, progress=False)
    assert [h["policy"] for h in result.history] == [h["policy"] for h in plain.history]


def test_unknown_screening_is_refused():
    with pytest.raises(HirelcError, match="unknown screening 'oracle'"):
        SearchConfig(screening="oracle")


def test_random_candidates_join_each_cycles_screening():
    """``random_candidates`` adds random policies, repaired into the budget, to the agents' candidates of every
    cycle: the first cycle screens exactly that many more (the agents propose the same after the same warm-up),
    and every real evaluation stays distinct and within the budget."""
    specs = make_specs()
    base = {**CFG.__dict__, "screening": "proxy"}
    plain = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), SearchConfig(**base), BUDGET, progress=False)
    pooled = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), SearchConfig(**{**base, "random_candidates": 3}),
                        BUDGET, progress=False)
    assert plain.cycles[1]["cycle"] == pooled.cycles[1]["cycle"] == 1 and "random_candidates" not in plain.cycles[1]
    assert pooled.cycles[1]["random_candidates"] == 3
    assert pooled.cycles[1]["feasible"] == plain.cycles[1]["feasible"] + 3
    assert all(c.get("random_candidates") == 3 for c in pooled.cycles if c["cycle"] > 0)
    keys = [json.dumps(h["policy"], sort_keys=True) for h in pooled.history]
    assert len(set(keys)) == len(keys) and all(h["meets_budget"] for h in pooled.history)
    with pytest.raises(HirelcError, match="random_candidates must be >= 0"):
        SearchConfig(random_candidates=-1)


def test_a_surrogate_on_the_proxy_line_predicts_and_resumes(full_run, tmp_path):
    """surrogate_prior="proxy": every prediction the search logs comes from the surrogate corrected from the
    proxy line (here the synthetic proxy tracks accuracy, so its predictions rank the real results), and an
    interrupted search resumes to the same policies."""
    specs = make_specs()
    cfg = SearchConfig(**{**CFG.__dict__, "surrogate_prior": "proxy"})
    whole = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, None, progress=False)
    pairs = [(h["surrogate_acc"], h["real_acc"]) for h in whole.history if h["surrogate_acc"] is not None]
    assert len(pairs) >= 2 and spearmanr(*zip(*pairs, strict=True)).statistic > 0.5
    with pytest.raises(KeyboardInterrupt):
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs, fail_at=8), cfg, BUDGET, tmp_path, progress=False)
    resumed = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, tmp_path, resume=True,
                         progress=False)
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in whole.history]
    assert resumed.layers == whole.layers
    assert torch.load(tmp_path / SEARCH_STATE, weights_only=True)["surrogate"]["weights"]["with_prior"] is True


def test_a_screened_warmup_evaluates_the_proxys_best_of_its_pool(tmp_path):
    """warmup_pool: the warm-up's random evaluations are the pool's lowest proxy drops (the synthetic proxy is a
    multiple of the true damage, so they beat the plain warm-up's random draws), every one distinct and within the
    budget; the warm-up's screening figures are reported, and an interrupted search resumes to the same policies."""
    specs = make_specs()
    cfg = SearchConfig(**{**CFG.__dict__, "warmup_pool": 20, "cycles": 1})
    plain = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), dataclasses.replace(cfg, warmup_pool=0), BUDGET,
                       progress=False)
    ev = SyntheticEvaluator(specs)
    result = run_search(specs, SENSITIVITY, ev, cfg, BUDGET, run_dir=tmp_path / "a", progress=False)
    warm = [h for h in result.history if h["cycle"] == 0]
    assert [h["kind"] for h in warm] == ["warmup-uniform"] + ["warmup-screened"] * 4
    assert all(h["meets_budget"] for h in warm) and len({json.dumps(h["policy"]) for h in warm}) == 5
    c0 = result.cycles[0]
    assert c0["screened_by"].startswith("warm-up (random pool") and c0["candidates"] == 21
    assert c0["proxy_saturated"] is False and c0["proxy_drop"][0] <= min(h["proxy_drop"] for h in warm[1:])
    # the four picked have the pool's four lowest drops: none of them is worse than any policy left out
    assert max(h["proxy_drop"] for h in warm[1:]) <= c0["proxy_drop"][1]
    assert "the random ones are the proxy's best of 20 (drop" in format_cycle(c0)
    plain_warm = [h["real_acc"] for h in plain.history if h["cycle"] == 0][1:]
    assert min(h["real_acc"] for h in warm[1:]) > sorted(plain_warm)[len(plain_warm) // 2]
    with pytest.raises(KeyboardInterrupt):
        run_search(specs, SENSITIVITY, SyntheticEvaluator(specs, fail_at=3), cfg, BUDGET, tmp_path / "b",
                   progress=False)
    resumed = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, tmp_path / "b", resume=True,
                         progress=False)
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in result.history]
    with pytest.raises(HirelcError, match="warmup_pool must be >= 0"):
        SearchConfig(warmup_pool=-1)


def test_random_search_screened_by_the_proxy_evaluates_each_pools_best():
    """mode="random" with random_candidates: each cycle really evaluates the proxy's best of a pool of random
    feasible policies (kind random-screened), never one evaluated before, as many as the plain random search."""
    specs = make_specs()
    base = {**CFG.__dict__, "mode": "random"}
    plain = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), SearchConfig(**base), BUDGET, progress=False)
    cfg = SearchConfig(**{**base, "warmup_pool": 16, "random_candidates": 16})
    result = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, progress=False)
    assert result.n_real_evals == plain.n_real_evals
    assert [h["kind"] for h in result.history if h["cycle"] > 0] == ["random-screened"] * 4
    assert [c["screened_by"] for c in result.cycles[1:]] == ["proxy (random pool)"] * 2
    assert all(c["candidates"] == 16 and c["real_evals"] == 2 for c in result.cycles[1:])
    keys = [json.dumps(h["policy"], sort_keys=True) for h in result.history]
    assert len(set(keys)) == len(keys) and all(h["meets_budget"] for h in result.history)
    assert result.accuracy > plain.accuracy  # the proxy tracks the synthetic accuracy here
