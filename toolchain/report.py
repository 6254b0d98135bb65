"""Small helpers every report writer shares: the timestamp, number cells, Markdown tables, Pareto dominance.

Pure standard library, so any layer of hirelc can use it without pulling in torch or ONNX Runtime.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence


def utc_now() -> str:
    """The current UTC time as reports record it: ISO-8601 to the second, e.g. ``2026-01-31T12:00:00+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fmt(v, spec: str, suffix: str = "") -> str:
    """``v`` formatted with the format spec ``spec`` and followed by ``suffix``; ``-`` for a missing value."""
    return "-" if v is None else f"{v:{spec}}{suffix}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header, the ``|---|`` rule, one line per row (cells as given)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` on every coordinate and better on one (every coordinate maximised)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (:func:`dominates`), sorted by x then y; equal points
    are all kept."""
    pts = [(float(x), float(y)) for x, y in points]
    keep = [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]
    return sorted(keep, key=lambda i: pts[i])


__all__ = ["utc_now", "fmt", "md_table", "dominates", "pareto_front"]
