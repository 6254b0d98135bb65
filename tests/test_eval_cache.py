"""Real evaluations shared between searches (an ablation's variants of one seed): taken, not redone, and timed."""

from __future__ import annotations

import json

import pytest

from hirelc.evaluate import EvalCache
from hirelc.pipeline import search_stage
from hirelc.policy import get_policy

LAYERS = {"conv": get_policy("w4").default, "fc": get_policy("int8").default}


def test_an_entry_is_found_only_for_the_same_identity_policy_and_fine_tune_length(tmp_path):
    cache = EvalCache(tmp_path / "c", {"seed": 0})
    key = cache.key(LAYERS, 0)
    assert cache.get(key) is None
    cache.put(key, 81.5, 12.25)
    assert cache.get(key) == (81.5, 12.25)
    assert EvalCache(tmp_path / "c", {"seed": 0}).get(key) == (81.5, 12.25)  # another process, same folder
    assert cache.key(dict(reversed(list(LAYERS.items()))), 0) == key  # the layers' order does not matter
    others = [cache.key(LAYERS, 1), cache.key({**LAYERS, "fc": get_policy("w4").default}, 0),
              EvalCache(tmp_path / "c", {"seed": 1}).key(LAYERS, 0)]
    assert len({key, *others}) == 4
    # an entry that cannot be trusted is a miss (evaluated again and rewritten), never a result
    path = tmp_path / "c" / f"{key}.json"
    for bad in ("{not json", json.dumps({"real_acc": "x", "eval_s": 1.0}), json.dumps({"real_acc": 80.0}),
                json.dumps({"real_acc": 80.0, "eval_s": -1.0}), '{"real_acc": Infinity, "eval_s": 1.0}', "[]"):
        path.write_text(bad)
        assert cache.get(key) is None, bad


def test_a_search_sharing_a_cache_takes_every_evaluation_and_counts_its_time(tiny_baseline, copy_run, tiny_search,
                                                                             tmp_path):
    shared = tmp_path / "shared"
    first = search_stage(copy_run(tiny_baseline, "a"), target_ratio=6.0, overrides=tiny_search, progress=False,
                         latency_budget=False, eval_cache=shared)
    assert first["cached_real_evals"] == 0 and first["cached_eval_s"] == 0.0
    assert len(list(shared.glob("*.json"))) == first["n_real_evals"]
    rd = copy_run(tiny_baseline, "b")
    again = search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False,
                         eval_cache=shared)
    a = [json.loads(x) for x in (tmp_path / "a" / "search.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (rd / "search.jsonl").read_text().splitlines()]
    # the same search from the same cache: every evaluation taken, the same results, each with its first cost
    assert again["cached_real_evals"] == again["n_real_evals"] == first["n_real_evals"]
    assert [r["real_acc"] for r in b] == [r["real_acc"] for r in a] and again["best_acc"] == first["best_acc"]
    assert [r["eval_s"] for r in b] == pytest.approx([r["eval_s"] for r in a])
    assert again["cached_eval_s"] == pytest.approx(sum(r["eval_s"] for r in a))
    assert again["wall_s"] >= again["cached_eval_s"]  # the clock counts the work as if done
