"""The search's Pareto front: which real evaluations are on it, how a pick chooses, and a corrupt front.json."""

from __future__ import annotations

import json

import pytest

from hirelc.errors import HirelcError
from hirelc.options import check_pick
from hirelc.policy import LayerPolicy
from hirelc.search.front import check_front, format_front, front_entries, front_report, pick, picked_policy

W8 = LayerPolicy(bits=8).to_dict()
W4 = LayerPolicy(bits=4).to_dict()


def rec(acc, nbytes, lat, ok=True, policy=None):
    return {"cycle": 1, "kind": "promising", "policy": {"conv": policy or W8}, "real_acc": acc,
            "effective_ratio": 4.0, "storage_bytes": nbytes, "predicted_bytes": nbytes,
            "predicted_latency_ms": lat, "meets_budget": ok}


HISTORY = [
    rec(80.0, 1000, 2.0),            # 1: on the front (most accurate)
    rec(79.0, 1200, 2.5),            # 2: dominated by 1 on every axis
    rec(78.0, 600, 2.2, policy=W4),  # 3: smaller than 1: on the front
    rec(77.0, 900, 1.0),             # 4: fastest: on the front
    rec(90.0, 100, 0.5, ok=False),   # 5: would dominate everything, but is outside the budget
    rec(76.0, 600, 2.2),             # 6: dominated by 3
    rec(80.0, 1000, 2.0),            # 7: equal to 1: kept beside it
]


def test_the_front_holds_the_undominated_evaluations_within_the_budget():
    entries = front_entries(HISTORY, predict_b1=lambda layers: 0.25 if layers["conv"].bits == 4 else 0.5)
    assert [e["eval"] for e in entries] == [3, 4, 1, 7]  # fewest bytes first; ties by accuracy, then evaluation
    assert [e["eval"] for e in entries if e["winner"]] == [1]  # the search's winner: first of the most accurate
    e3 = entries[0]
    assert e3["latency_ms"] == {"1": 0.25, "8": 2.2} and e3["bytes"] == 600 and e3["policy"] == {"conv": W4}
    # without latency predictions the front is accuracy against bytes alone
    no_lat = [{**h, "predicted_latency_ms": None} for h in HISTORY]
    assert [e["eval"] for e in front_entries(no_lat)] == [3, 1, 7]
    assert all(e["latency_ms"] == {"1": None, "8": None} for e in front_entries(no_lat))
    assert front_entries([rec(50.0, 10, 1.0, ok=False)]) == []


def test_picks_choose_by_accuracy_bytes_latency_or_evaluation():
    entries = front_entries(HISTORY)
    assert pick(entries, "accurate")["eval"] == 1
    assert pick(entries, "smallest")["eval"] == 3
    assert pick(entries, "fastest")["eval"] == 4
    assert pick(entries, "7")["eval"] == 7
    with pytest.raises(HirelcError, match="real evaluation 2 is not on the front .*3, 4, 1, 7"):
        pick(entries, "2")
    with pytest.raises(HirelcError, match="--pick 'best'"):
        pick(entries, "best")
    with pytest.raises(HirelcError, match="--pick '²'"):  # a digit int() cannot read is a user error too
        pick(entries, "²")
    with pytest.raises(HirelcError, match="front is empty"):
        pick([], "accurate")
    no_lat = front_entries([{**h, "predicted_latency_ms": None} for h in HISTORY])
    with pytest.raises(HirelcError, match="no latency predictions"):
        pick(no_lat, "fastest")
    p = picked_policy(pick(entries, "3"))
    assert p.name == "front-eval3" and p.for_layer("conv") == LayerPolicy(bits=4)


@pytest.mark.parametrize("value", ["accurate", "smallest", "fastest", "1", "12", None])
def test_check_pick_accepts_names_and_evaluation_numbers(value):
    check_pick(value)


@pytest.mark.parametrize("value", ["0", "-1", "best", "1.5", "", "²", "١"])
def test_check_pick_rejects_anything_else(value):
    with pytest.raises(HirelcError, match="--pick"):
        check_pick(value)


def test_report_round_trips_through_json_and_the_check():
    rep = front_report(HISTORY, {"target_ratio": 4.0}, fp32_bytes=4000.0)
    assert rep["real_evals"] == 7 and rep["in_budget"] == 6 and rep["budget"] == {"target_ratio": 4.0}
    assert [e["file_ratio"] for e in rep["entries"]] == [4000 / 600, 4000 / 900, 4.0, 4.0]
    loaded = json.loads(json.dumps(rep))
    assert check_front(loaded, "front.json") == rep["entries"]
    table = format_front(rep["entries"])
    assert "Pareto front (4 policies" in table and "6.67x" in table
    assert [ln.split()[0] for ln in table.splitlines()[3:]] == ["3", "4", "1", "7"]
    assert table.splitlines()[5].endswith("*")  # the winner's row


@pytest.mark.parametrize("corrupt,needle", [
    ([], "version-1 front"),
    ({"version": 1, "entries": [{"eval": "1"}]}, "integer 'eval'"),
    ({"version": 1, "entries": [{"eval": 1, "real_acc": float("nan"), "bytes": 1}]}, "'real_acc' is not a finite"),
    ({"version": 1, "entries": [{"eval": 1, "real_acc": 1, "bytes": 1, "latency_ms": {"8": "x"}, "policy": {}}]},
     "'latency_ms'"),
    ({"version": 1, "entries": [{"eval": 1, "real_acc": 1, "bytes": 1, "latency_ms": {}, "policy": {}}]},
     "no policy"),
    ({"version": 1, "entries": [{"eval": 1, "real_acc": 1, "bytes": 1, "latency_ms": {},
                                 "policy": {"conv": {"bits": 99}}}]}, "invalid layer policy"),
])
def test_a_corrupt_front_is_named(corrupt, needle):
    with pytest.raises(HirelcError, match=needle) as e:
        check_front(corrupt, "run/front.json")
    assert "run/front.json is corrupt" in str(e.value)
