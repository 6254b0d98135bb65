"""Figures of a search: the winning policy, progress over time, the accuracy/compression front, the surrogate.

matplotlib is imported lazily (Agg backend) inside each plotting function, so importing the search stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hirelc.policy import LayerPolicy
from hirelc.report import pareto_front
from hirelc.search.front import competing
from hirelc.search.surrogate import spearman
from hirelc.topology import LayerSpec


def _pyplot():
    import matplotlib  # heavy dependency, imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy dependency, imported on use

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_policy_heatmap(specs: list[LayerSpec], layers: dict[str, LayerPolicy], path: str | Path) -> Path:
    """Two heat strips over the layers (model order): weight bits and keep ratio, values written in the cells."""
    plt = _pyplot()
    names = [s.name for s in specs]
    bits = np.array([[layers[n].bits or 32 for n in names]], dtype=float)  # (1, L)
    keep = np.array([[layers[n].keep_ratio for n in names]], dtype=float)  # (1, L)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 3.6), sharex=True)
    for ax, data, label, fmt, (lo, hi) in (
        (axes[0], bits, "bits", "{:.0f}", (2, 8)), (axes[1], keep, "keep ratio", "{:.2f}", (0.2, 1.0)),
    ):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        for j, v in enumerate(data[0]):
            ax.text(j, 0, fmt.format(v), ha="center", va="center", fontsize=7, color="w")
        ax.set_yticks([0], [label])
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[1].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes[0].set_title("policy per layer")
    return _save(fig, path)


def plot_progress(history: Sequence[dict], path: str | Path) -> Path:
    """Real accuracy of every evaluation and the best so far (among budget-meeting ones at the final fine-tune
    length) over wall time; warm-ups scored at a shorter length before it was doubled are drawn apart."""
    plt = _pyplot()
    t = np.array([h["wall_s"] for h in history], dtype=float)
    acc = np.array([h["real_acc"] for h in history], dtype=float)
    current = np.zeros(len(history), dtype=bool)
    current[competing(history)] = True
    ok = np.array([h.get("meets_budget", True) for h in history], dtype=bool) & current
    best = np.maximum.accumulate(np.where(ok, acc, -np.inf))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(t[ok], acc[ok], s=18, label="meets budget")
    out = ~ok & current
    ax.scatter(t[out], acc[out], s=18, marker="x", c="grey", label="outside budget")
    if not current.all():
        ax.scatter(t[~current], acc[~current], s=12, marker=".", c="silver", label="shorter fine-tune (superseded)")
    finite = np.isfinite(best)
    ax.step(t[finite], best[finite], where="post", c="C3", label="best so far")
    ax.set(xlabel="wall time (s)", ylabel="real accuracy (%)", title="search progress")
    ax.legend()
    return _save(fig, path)


def plot_pareto(history: Sequence[dict], path: str | Path, x: str = "effective_ratio") -> Path:
    """Accuracy against ``x`` (``effective_ratio``, maximised, or a size key such as ``storage_bytes``,
    minimised) for every real evaluation at the final fine-tune length, with the Pareto front drawn."""
    plt = _pyplot()
    rows = [history[i] for i in competing(history) if history[i].get(x) is not None]
    xs = np.array([h[x] for h in rows], dtype=float)
    acc = np.array([h["real_acc"] for h in rows], dtype=float)
    sign = 1.0 if x == "effective_ratio" else -1.0  # ratios grow, sizes shrink
    front = pareto_front(list(zip(sign * xs, acc, strict=True)))
    front = sorted(front, key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, acc, s=18, alpha=0.6, label="real evaluations")
    ax.plot(xs[front], acc[front], "o-", c="C3", label="Pareto front")
    ax.set(xlabel=x.replace("_", " "), ylabel="real accuracy (%)", title="accuracy vs compression")
    ax.legend()
    return _save(fig, path)


def plot_front(history: Sequence[dict], entries: Sequence[dict], path: str | Path) -> Path:
    """Accuracy against predicted bytes and against predicted batch-8 latency: every real evaluation (crosses:
    outside the budget), the front's entries ringed and labelled with their evaluation number. Only evaluations at
    the final fine-tune length are drawn (the ones that compete)."""
    plt = _pyplot()
    total = len(history)
    history = [history[i] for i in competing(history)]
    lat = all(h.get("predicted_latency_ms") is not None for h in history)
    fig, axes = plt.subplots(1, 2 if lat else 1, figsize=(10 if lat else 5.5, 4), squeeze=False)
    panels = [("bytes", "predicted file bytes")] + ([("latency", "predicted batch-8 latency (ms)")] if lat else [])
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        def x(h: dict, key: str = key) -> float:
            if key == "latency":
                return float(h["predicted_latency_ms"])
            return float(h["predicted_bytes"] if h.get("predicted_bytes") is not None else h["storage_bytes"])

        for ok, marker, name in ((True, "o", "within budget"), (False, "x", "outside budget")):
            rows = [h for h in history if bool(h.get("meets_budget")) == ok]
            if rows:
                ax.scatter([x(h) for h in rows], [h["real_acc"] for h in rows], s=18, alpha=0.5, marker=marker,
                           c="C0" if ok else "grey", label=name)
        fx = [e["bytes"] if key == "bytes" else e["latency_ms"]["8"] for e in entries]
        fy = [e["real_acc"] for e in entries]
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="C3", label="Pareto front")
        for e, a, b in zip(entries, fx, fy, strict=True):
            ax.annotate(str(e["eval"]) + (" *" if e.get("winner") else ""), (a, b), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="real accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"search front: {len(entries)} of {len(history)} real evaluations"
                 + (f" ({total} with superseded warm-ups)" if total > len(history) else "")
                 + " (numbers: evaluation, *: winner)")
    fig.tight_layout()
    return _save(fig, path)


def plot_surrogate(pred: Sequence[float], real: Sequence[float], path: str | Path) -> Path:
    """Surrogate prediction (made before it saw the point) against real accuracy, Spearman in the title."""
    plt = _pyplot()
    p, r = np.asarray(pred, dtype=float), np.asarray(real, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(p, r, s=18)
    if p.size:
        lo, hi = float(min(p.min(), r.min())), float(max(p.max(), r.max()))
        ax.plot([lo, hi], [lo, hi], "--", c="grey", lw=1)
    ax.set(xlabel="predicted accuracy (%)", ylabel="real accuracy (%)",
           title=f"surrogate: Spearman {spearman(p, r):.2f} (n={p.size})")
    return _save(fig, path)


def plot_bench(rows: dict[str, dict], x: str, path: str | Path, xlabel: str) -> Path:
    """ORT top-1 of every bench method against ``x`` ("bytes", log scale, or "latency_b<N>"), each point
    labelled, with the Pareto front (smaller x, higher accuracy) drawn through the methods on it."""
    plt = _pyplot()
    names = list(rows)

    def xval(r: dict) -> float:
        return float(r["bytes"]) if x == "bytes" else float(r["latency_ms"][x.removeprefix("latency_b")])

    xs = np.array([xval(rows[n]) for n in names])
    acc = np.array([rows[n]["top1"] for n in names], dtype=float)
    front = sorted(pareto_front(list(zip(-xs, acc, strict=True))), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, n in enumerate(names):
        ax.scatter(xs[i], acc[i], s=30, c="C3" if n == "hirelc" else "C0", zorder=3)
        ax.annotate(n, (xs[i], acc[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot(xs[front], acc[front], "--", c="grey", lw=1, label="Pareto front")
    if x == "bytes":
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="ORT top-1 (%)", title=f"accuracy vs {xlabel.split(' (')[0]}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_ablation(summary: dict[str, dict], path: str | Path) -> Path:
    """Ablation variants side by side: final ORT top-1 and the evaluation that found the winner, mean ± std."""
    plt = _pyplot()
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric, label in ((axes[0], "final_top1", "final ORT top-1 (%)"),
                              (axes[1], "evals_to_best", "real evaluation that found the winner")):
        mean = [summary[n][metric]["mean"] or 0.0 for n in names]
        std = [summary[n][metric]["std"] or 0.0 for n in names]
        ax.bar(range(len(names)), mean, yerr=std, capsize=4, color=["C3" if n == "full" else "C0" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if metric == "final_top1" and any(mean):
            lo = min(m - s for m, s in zip(mean, std, strict=True))
            ax.set_ylim(max(0.0, lo - 2.0), min(100.0, max(m + s for m, s in zip(mean, std, strict=True)) + 1.0))
    n = max(summary[k]["final_top1"]["n"] for k in names)
    fig.suptitle(f"search ablation: mean ± std over {n} seed(s)")
    fig.tight_layout()
    return _save(fig, path)
