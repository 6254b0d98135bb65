"""The search's Pareto front, and how a user picks a policy from it.

The front holds the really evaluated policies within the search's budget that no other one beats on all three
things a deployer weighs at once: real (fine-tuned) validation accuracy, predicted ONNX file bytes and predicted
batch-8 latency on ONNX Runtime (the run directory's latency table). Each entry also carries the batch-1
latency predicted by a batch-1 table when one is given. ``front.json`` is plain JSON; reading it back checks
every entry, and nothing in it is ever executed.

Picks (``hirelc lower --pick`` / ``hirelc compress --pick``):

==========  ===================================================================================================
accurate    the most accurate entry: the search's winner (``policy.json``), or an as accurate one beating it
smallest    the entry with the fewest predicted bytes (ties: the more accurate)
fastest     the entry with the lowest predicted batch-8 latency (ties: the more accurate)
N           the entry of real evaluation N (1-based, the line of ``search.jsonl``)
==========  ===================================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hirelc.errors import HirelcError
from hirelc.options import PICKS
from hirelc.policy import LayerPolicy, Policy
from hirelc.report import dominates

FRONT_VERSION = 1


def _bytes(h: Mapping) -> float:
    b = h.get("predicted_bytes")
    return float(h["storage_bytes"] if b is None else b)


def _latency(h: Mapping) -> float | None:
    v = h.get("predicted_latency_ms")
    return None if v is None else float(v)


def competing(history: Sequence[Mapping]) -> list[int]:
    """Indices of the real evaluations at the search's final fine-tune length (the largest ``fidelity`` in the
    log): the ones that compete for the winner; warm-ups scored at a shorter length before it was doubled do not."""
    final = max((h.get("fidelity", 0) for h in history), default=0)
    return [i for i, h in enumerate(history) if h.get("fidelity", 0) == final]


def front_entries(history: Sequence[Mapping], predict_b1: Callable[[dict], float | None] | None = None) -> list[dict]:
    """The Pareto front of a search's real evaluations within its budget, fewest bytes first.

    ``history`` is the search log (``search.jsonl`` records); ``predict_b1`` maps a record's policy (layer name ->
    :class:`LayerPolicy`) to a predicted batch-1 latency. Latency is an objective only when every record in the
    budget has a prediction. Equal points are all kept. Only evaluations at the search's final fine-tune length
    (the largest ``fidelity`` in the log) compete, as in the search itself.
    """
    rows = [(i, history[i]) for i in competing(history) if history[i].get("meets_budget")]
    with_latency = bool(rows) and all(_latency(h) is not None for _, h in rows)

    def point(h: Mapping) -> tuple[float, ...]:
        p = (float(h["real_acc"]), -_bytes(h))
        return (*p, -_latency(h)) if with_latency else p

    pts = {i: point(h) for i, h in rows}
    keep = [(i, h) for i, h in rows if not any(dominates(pts[j], pts[i]) for j, _ in rows)]
    winner = max(rows, key=lambda r: (r[1]["real_acc"], -r[0]))[0] if rows else None
    out = []
    for i, h in sorted(keep, key=lambda r: (_bytes(r[1]), -r[1]["real_acc"], r[0])):
        layers = {n: LayerPolicy.from_dict(d) for n, d in h["policy"].items()}
        b1 = predict_b1(layers) if predict_b1 is not None else None
        out.append({
            "eval": i + 1, "cycle": h["cycle"], "kind": h["kind"], "real_acc": float(h["real_acc"]),
            "bytes": _bytes(h), "effective_ratio": float(h["effective_ratio"]),
            "latency_ms": {"1": None if b1 is None else float(b1), "8": _latency(h)},
            "winner": i == winner, "policy": dict(h["policy"]),
        })
    return out


def front_report(history: Sequence[Mapping], budget: Mapping, predict_b1=None, fp32_bytes: float | None = None) -> dict:
    """``front.json``'s content: the entries (:func:`front_entries`), how many evaluations they came from, the
    budget, and what the figures are."""
    entries = front_entries(history, predict_b1)
    for e in entries:
        e["file_ratio"] = None if not fp32_bytes else float(fp32_bytes) / e["bytes"]
    current = competing(history)
    return {
        "version": FRONT_VERSION, "real_evals": len(history), "competing": len(current),
        "in_budget": sum(bool(history[i].get("meets_budget")) for i in current), "budget": dict(budget),
        "objectives": ["real_acc (max)", "bytes (min)", "latency_ms.8 (min)"],
        "figures": "real_acc: validation accuracy after the search's short fine-tune (%); bytes: predicted ONNX file "
                   "bytes; latency_ms: ONNX Runtime CPU latency predicted by the run directory's latency tables "
                   "at batch 1 and 8 (ms)",
        "entries": entries,
    }


def check_front(front: object, path: Path | str) -> list[dict]:
    """The entries of a loaded ``front.json``, each checked (an error naming the file otherwise)."""
    def bad(why: str):
        raise HirelcError(f"{path} is corrupt ({why}); run `hirelc search` again")

    if not isinstance(front, dict) or front.get("version") != FRONT_VERSION or not isinstance(front.get("entries"),
                                                                                              list):
        bad(f"expected a version-{FRONT_VERSION} front with a list of entries")
    for e in front["entries"]:
        if not isinstance(e, dict) or not isinstance(e.get("eval"), int) or isinstance(e.get("eval"), bool):
            bad("an entry without an integer 'eval'")
        for k in ("real_acc", "bytes"):
            v = e.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"entry {e['eval']}: {k!r} is not a finite number")
        lat = e.get("latency_ms")
        if not isinstance(lat, dict) or any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                               or not math.isfinite(v)) for v in lat.values()):
            bad(f"entry {e['eval']}: 'latency_ms' must map batch sizes to finite numbers or null")
        if not isinstance(e.get("policy"), dict) or not e["policy"]:
            bad(f"entry {e['eval']}: no policy")
        try:
            for d in e["policy"].values():
                LayerPolicy.from_dict(d)
        except (HirelcError, TypeError, ValueError, KeyError, AttributeError) as err:
            bad(f"entry {e['eval']}: invalid layer policy ({err})")
    return front["entries"]


def pick(entries: Sequence[Mapping], choice: str) -> Mapping:
    """The front entry ``choice`` names (see the module's table)."""
    if not entries:
        raise HirelcError("the search's front is empty: no really evaluated policy met the budget")
    if choice == "accurate":
        return max(entries, key=lambda e: (e["real_acc"], -e["eval"]))
    if choice == "smallest":
        return min(entries, key=lambda e: (e["bytes"], -e["real_acc"], e["eval"]))
    if choice == "fastest":
        if any(e["latency_ms"].get("8") is None for e in entries):
            raise HirelcError("--pick fastest: the front has no latency predictions (no latency table)")
        return min(entries, key=lambda e: (e["latency_ms"]["8"], -e["real_acc"], e["eval"]))
    if choice.isascii() and choice.isdecimal():
        for e in entries:
            if e["eval"] == int(choice):
                return e
        raise HirelcError(f"--pick {choice}: real evaluation {choice} is not on the front (its evaluations: "
                          f"{', '.join(str(e['eval']) for e in entries)})")
    raise HirelcError(f"--pick {choice!r}: use {', '.join(PICKS)} or the number of a real evaluation on the front")


def format_front(entries: Sequence[Mapping]) -> str:
    """The front as an aligned terminal table, fewest bytes first; ``*`` marks the search's winner."""
    head = ["eval", "val acc %", "bytes", "fp32/size", "b1 ms", "b8 ms", ""]
    rows = [[str(e["eval"]), f"{e['real_acc']:.2f}", f"{e['bytes']:,.0f}",
             "-" if e.get("file_ratio") is None else f"{e['file_ratio']:.2f}x",
             *("-" if e["latency_ms"].get(b) is None else f"{e['latency_ms'][b]:.3f}" for b in ("1", "8")),
             "*" if e.get("winner") else ""] for e in entries]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"Pareto front ({len(entries)} policies; latencies predicted; --pick N lowers evaluation N):"]
    for r in [head, ["-" * w for w in width], *rows]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, width, strict=True)).rstrip())
    return "\n".join(lines)


def picked_policy(entry: Mapping) -> Policy:
    """The front entry's policy, named after its evaluation."""
    return Policy.from_layers({n: LayerPolicy.from_dict(d) for n, d in entry["policy"].items()},
                              f"front-eval{entry['eval']}")


__all__ = ["FRONT_VERSION", "PICKS", "front_entries", "front_report", "check_front", "pick", "picked_policy",
           "format_front"]
