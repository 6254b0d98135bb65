"""The HiReLC search: hierarchical RL agents + a surrogate + real evaluations -> a per-layer policy.

It sees only :class:`~hirelc.topology.LayerSpec` lists, Fisher sensitivities and an evaluator callback.
"""

from hirelc.search.config import PRESETS, Budget, RewardConfig, SearchConfig
from hirelc.search.engine import BatchEvaluator, Evaluator, SearchResult, run_search
from hirelc.search.sensitivity import fisher_sensitivity
from hirelc.search.space import check_budget_feasible

__all__ = [
    "PRESETS", "BatchEvaluator", "Budget", "Evaluator", "RewardConfig", "SearchConfig", "SearchResult", "check_budget_feasible",
    "fisher_sensitivity", "run_search",
]
