"""`hirelc ablate` on a tiny model: variants x seeds searched, lowered, scored, summarised with mean ± std."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.pipeline import run_bundle
from hirelc.studies.ablate import ABLATION_JSON, VARIANTS, AblateConfig, ablate, evals_to_best, mean_std

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


def test_mean_std_is_the_sample_statistic_and_skips_missing_values():
    assert mean_std([1.0, 3.0, None]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([None])["mean"] is None


def test_config_rejects_unknown_variants_and_repeated_seeds():
    with pytest.raises(HirelcError, match="unknown ablation variant"):
        AblateConfig(variants=("full", "no-hla"))
    with pytest.raises(HirelcError, match="distinct"):
        AblateConfig(seeds=(1, 1))
    assert set(VARIANTS) == {"full", "no-surrogate", "uniform-sensitivity", "single-agent"}


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
        assert r["real_evals"] == n_evals == len(history) and r["effective_ratio"] >= 6.0
        assert r["evals_to_best"] == evals_to_best(history) and 1 <= r["evals_to_best"] <= n_evals
        assert r["best_val"] == max(h["real_acc"] for h in history if h["meets_budget"])
        # the final score is the run's exported winner on the whole test split
        assert r["final_top1"] == pytest.approx(onnx_top1(sub / "model.onnx", test.x.numpy(), test.y.numpy()),
                                                abs=1e-9)
        search = json.loads((sub / "search.json").read_text())
        assert search["config"]["seed"] == r["seed"]
        for k, v in VARIANTS[r["variant"]].items():  # the variant's switch reached its search
            assert search["config"][k] == v, (r["variant"], k)
        if r["variant"] == "no-surrogate":
            assert not r["surrogate_points"]
        else:  # each surrogate point is a logged (prediction, real accuracy) pair
            assert r["surrogate_points"] == [[h["predicted_acc"], h["real_acc"]] for h in history
                                             if h["predicted_acc"] is not None]
            assert r["surrogate_points"]
    pooled = sum(len(r["surrogate_points"]) for r in report["runs"] if r["variant"] != "no-surrogate")
    assert report["surrogate"]["points"] == pooled


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


# slow: eight searches
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
