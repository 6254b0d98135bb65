"""Studies over many runs: the benchmark against baselines, the ablation, and the results tables."""

from __future__ import annotations

from pathlib import Path

from hirelc import runs
from hirelc.machine import record
from hirelc.report import utc_now


def report_header(rd: Path) -> dict:
    """What every study report starts with: when, on which machine, from which run directory and model."""
    meta = runs.read_json(rd / runs.BASELINE_META, "baseline metadata")
    return {"created": utc_now(), "machine": record(), "run_dir": str(rd), "model": meta.get("model"),
            "baseline_test_acc": meta.get("test_acc")}
