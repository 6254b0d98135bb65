import numpy as np
from search_synth import make_specs

from hirelc.search.config import SearchConfig
from hirelc.search.plots import pareto_front, plot_pareto, plot_policy_heatmap, plot_progress, plot_surrogate
from hirelc.search.space import Constraints, random_policy


def test_pareto_front_on_hand_made_points():
    pts = [(1, 5), (2, 4), (3, 3), (2, 2), (1, 4), (3, 3), (0.5, 5)]
    assert pareto_front(pts) == [0, 1, 2, 5]  # (2,2), (1,4), (0.5,5) are dominated; equal points both kept
    assert pareto_front([]) == [] and pareto_front([(1, 1)]) == [0]


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    specs = make_specs()
    layers = random_policy(specs, np.random.default_rng(0), Constraints.from_config(SearchConfig()))
    rng = np.random.default_rng(1)
    history = [
        {"wall_s": float(i), "real_acc": float(80 + rng.normal()), "effective_ratio": float(4 + rng.random() * 4),
         "storage_bytes": float(1e4 * rng.random()), "meets_budget": bool(i % 3)}
        for i in range(12)
    ]
    paths = [
        plot_policy_heatmap(specs, layers, tmp_path / "policy.png"),
        plot_progress(history, tmp_path / "progress.png"),
        plot_pareto(history, tmp_path / "pareto.png"),
        plot_pareto(history, tmp_path / "pareto_size.png", x="storage_bytes"),
        plot_surrogate([1, 2, 3, 4], [1.5, 2.5, 2.0, 4.5], tmp_path / "sub" / "surrogate.png"),
    ]
    assert all(_is_png(p) for p in paths)
