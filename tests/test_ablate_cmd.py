"""`hirelc ablate` on a tiny model: variants x seeds searched, lowered, scored, summarised with mean ± std."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.pipeline import run_bundle
from hirelc.search.config import PRESETS, SearchConfig
from hirelc.search.surrogate import spearman
from hirelc.studies.ablate import (
    ABLATION_JSON,
    ABLATION_MD,
    EVAL_CACHE,
    VARIANTS,
    AblateConfig,
    _by_surrogate,
    _run_overrides,
    _search_config,
    ablate,
    evals_to_best,
    format_ablation,
    mean_std,
    paired_test,
)
from hirelc.studies.results import ablation_goals

# One agent per level in every run keeps the searches cheap: these tests cover the ablation machinery; what each
# switch does to the search is tested in tests/search. The default run ablates two variants on one seed; the slow
# test runs every variant on two seeds.
# The default ORT-int8 latency budget is tested with `hirelc search` (test_pipeline); it is off here.


@pytest.fixture(scope="module")
def tiny(tiny_search) -> AblateConfig:
    return AblateConfig(target_ratio=6.0, seeds=(0,), variants=("full", "no-surrogate"), qat_epochs=0.0,
                        search_overrides={**tiny_search, "ensemble": False}, latency_budget=False)


@pytest.fixture(scope="module")
def n_evals(tiny_search) -> int:
    return tiny_search["warmup_real_evals"] + tiny_search["real_evals_per_cycle"]


def test_evals_to_best_counts_only_evaluations_within_budget():
    hist = [{"real_acc": 70.0, "meets_budget": True}, {"real_acc": 90.0, "meets_budget": False},
            {"real_acc": 80.0, "meets_budget": True}, {"real_acc": 80.0, "meets_budget": True}]
    assert evals_to_best(hist) == 3  # the first evaluation reaching the best in-budget accuracy
    assert evals_to_best([{"real_acc": 50.0, "meets_budget": False}]) is None


def test_a_logged_evaluation_counts_as_the_surrogates_prediction_only_where_it_is():
    assert _by_surrogate({"surrogate_acc": 71.0, "predicted_acc": 74.0}, "proxy-screen")
    assert not _by_surrogate({"surrogate_acc": None, "predicted_acc": None}, "full")
    # a log from before surrogate_acc: its prediction is the surrogate's only where the surrogate screened
    assert _by_surrogate({"predicted_acc": 74.0}, "full") and _by_surrogate({"predicted_acc": 74.0}, "flat")
    assert not _by_surrogate({"predicted_acc": 74.0}, "proxy-screen")
    assert not _by_surrogate({"predicted_acc": None}, "full")


def test_mean_std_is_the_sample_statistic_and_skips_missing_values():
    assert mean_std([1.0, 3.0, None]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([None])["mean"] is None


def test_config_rejects_unknown_variants_and_repeated_seeds():
    with pytest.raises(HirelcError, match="unknown ablation variant"):
        AblateConfig(variants=("full", "no-hla"))
    with pytest.raises(HirelcError, match="distinct"):
        AblateConfig(seeds=(1, 1))
    assert set(VARIANTS) == {"full", "no-surrogate", "uniform-sensitivity", "single-agent", "random", "random-time",
                             "flat", "proxy-screen", "proxy-screen-pool", "proxy-prior", "screened-warmup",
                             "plain-warmup", "random-screened", "uniform"}
    with pytest.raises(HirelcError, match="run them together"):
        AblateConfig(variants=("random-time",))
    assert len(AblateConfig().seeds) >= 5  # a one-sided paired test over fewer seeds cannot reach p < 0.05


def test_random_search_draws_its_warm_up_unscreened_whatever_the_preset_screens():
    cfg = AblateConfig()
    pools = {v: _search_config("quick", _run_overrides(cfg, v))["warmup_pool"] for v in VARIANTS}
    assert pools["full"] == pools["screened-warmup"] == PRESETS["quick"].warmup_pool > 0  # quick screens its warm-up
    assert pools["plain-warmup"] == pools["random"] == pools["random-time"] == 0
    assert pools["flat"] == pools["single-agent"] == pools["full"]  # a switched-off part leaves the rest as shipped
    assert _search_config("standard", _run_overrides(cfg, "full"))["warmup_pool"] == 0


def test_paired_test_is_wilcoxon_signed_rank_on_the_seeds_both_ran():
    ref = {0: 80.0, 1: 81.0, 2: 82.0, 3: 79.0, 4: 80.0, 5: 90.0}
    other = {0: 79.0, 1: 80.5, 2: 81.0, 3: 78.0, 4: 79.9, 6: 10.0}  # seeds 5 and 6 are not paired
    t = paired_test(ref, other)
    assert t["seeds"] == [0, 1, 2, 3, 4] and t["n"] == 5 and t["wins"] == 5 and t["losses"] == 0
    assert t["diff"] == pytest.approx((1 + 0.5 + 1 + 1 + 0.1) / 5)
    # every paired difference positive: exact one-sided p = 1 / 2^5, two-sided twice that
    assert t["p_greater"] == pytest.approx(1 / 32) and t["p_two_sided"] == pytest.approx(1 / 16)
    worse = paired_test(other, ref)
    assert worse["wins"] == 0 and worse["losses"] == 5 and worse["p_greater"] == pytest.approx(1.0)
    mixed = paired_test({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 1.0, 2: 3.0})  # +1, -1, 0
    assert mixed["wins"] == 1 and mixed["losses"] == 1 and mixed["diff"] == pytest.approx(0.0)
    assert 0.0 < mixed["p_greater"] <= 1.0
    for same in (paired_test({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0}), paired_test({0: 5.0}, {0: 4.0})):
        assert same["p_greater"] is None and same["p_two_sided"] is None  # nothing to test


def test_goals_and_table_show_the_paired_comparison():
    def t(diff, p, n=5):
        return {"seeds": list(range(n)), "n": n, "diff": diff, "wins": n, "losses": 0, "p_greater": p,
                "p_two_sided": None if p is None else min(1.0, 2 * p)}

    stat = {"mean": 80.0, "std": 0.5, "n": 5}
    report = {"config": {"target_ratio": 10.0, "preset": "quick", "seeds": [0, 1, 2, 3, 4], "qat_epochs": 0.25},
              "created": "2026-12-02T00:00:00+00:00", "model": {"name": "resnet18"}, "baseline_test_acc": 87.0,
              "summary": {v: {m: stat for m in ("final_top1", "best_val", "effective_ratio", "real_evals",
                                                "evals_to_best", "search_wall_s")} for v in ("full", "random", "flat",
                                                                                         "uniform")},
              "paired": {"reference": "full", "metric": "final_top1",
                         "tests": {"random": t(0.7, 1 / 32), "flat": t(0.2, 1 / 32), "uniform": t(1.0, 0.3)}},
              "surrogate": {"points": 20, "spearman": 0.75}}
    goals = {g: (ok, fig) for g, ok, fig in ablation_goals(report)}
    assert goals["full ahead of random by ≥ 0.5 point ORT top-1 at p < 0.05"][0] is True
    assert goals["full ahead of flat by ≥ 0.5 point ORT top-1 at p < 0.05"][0] is False  # too small a lead
    assert goals["full ahead of uniform by ≥ 0.5 point ORT top-1 at p < 0.05"][0] is False  # not significant
    assert goals["surrogate Spearman ≥ 0.7 on unseen candidates"] == (True, "0.75 on 20 points")
    # four seeds cannot reach p < 0.05 (2^-4 = 0.0625): the goal is not comparable rather than missed
    four = {**report, "paired": {**report["paired"], "tests": {"random": t(3.0, 0.0625, n=4)}}}
    assert [ok for g, ok, _ in ablation_goals(four) if "random" in g] == [None]
    assert "With 4 paired seeds the smallest possible one-sided p is 0.062" in format_ablation(four)
    md = format_ablation(report)
    assert "p one-sided" in md and "| random | 80.00 ± 0.50 |" in md and "| +0.70 | 5 / 0 of 5 | 0.031 | 0.062 |" in md
    assert "| full |" in md and md.count("| - | - | - | - |") == 1  # the reference has no comparison with itself
    assert "logit-MSE proxy" not in md  # a report without the proxy's figures does not invent them
    assert "| winner after warm-up |" in md and "| 80.0 ± 0.5 | - | 80 ± 0 |" in md  # no runs listed: not counted
    report["runs"] = [{"variant": "random", "seed": s, "winner_after_warmup": s < 2} for s in range(5)]
    assert "| random | 80.00 ± 0.50 | 80.00 ± 0.50 | 80.00 ± 0.50 | 80.0 ± 0.5 | 80.0 ± 0.5 | 2 of 5 | 80 ± 0 |" \
        in format_ablation(report)
    report["surrogate"].update(proxy_points=20, proxy_spearman=0.81)
    assert ("Spearman 0.75 on 20 points (each predicted before the surrogate saw it). The logit-MSE proxy on the "
            "same points: Spearman 0.81 on 20.") in format_ablation(report)


@pytest.fixture(scope="module")
def ablated(tiny_baseline, copy_run_module, tiny):
    rd = copy_run_module(tiny_baseline, "ablate")
    lines: list[str] = []
    return rd, ablate(rd, tiny, progress=False, echo=lines.append), lines


def _check_runs(rd, report, n_evals, onnx_top1) -> None:
    """Every run spent the same real evaluations, met the budget, and scored its own model.onnx."""
    test = run_bundle(rd).test
    for r in report["runs"]:
        sub = rd / "ablation" / f"{r['variant']}-seed{r['seed']}"
        history = [json.loads(x) for x in (sub / "search.jsonl").read_text().splitlines()]
        expected = 1 if r["variant"] == "uniform" else n_evals  # the uniform anchor is evaluated once
        if r["variant"] == "random-time":  # as many as the full search's time held, never fewer
            expected = len(history)
            assert expected >= n_evals
        assert r["real_evals"] == expected == len(history) and r["effective_ratio"] >= 6.0
        assert r["evals_to_best"] == evals_to_best(history) and 1 <= r["evals_to_best"] <= expected
        # found by the search itself (a cycle after the warm-up) or one of the warm-up's policies
        assert r["winner_after_warmup"] is (history[r["evals_to_best"] - 1]["cycle"] > 0)
        if r["variant"] == "uniform":
            assert r["winner_after_warmup"] is False
        assert r["best_val"] == max(h["real_acc"] for h in history if h["meets_budget"])
        # the final score is the run's exported winner on the whole test split
        assert r["final_top1"] == pytest.approx(onnx_top1(sub / "model.onnx", test.x.numpy(), test.y.numpy()),
                                                abs=1e-9)
        search = json.loads((sub / "search.json").read_text())
        assert search["config"]["seed"] == r["seed"]
        for k, v in VARIANTS[r["variant"]].items():  # the variant's switch reached its search
            assert search["config"][k] == v, (r["variant"], k)
        if r["variant"] in ("no-surrogate", "random", "random-time", "uniform"):
            assert not r["surrogate_points"]
        else:  # each surrogate point is a logged (the surrogate's own prediction, real accuracy) pair
            assert r["surrogate_points"] == [[h["surrogate_acc"], h["real_acc"]] for h in history
                                             if h["surrogate_acc"] is not None]
            assert r["surrogate_points"]
            # the proxy's ranking of the same evaluations, for comparison: minus its logged drop
            assert r["proxy_points"] == [[-h["proxy_drop"], h["real_acc"]] for h in history
                                         if h["surrogate_acc"] is not None]
    # pooled over every run with a surrogate, whatever screened its candidates
    pooled = sum(len(r["surrogate_points"]) for r in report["runs"])
    assert report["surrogate"]["points"] == pooled == report["surrogate"]["proxy_points"]
    proxy = [p for r in report["runs"] for p in r["proxy_points"]]
    drops, accs = zip(*proxy, strict=True)
    if len(set(drops)) > 1 and len(set(accs)) > 1:  # the proxy's rank correlation on the pooled points
        assert report["surrogate"]["proxy_spearman"] == pytest.approx(spearman(drops, accs))
    else:  # undefined on a constant input (a tiny model's proxy can sit at its cap): recorded as null
        assert report["surrogate"]["proxy_spearman"] is None


def _check_summary(report) -> None:
    """Per variant: mean and sample standard deviation over its seeds, of every metric."""
    for v, per_metric in report["summary"].items():
        rows = [r for r in report["runs"] if r["variant"] == v]
        for m, s in per_metric.items():
            vals = [r[m] for r in rows]
            mean = sum(vals) / len(vals)
            std = (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            assert s["n"] == len(vals) and s["mean"] == pytest.approx(mean), (v, m)
            assert s["std"] == pytest.approx(std, abs=1e-12), (v, m)


def test_every_variant_runs_once_per_seed_with_the_same_evaluations(ablated, n_evals, onnx_top1):
    rd, report, lines = ablated
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("full", 0), ("no-surrogate", 0)]
    _check_runs(rd, report, n_evals, onnx_top1)
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"] and "isa" in report["machine"]
    assert sum("searching" in line for line in lines) == 2
    # the second variant of the seed takes the warm-up evaluations the first made (the study's shared cache)
    full, other = (json.loads((rd / "ablation" / f"{v}-seed0" / "search.json").read_text())
                   for v in ("full", "no-surrogate"))
    assert full["cached_real_evals"] == 0 and other["cached_real_evals"] >= 1
    assert [r["cached_real_evals"] for r in report["runs"]] == [0, other["cached_real_evals"]]
    assert any((rd / "ablation" / EVAL_CACHE).glob("*.json"))


def test_summary_is_mean_and_std_over_seeds(ablated):
    _, report, _ = ablated
    assert list(report["summary"]) == ["full", "no-surrogate"]
    _check_summary(report)
    assert report["summary"]["full"]["final_top1"] == {"mean": report["runs"][0]["final_top1"], "std": 0.0, "n": 1}


def test_the_seeds_of_a_variant_are_summarised_together(ablated, tiny, copy_run):
    """A second seed's finished run, assembled from the finished ones (so nothing is searched or lowered): the
    variant's summary is the mean and sample standard deviation of its two runs."""
    rd = copy_run(ablated[0])
    out = rd / "ablation"
    (out / ABLATION_JSON).unlink()
    seed1 = out / "full-seed1"
    shutil.copytree(out / "full-seed0", seed1)
    for name in ("model.onnx", "lower_report.json"):  # another winner in the second seed's place
        shutil.copy(out / "no-surrogate-seed0" / name, seed1 / name)
    lines: list[str] = []
    report = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("full",), "seeds": (0, 1)}), progress=False,
                    echo=lines.append)
    assert not any("searching" in line or "lowering" in line for line in lines)
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("full", 0), ("full", 1)]
    _check_summary(report)
    a, b = (r["final_top1"] for r in report["runs"])
    s = report["summary"]["full"]["final_top1"]
    assert s["n"] == 2 and s["mean"] == pytest.approx((a + b) / 2) and s["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)


@pytest.fixture(scope="module")
def ablated_all(tiny_baseline, copy_run_module, tiny):
    rd = copy_run_module(tiny_baseline, "ablate-all")
    cfg = AblateConfig(**{**tiny.__dict__, "variants": tuple(VARIANTS), "seeds": (0, 1)})
    return rd, ablate(rd, cfg, progress=False, echo=lambda *_: None)


# slow: nine searches
@pytest.mark.slow
def test_every_variant_on_two_seeds_is_summarised_with_its_spread(ablated_all, n_evals, onnx_top1):
    rd, report = ablated_all
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [(v, s) for v in VARIANTS for s in (0, 1)]
    _check_runs(rd, report, n_evals, onnx_top1)
    _check_summary(report)
    for v in VARIANTS:
        accs = [r["final_top1"] for r in report["runs"] if r["variant"] == v]
        s = report["summary"][v]["final_top1"]
        assert s["n"] == 2 and s["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    md = (rd / "ablation" / "ablation.md").read_text()
    assert all(f"| {v} |" in md for v in VARIANTS)


def test_outputs_are_written_and_a_finished_ablation_is_not_overwritten(ablated):
    rd, report, _ = ablated
    out = rd / "ablation"
    assert json.loads((out / ABLATION_JSON).read_text())["summary"] == report["summary"]
    md = (out / "ablation.md").read_text()
    assert "| full |" in md and "| no-surrogate |" in md and " ± " in md
    assert (out / "ablation.png").stat().st_size > 0
    before = (out / ABLATION_JSON).read_bytes()
    res = CliRunner().invoke(app, ["ablate", "-r", str(rd), "--variant", "full", "--seed", "0"])
    assert res.exit_code == 2 and "already holds a finished ablation" in res.output
    assert (out / ABLATION_JSON).read_bytes() == before


def test_the_uniform_baseline_is_compared_with_the_full_search_by_seed(ablated, tiny, copy_run, n_evals,
                                                                      onnx_top1):
    """The full search's run is reused; the uniform anchor is searched (one real evaluation), lowered and scored,
    and the paired comparison covers the seed both ran."""
    rd = copy_run(ablated[0])
    (rd / "ablation" / ABLATION_JSON).unlink()
    lines: list[str] = []
    report = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("full", "uniform"), "seeds": (0,)}),
                    progress=False, echo=lines.append)
    assert [line.strip() for line in lines if "searching" in line] == ["uniform seed 0: searching"]
    _check_runs(rd, report, n_evals, onnx_top1)
    hist = [json.loads(x) for x in (rd / "ablation" / "uniform-seed0" / "search.jsonl").read_text().splitlines()]
    assert [h["kind"] for h in hist] == ["warmup-uniform"]
    full, uni = (r["final_top1"] for r in report["runs"])
    t = report["paired"]["tests"]["uniform"]
    assert report["paired"]["reference"] == "full" and t["n"] == 1 and t["diff"] == pytest.approx(full - uni)
    assert t["p_greater"] is None  # one seed: no test


def test_random_search_at_equal_time_spends_the_full_searchs_wall_time(ablated, tiny, copy_run, tmp_path):
    """The count of real evaluations follows the reference run's wall time and cost per evaluation; a reference
    that spent 3.5x its mean evaluation time buys three evaluations, and never fewer than it made itself."""
    from hirelc.studies.ablate import equal_time_cycles

    ref = tmp_path / "full-seed0"
    ref.mkdir()
    # the tiny search: 2 warm-up evaluations, then 1 per cycle, 1 cycle at least
    for wall, evals, cycles in ((100.0, 3, 98), (3.5, 3, 1), (10.0, 12, 10)):
        (ref / "search.json").write_text(json.dumps({"wall_s": wall, "n_real_evals": evals, "mean_eval_s": 1.0}))
        assert equal_time_cycles(ref, tiny) == cycles, (wall, evals)
    rd = copy_run(ablated[0])
    (rd / "ablation" / ABLATION_JSON).unlink()
    full = json.loads((rd / "ablation" / "full-seed0" / "search.json").read_text())
    report = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("random-time", "full"), "seeds": (0,)}),
                    progress=False, echo=lambda *_: None)
    (row,) = [r for r in report["runs"] if r["variant"] == "random-time"]
    cycles = equal_time_cycles(rd / "ablation" / "full-seed0", AblateConfig(**tiny.__dict__))
    assert row["real_evals"] >= full["n_real_evals"]
    search_json = json.loads((rd / "ablation" / "random-time-seed0" / "search.json").read_text())
    assert search_json["config"]["mode"] == "random" and search_json["config"]["cycles"] == cycles
    assert "random-time" in report["paired"]["tests"]
    # the reference is done again and took another time: the equal-time run is searched and scored anew
    (rd / "ablation" / ABLATION_JSON).unlink()
    ref_json = rd / "ablation" / "full-seed0" / "search.json"
    ref_json.write_text(json.dumps({**json.loads(ref_json.read_text()), "wall_s": 5.0 * full["wall_s"]}))
    longer = equal_time_cycles(rd / "ablation" / "full-seed0", AblateConfig(**tiny.__dict__))
    assert longer > cycles
    said = []
    again = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("random-time", "full"), "seeds": (0,)}),
                   progress=False, echo=said.append)
    search_json = json.loads((rd / "ablation" / "random-time-seed0" / "search.json").read_text())
    assert search_json["config"]["cycles"] == longer and any("searching again" in m for m in said)
    (row2,) = [r for r in again["runs"] if r["variant"] == "random-time"]
    assert row2["real_evals"] > row["real_evals"]
    assert any("lowering the winner" in m and "random-time" in m for m in said)
    # an unchanged reference leaves the equal-time run as it is
    (rd / "ablation" / ABLATION_JSON).unlink()
    said.clear()
    ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("random-time", "full"), "seeds": (0,)}),
           progress=False, echo=said.append)
    assert not any("searching" in m or "lowering" in m for m in said)


def test_an_interrupted_ablation_reuses_finished_runs(ablated, tiny, copy_run):
    _, report, _ = ablated
    rd = copy_run(ablated[0])
    out = rd / "ablation"
    search = out / "full-seed0" / "search.json"
    stamp = search.stat().st_mtime_ns
    lines: list[str] = []
    # the summary gone as if the call had been killed before it: finished runs are found and not redone
    (out / ABLATION_JSON).unlink()
    redo = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("full",), "seeds": (0,)}),
                  progress=False, echo=lines.append)
    assert not any("searching" in line or "lowering" in line for line in lines)
    assert search.stat().st_mtime_ns == stamp
    assert redo["runs"][0]["final_top1"] == report["runs"][0]["final_top1"]


def test_an_interrupted_ablation_resumed_with_other_options_is_refused(ablated, tiny, copy_run):
    rd = copy_run(ablated[0])
    out = rd / "ablation"
    (out / ABLATION_JSON).unlink()  # interrupted before its summary
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for change in ({"qat_epochs": 1.0}, {"preset": "standard"}, {"target_ratio": 8.0}):
        cfg = AblateConfig(**{**tiny.__dict__, **change})
        with pytest.raises(HirelcError, match=f"other options \\({next(iter(change))} "):
            ablate(rd, cfg, progress=False, echo=lambda *_: None)
    res = CliRunner().invoke(app, ["ablate", "-r", str(rd), "--seed", "0", "--variant", "full", "--qat-epochs", "2"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "unfinished ablation made with other options (" in res.output and "qat_epochs" in res.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or redone
    # a folder a build with other lowering defaults started is not continued either
    kept = out / runs.STUDY_OPTIONS
    saved = kept.read_bytes()
    kept.write_text(json.dumps({**json.loads(saved), "lower.lr": 5e-4}))
    with pytest.raises(HirelcError, match=r"other options \(lower.lr 0.0005 there, 2e-05 now"):
        ablate(rd, AblateConfig(**tiny.__dict__), progress=False, echo=lambda *_: None)
    kept.write_bytes(saved)
    # other seeds or variants are not other options: the study resumes (here: with the runs it holds)
    lines: list[str] = []
    redo = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("full",)}), progress=False, echo=lines.append)
    assert [r["variant"] for r in redo["runs"]] == ["full"] and not any("searching" in x for x in lines)


def test_a_finished_run_searched_with_another_configuration_is_refused(ablated, tiny, copy_run):
    """A run folder is reused only when its search ran as this study's variant would run it now: one from a
    build with other defaults (or edited switches) is not mixed into the study."""
    rd = copy_run(ablated[0])
    out = rd / "ablation"
    (out / ABLATION_JSON).unlink()  # interrupted before its summary
    path = out / "full-seed0" / "search.json"
    search = json.loads(path.read_text())
    path.write_text(json.dumps({**search, "config": {**search["config"], "ensemble": True}}))
    with pytest.raises(HirelcError, match=r"full-seed0: searched with another configuration .*\(ensemble True there, "
                                          r"False now\)"):
        ablate(rd, tiny, progress=False, echo=lambda *_: None)
    # a record from before the screening and prior switches existed was screened by a surrogate without a prior
    legacy = {k: v for k, v in search["config"].items() if k not in ("screening", "surrogate_prior")}
    path.write_text(json.dumps({**search, "config": legacy}))
    if SearchConfig().screening == "surrogate":
        lines: list[str] = []
        ablate(rd, tiny, progress=False, echo=lines.append)
        assert not any("searching" in x for x in lines)
    else:
        with pytest.raises(HirelcError, match="screening 'surrogate' there"):
            ablate(rd, tiny, progress=False, echo=lambda *_: None)
    # and one from before the warm-up pool existed drew its warm-up unscreened, which quick's full search no
    # longer does: it is searched again, not passed off as a screened run
    (out / ABLATION_JSON).unlink(missing_ok=True)
    path.write_text(json.dumps({**search, "config": {k: v for k, v in legacy.items() if k != "warmup_pool"}}))
    assert PRESETS["quick"].warmup_pool > 0
    with pytest.raises(HirelcError, match=r"full-seed0: .*\(warmup_pool 0 there, 64 now\)"):
        ablate(rd, tiny, progress=False, echo=lambda *_: None)


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path / "none")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path), "--seed", "a"])
    assert res.exit_code == 2 and "Invalid value for '--seed'" in res.output
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path), "--variant", "nope"])
    assert res.exit_code == 2 and "'nope' is not one of" in res.output


# slow: one more search; --fill-budget itself is tested in tests/search
@pytest.mark.slow
def test_fill_budget_reaches_every_runs_search(ablated, tiny, tmp_path, copy_run):
    rd, report, _ = ablated
    assert report["config"]["fill_budget"] is False
    assert json.loads((rd / "ablation" / "full-seed0" / "search.json").read_text())["config"]["fill_budget"] is False
    cfg = AblateConfig(**{**tiny.__dict__, "variants": ("single-agent",), "seeds": (0,), "fill_budget": True})
    filled = ablate(copy_run(rd), cfg, out_dir=tmp_path / "filled", progress=False, echo=lambda *_: None)
    search = json.loads((tmp_path / "filled" / "single-agent-seed0" / "search.json").read_text())
    assert filled["config"]["fill_budget"] is True and search["config"]["fill_budget"] is True
    assert search["config"]["ensemble"] is False  # the variant's own switch is kept beside it


def test_winners_are_fine_tuned_before_scoring_by_default():
    # calibration alone can wreck a pruned winner the search scored after a short QAT
    assert AblateConfig().qat_epochs == 0.25
    res = CliRunner().invoke(app, ["ablate", "--help"])
    assert res.exit_code == 0 and "0.25" in res.output


# ---------------------------------------------------------------- a study continued from its committed report


def _earlier(ablated, copy_run, tmp_path):
    """A copy of the ablated run directory without its run folders (as in another session), and its report."""
    rd = copy_run(ablated[0])
    keep = tmp_path / "earlier" / ABLATION_JSON
    keep.parent.mkdir()
    shutil.copy(rd / "ablation" / ABLATION_JSON, keep)
    shutil.rmtree(rd / "ablation")
    return rd, keep


def test_runs_of_an_earlier_report_are_taken_instead_of_run_again(ablated, tiny, copy_run, tmp_path):
    rd, keep = _earlier(ablated, copy_run, tmp_path)
    first = json.loads(keep.read_text())
    lines: list[str] = []
    cfg = AblateConfig(**{**tiny.__dict__, "variants": ("full", "uniform"), "seeds": (0,)})
    report = ablate(rd, cfg, progress=False, echo=lines.append, reuse=[keep.parent])  # the folder names it too
    # the full run is not searched, lowered or scored again; the uniform one is run here
    assert [line.strip() for line in lines if "searching" in line] == ["uniform seed 0: searching"]
    assert any(line.strip() == f"full seed 0: reused from {keep}" for line in lines)
    assert not (rd / "ablation" / "full-seed0").exists()
    full, uni = report["runs"]
    assert full == {**first["runs"][0], "reused_from": str(keep)} and "reused_from" not in uni
    assert report["reused_from"] == [str(keep)]
    assert report["paired"]["tests"]["uniform"]["diff"] == pytest.approx(full["final_top1"] - uni["final_top1"])
    assert report["summary"]["full"]["final_top1"]["mean"] == full["final_top1"]
    # each new row records the search configuration it ran with, so a later reuse can check it
    assert uni["search_config"]["mode"] == json.loads((rd / "ablation" / "uniform-seed0" / "search.json")
                                                      .read_text())["config"]["mode"]
    # a run finished in the output folder is the one reported, not the earlier report's
    (rd / "ablation" / ABLATION_JSON).unlink()
    again = ablate(rd, AblateConfig(**{**cfg.__dict__, "variants": ("uniform",)}), progress=False,
                   echo=lambda *_: None, reuse=[keep])
    assert again["runs"] == [uni] and again["reused_from"] == []


def test_a_finished_study_is_reported_against_another_reference_without_running_anything(ablated, tiny, copy_run,
                                                                                          tmp_path):
    """--reference: the paired tests are against the variant named; its runs are the earlier report's, taken as
    they are, since the runs do not depend on the reference."""
    rd, keep = _earlier(ablated, copy_run, tmp_path)
    first = json.loads(keep.read_text())
    lines: list[str] = []
    report = ablate(rd, AblateConfig(**{**tiny.__dict__, "reference": "no-surrogate"}), progress=False,
                    echo=lines.append, reuse=[keep])
    assert not any("searching" in line for line in lines) and report["runs"] == [
        {**r, "reused_from": str(keep)} for r in first["runs"]]
    top1 = {r["variant"]: r["final_top1"] for r in report["runs"]}
    assert report["paired"]["reference"] == "no-surrogate" and set(report["paired"]["tests"]) == {"full"}
    assert report["paired"]["tests"]["full"]["diff"] == pytest.approx(top1["no-surrogate"] - top1["full"])
    assert "| no-surrogate − this (paired) |" in (rd / "ablation" / ABLATION_MD).read_text()
    with pytest.raises(HirelcError, match="unknown reference variant 'best'"):
        AblateConfig(reference="best")


def _refused(rd, cfg, keep, match):
    with pytest.raises(HirelcError, match=match):
        ablate(rd, cfg, progress=False, echo=lambda *_: None, reuse=[keep])
    assert not (rd / "ablation").exists()  # refused before anything is written


def test_a_report_of_another_study_baseline_or_machine_is_refused(ablated, tiny, copy_run, tmp_path):
    rd, keep = _earlier(ablated, copy_run, tmp_path)
    good = json.loads(keep.read_text())
    cfg = AblateConfig(**{**tiny.__dict__, "variants": ("full",), "seeds": (0,)})
    for change, match in (
            ({"config": {**good["config"], "target_ratio": 7.0}}, r"other study options \(target_ratio 7.0 there, 6.0"),
            ({"config": {**good["config"], "qat_epochs": 1.0}}, r"other study options \(qat_epochs 1.0 there"),
            # a build lowering winners or evaluations otherwise (its defaults, not the study's options)
            ({"config": {**good["config"], "lower.lr": 5e-4}}, r"other study options \(lower.lr 0.0005 there, 2e-05"),
            ({"config": {**good["config"], "evaluation.bn_batches": 0}},
             r"other study options \(evaluation.bn_batches 0 there, 8 here"),
            ({"config": {k: v for k, v in good["config"].items() if "." not in k}},
             "a build that did not record its lowering settings"),
            ({"machine": {**good["machine"], "isa": ["sse2"]}}, r"another kind of machine \(isa \['sse2'\] there"),
            ({"machine": {**good["machine"], "onnxruntime": "0.1"}}, r"another kind of machine \(onnxruntime"),
            ({"baseline_test_acc": good["baseline_test_acc"] + 1}, "made on another baseline"),
            ({"runs": [{**good["runs"][0], "final_top1": "86"}]}, "full seed 0 has no finite final_top1"),
            ({"runs": [{k: v for k, v in good["runs"][0].items() if k != "best_val"}]}, "full seed 0 lacks best_val"),
            ({"runs": [{**good["runs"][0], "surrogate_points": 3}]}, "lacks a list of surrogate_points"),
            ({"runs": [{**good["runs"][0], "search_config": {**good["runs"][0]["search_config"], "ensemble": True}}]},
             r"full seed 0 was searched with another configuration \(ensemble\)"),
            ({"runs": "x"}, "is not an ablation report")):
        keep.write_text(json.dumps({**good, **change}))
        _refused(rd, cfg, keep, match)
    keep.write_text("{not json")
    _refused(rd, cfg, keep, "ablation report")
    _refused(rd, cfg, tmp_path / "nowhere.json", "no ablation report at")
    # two reports that disagree about one run are not one study
    keep.write_text(json.dumps(good))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**good, "runs": [{**good["runs"][0], "final_top1": good["runs"][0]["final_top1"] + 1}]}))
    with pytest.raises(HirelcError, match="not the same study"):
        ablate(rd, cfg, progress=False, echo=lambda *_: None, reuse=[keep, other])
    # on the command line: exit 2, one line, nothing written
    res = CliRunner().invoke(app, ["ablate", "-r", str(rd), "--seed", "0", "--variant", "full", "--reuse",
                                   str(tmp_path / "nowhere.json")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "no ablation report at" in res.output
    assert not (rd / "ablation").exists()


def test_an_equal_time_run_needs_its_reference_searched_here(ablated, tiny, copy_run, tmp_path):
    rd, keep = _earlier(ablated, copy_run, tmp_path)
    cfg = AblateConfig(**{**tiny.__dict__, "variants": ("full", "random-time"), "seeds": (0,)})
    with pytest.raises(HirelcError, match="random-time seed 0 spends the wall time of the full run, which is reused"):
        ablate(rd, cfg, progress=False, echo=lambda *_: None, reuse=[keep])
    assert not any((rd / "ablation").glob("*-seed0"))  # nothing searched


def test_a_report_from_before_runs_kept_their_search_configuration_is_reused_on_its_options(
        ablated, tiny, copy_run, tmp_path):
    rd, keep = _earlier(ablated, copy_run, tmp_path)
    good = json.loads(keep.read_text())
    keep.write_text(json.dumps({**good, "runs": [{k: v for k, v in r.items() if k != "search_config"}
                                                 for r in good["runs"]]}))
    lines: list[str] = []
    report = ablate(rd, AblateConfig(**{**tiny.__dict__, "variants": ("full",), "seeds": (0,)}), progress=False,
                    echo=lines.append, reuse=[keep])
    assert report["runs"][0]["final_top1"] == good["runs"][0]["final_top1"]
    assert any("1 run(s) made before reports kept their search configuration" in line for line in lines)
