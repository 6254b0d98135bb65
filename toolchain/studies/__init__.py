"""Studies over many runs: the benchmark against baselines, the ablation, and the results tables."""
