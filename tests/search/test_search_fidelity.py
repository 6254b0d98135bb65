"""Adaptive fidelity: a warm-up whose real scores do not separate doubles the real evaluation's fine-tune."""

from __future__ import annotations

import json

import pytest
from search_synth import BLOCK_SENS, SENS, SyntheticEvaluator, make_specs, synthetic_accuracy

from hirelc.errors import HirelcError
from hirelc.pipeline import format_cycle
from hirelc.policy import LayerPolicy
from hirelc.runs import SEARCH_LOG
from hirelc.search import Budget, SearchConfig, run_search
from hirelc.search.front import competing, front_entries
from hirelc.studies.ablate import evals_to_best

SENSITIVITY = {"layer": SENS, "block": BLOCK_SENS}
CFG = SearchConfig(
    seed=3, cycles=2, hla_timesteps=16, lla_timesteps=32, lla_episode_len=4, candidates_per_cycle=6,
    real_evals_per_cycle=2, warmup_real_evals=5, min_surrogate_points=4, surrogate_members=3,
)
BUDGET = Budget(target_ratio=6.0)


class ShortFineTune(SyntheticEvaluator):
    """Scores like SyntheticEvaluator only after a long enough fine-tune: at fidelity 0 every candidate sits near
    85 % and alike, at 1 they are 40 points down (apart, but far under the baseline), from 2 on they are right."""

    max_fidelity = 3

    def __init__(self, specs, fail_at=None):
        super().__init__(specs, fail_at)
        self.fidelities: list[int] = []

    def real_accuracy(self, layers, fidelity=0):
        acc = super().real_accuracy(layers)
        self.fidelities.append(fidelity)
        if fidelity == 0:
            return 85.0 + 0.01 * (acc - 80)
        return acc - 40.0 if fidelity == 1 else acc


class Patient(SyntheticEvaluator):
    """Takes a fidelity but scores the same at every one (the warm-up separates at once)."""

    max_fidelity = 3

    def real_accuracy(self, layers, fidelity=0):
        assert fidelity == 0
        return super().real_accuracy(layers)


def test_an_unseparated_warm_up_doubles_the_fine_tune_until_it_separates(tmp_path):
    specs = make_specs()
    ev = ShortFineTune(specs)
    result = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, run_dir=tmp_path, progress=False)
    w = result.cycles[0]
    assert w["fidelity"] == 2 and w["separated"] is True and len(w["fidelity_doubled_because"]) == 2
    assert "within" in w["fidelity_doubled_because"][0]  # level 0: all alike
    assert "under the baseline" in w["fidelity_doubled_because"][1]  # level 1: apart but far down
    assert w["real_evals"] == 3 * CFG.warmup_real_evals  # the warm-up scored at each length, all counted
    # every later evaluation runs at the length reached
    assert ev.fidelities == [0] * 5 + [1] * 5 + [2] * 5 + [2] * (CFG.cycles * CFG.real_evals_per_cycle)
    assert result.n_real_evals == len(result.history) == 15 + 4
    assert [h["fidelity"] for h in result.history] == ev.fidelities
    # only results at the final length compete: the winner is the best of those, scored at that length
    final = [h for h in result.history if h["fidelity"] == 2 and h["meets_budget"]]
    assert result.accuracy == max(h["real_acc"] for h in final)
    assert result.accuracy == pytest.approx(synthetic_accuracy(result.layers))
    logged = [json.loads(x) for x in (tmp_path / SEARCH_LOG).read_text().splitlines()]
    assert [x["fidelity"] for x in logged] == ev.fidelities
    assert competing(result.history) == list(range(10, 19))
    front = {e["eval"] for e in front_entries(result.history)}
    assert front and front <= set(range(11, 20))
    assert evals_to_best(result.history) > 10
    line = format_cycle(w)
    assert line.count("fine-tune doubled") == 2 and "not separated" not in line


def test_the_doublings_are_capped_and_a_still_unseparated_warm_up_is_reported():
    specs = make_specs()
    ev = ShortFineTune(specs)
    cfg = SearchConfig(**{**CFG.__dict__, "fidelity_doublings": 1, "cycles": 1})
    result = run_search(specs, SENSITIVITY, ev, cfg, BUDGET, progress=False)
    w = result.cycles[0]
    assert w["fidelity"] == 1 and w["separated"] is False and len(w["fidelity_doubled_because"]) == 1
    assert set(ev.fidelities[10:]) == {1}
    assert "still not separated at the longest fine-tune" in format_cycle(w)


def test_a_separated_warm_up_keeps_the_short_fine_tune_and_the_same_search():
    specs = make_specs()
    plain = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), CFG, BUDGET, progress=False)
    adaptive = run_search(specs, SENSITIVITY, Patient(specs), CFG, BUDGET, progress=False)
    assert adaptive.cycles[0]["fidelity"] == 0 and adaptive.cycles[0]["fidelity_doubled_because"] == []
    assert adaptive.layers == plain.layers and adaptive.n_real_evals == plain.n_real_evals
    assert [h["policy"] for h in adaptive.history] == [h["policy"] for h in plain.history]


def test_turning_it_off_never_asks_for_a_longer_fine_tune():
    specs = make_specs()
    ev = ShortFineTune(specs)
    cfg = SearchConfig(**{**CFG.__dict__, "fidelity_doublings": 0, "cycles": 1})
    result = run_search(specs, SENSITIVITY, ev, cfg, BUDGET, progress=False)
    assert set(ev.fidelities) == {0} and result.cycles[0]["separated"] is None  # not asked
    assert "not separated" not in format_cycle(result.cycles[0])


def test_a_search_killed_while_the_warm_up_is_scored_again_resumes_to_the_same_policy(tmp_path):
    specs = make_specs()
    whole = run_search(specs, SENSITIVITY, ShortFineTune(specs), CFG, BUDGET, run_dir=tmp_path / "a",
                       progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies at the 8th real evaluation: the warm-up's second length
        run_search(specs, SENSITIVITY, ShortFineTune(specs, fail_at=8), CFG, BUDGET, run_dir=tmp_path / "b",
                   progress=False)
    ev = ShortFineTune(specs)
    resumed = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, run_dir=tmp_path / "b", resume=True, progress=False)
    assert ev.fidelities == [1] * 3 + [2] * 5 + [2] * 4  # only what was left, at the lengths it was due at
    assert resumed.layers == whole.layers and resumed.cycles == whole.cycles
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in whole.history]


def test_a_search_killed_after_the_doublings_resumes_at_the_length_reached(tmp_path):
    specs = make_specs()
    whole = run_search(specs, SENSITIVITY, ShortFineTune(specs), CFG, BUDGET, run_dir=tmp_path / "a",
                       progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies at the 17th real evaluation: cycle 1's second
        run_search(specs, SENSITIVITY, ShortFineTune(specs, fail_at=17), CFG, BUDGET, run_dir=tmp_path / "b",
                   progress=False)
    ev = ShortFineTune(specs)
    resumed = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, run_dir=tmp_path / "b", resume=True, progress=False)
    assert ev.fidelities == [2] * 3
    assert resumed.layers == whole.layers and resumed.accuracy == whole.accuracy
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in whole.history]


@pytest.mark.parametrize("field, value", [("fidelity_doublings", -1), ("fidelity_gap", 0.0),
                                          ("fidelity_spread", -0.1)])
def test_bad_fidelity_settings_are_refused(field, value):
    with pytest.raises(HirelcError, match="fidelity"):
        SearchConfig(**{field: value})


class FarFromBudget(SyntheticEvaluator):
    """Within the budget every candidate scores 30 points under the baseline after a short fine-tune; policies
    outside it (more bytes than the budget allows) score close to it."""

    max_fidelity = 3

    def __init__(self, specs, limit: float):
        super().__init__(specs)
        self.limit = limit

    def real_accuracy(self, layers, fidelity=0):
        acc = super().real_accuracy(layers)
        if fidelity == 0 and self.predict_bytes(layers) <= self.limit:
            return acc - 30.0
        return acc


def test_the_fine_tune_is_judged_on_warm_ups_inside_the_budget(tmp_path, monkeypatch):
    """An unrepairable warm-up point outside the budget that scores well must not hide that every feasible one is
    far under the baseline: the decision to double reads the feasible scores."""
    from hirelc.search import engine

    specs = make_specs()
    probe = SyntheticEvaluator(specs)
    limit = probe.predict_bytes({s.name: LayerPolicy(bits=None) for s in specs}) / BUDGET.target_ratio
    ev = FarFromBudget(specs, limit)
    real_repair = engine._Search.repair

    def not_in_the_warm_up(self, layers, cons):  # the warm-up's random points stay as drawn (most outside)
        return layers if self.phase == 0 else real_repair(self, layers, cons)

    monkeypatch.setattr(engine._Search, "repair", not_in_the_warm_up)
    result = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, run_dir=tmp_path, progress=False)
    warm0 = [h for h in result.history if h["cycle"] == 0 and h["fidelity"] == 0]
    outside = [h for h in warm0 if not h["meets_budget"]]
    assert outside and max(h["real_acc"] for h in outside) > max(h["real_acc"] for h in warm0 if h["meets_budget"])
    assert result.cycles[0]["fidelity"] >= 1
    assert "under the baseline" in result.cycles[0]["fidelity_doubled_because"][0]
