"""`hirelc ablate` on a tiny model: variants x seeds searched, lowered, scored, summarised with mean ± std."""

from __future__ import annotations

import json

import pytest
from test_bench_cmd import TINY_SEARCH, _trained
from typer.testing import CliRunner

from hirelc.ablate import ABLATION_JSON, VARIANTS, AblateConfig, ablate, evals_to_best, mean_std
from hirelc.cli import app
from hirelc.errors import HirelcError

# One agent per level in every run keeps the four searches cheap: these tests cover the ablation machinery;
# what each switch does to the search is tested in tests/search.
# The default ORT-int8 latency budget is tested with `hirelc search` (test_pipeline); it is off here.
TINY = AblateConfig(target_ratio=6.0, seeds=(0, 1), variants=("full", "no-surrogate"), qat_epochs=0.0,
                    search_overrides={**TINY_SEARCH, "ensemble": False}, latency_budget=False)
N_EVALS = TINY_SEARCH["warmup_real_evals"] + TINY_SEARCH["real_evals_per_cycle"]


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
def ablated(tmp_path_factory):
    rd = _trained(tmp_path_factory)
    lines: list[str] = []
    return rd, ablate(rd, TINY, progress=False, echo=lines.append), lines


def test_every_variant_runs_once_per_seed_with_the_same_evaluations(ablated):
    rd, report, lines = ablated
    rows = report["runs"]
    assert [(r["variant"], r["seed"]) for r in rows] == [("full", 0), ("full", 1), ("no-surrogate", 0),
                                                         ("no-surrogate", 1)]
    for r in rows:
        assert r["real_evals"] == N_EVALS and 1 <= r["evals_to_best"] <= N_EVALS
        assert 0 <= r["final_top1"] <= 100 and r["effective_ratio"] >= 6.0
        assert (rd / "ablation" / f"{r['variant']}-seed{r['seed']}" / "model.onnx").is_file()
    assert all(not r["surrogate_points"] for r in rows if r["variant"] == "no-surrogate")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"] and "isa" in report["machine"]
    assert any("searching" in line for line in lines)


def test_summary_is_mean_and_std_over_seeds(ablated):
    _, report, _ = ablated
    for v in ("full", "no-surrogate"):
        accs = [r["final_top1"] for r in report["runs"] if r["variant"] == v]
        s = report["summary"][v]["final_top1"]
        assert s["n"] == 2 and s["mean"] == pytest.approx(sum(accs) / 2)
        assert s["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert report["surrogate"]["points"] == sum(len(r["surrogate_points"]) for r in report["runs"])


def test_outputs_are_written_and_a_finished_ablation_is_not_overwritten(ablated):
    rd, report, _ = ablated
    out = rd / "ablation"
    assert json.loads((out / ABLATION_JSON).read_text())["summary"] == report["summary"]
    md = (out / "ablation.md").read_text()
    assert "| full |" in md and "| no-surrogate |" in md and " ± " in md
    assert (out / "ablation.png").stat().st_size > 0
    before = (out / ABLATION_JSON).read_bytes()
    res = CliRunner().invoke(app, ["ablate", "-r", str(rd), "--variants", "full", "--seeds", "0"])
    assert res.exit_code == 2 and "already holds a finished ablation" in res.output
    assert (out / ABLATION_JSON).read_bytes() == before


def test_an_interrupted_ablation_reuses_finished_runs(ablated, tmp_path):
    rd, report, _ = ablated
    out = rd / "ablation"
    search = out / "full-seed0" / "search.json"
    stamp = search.stat().st_mtime_ns
    lines: list[str] = []
    # the summary gone as if the call had been killed before it: finished runs are found and not redone
    (out / ABLATION_JSON).rename(tmp_path / ABLATION_JSON)
    try:
        redo = ablate(rd, AblateConfig(**{**TINY.__dict__, "variants": ("full",), "seeds": (0,)}),
                      progress=False, echo=lines.append)
    finally:
        (tmp_path / ABLATION_JSON).replace(out / ABLATION_JSON)
    assert not any("searching" in line or "lowering" in line for line in lines)
    assert search.stat().st_mtime_ns == stamp
    assert redo["runs"][0]["final_top1"] == report["runs"][0]["final_top1"]


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path / "none")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path), "--seeds", "a,b"])
    assert res.exit_code == 2 and "--seeds must be comma-separated integers" in res.output
    res = CliRunner().invoke(app, ["ablate", "-r", str(tmp_path), "--variants", "nope"])
    assert res.exit_code == 2 and "unknown ablation variant" in res.output


# slow: four more searches; --fill-budget itself is tested in tests/search
@pytest.mark.slow
def test_fill_budget_reaches_every_runs_search(ablated, tmp_path):
    rd, report, _ = ablated
    assert report["config"]["fill_budget"] is False
    assert json.loads((rd / "ablation" / "full-seed0" / "search.json").read_text())["config"]["fill_budget"] is False
    cfg = AblateConfig(**{**TINY.__dict__, "variants": ("single-agent",), "seeds": (0,), "fill_budget": True})
    filled = ablate(rd, cfg, out_dir=tmp_path / "filled", progress=False, echo=lambda *_: None)
    search = json.loads((tmp_path / "filled" / "single-agent-seed0" / "search.json").read_text())
    assert filled["config"]["fill_budget"] is True and search["config"]["fill_budget"] is True
    assert search["config"]["ensemble"] is False  # the variant's own switch is kept beside it


def test_winners_are_fine_tuned_before_scoring_by_default():
    # calibration alone can wreck a pruned winner the search scored after a short QAT
    assert AblateConfig().qat_epochs == 0.25
    res = CliRunner().invoke(app, ["ablate", "--help"])
    assert res.exit_code == 0 and "0.25" in res.output
