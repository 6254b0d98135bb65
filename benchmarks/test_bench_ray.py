"""Wall time of one search phase's real evaluations: in process, and as Ray tasks on 2 local workers.

One phase = ``POLICIES`` random valid policies of the search space, each lowered, fine-tuned (the search's
40 QAT steps) and validated by the search's :class:`~hirelc.evaluate.RealEvaluator` on the embedded
Fashion-MNIST subset at 32x32. Three ways to run it:

* ``1-worker``: the in-process path of ``hirelc search`` (each evaluation on one torch thread, the count that
  makes its score the same wherever it runs);
* ``1-worker-all-cores``: in process on every core (what the search did before scores were pinned to one
  thread; its scores may differ in the last bits, so only its time is compared);
* ``2-workers``: a local Ray instance started for it, one task per policy, one thread per task.

Ray's start and the first phase (each worker's imports, the evaluator fetched from the object store, the first
lowering's runtime probes) are timed apart as ``start`` and ``cold``; the benchmark figure is a second, warm
phase: what every later phase of a search costs.

``HIRELC_BENCH_RAY_MODEL`` picks the timm model (default resnet18, the reference model; test_resnet is quick).
Skipped without Ray (``pip install -e ".[ray]"``). Run with ``-s`` to see the summary lines.
"""

import os
import time

import numpy as np
import pytest

from hirelc.data import load_data
from hirelc.evaluate import Predictors, RealEvaluator
from hirelc.models import build_model, model_config
from hirelc.parallel import distributed
from hirelc.search import SearchConfig
from hirelc.search.space import Constraints, random_policy, share_group_keeps
from hirelc.topology import build_topology
from hirelc.train import set_threads

pytest.importorskip("ray")

MODEL = os.environ.get("HIRELC_BENCH_RAY_MODEL", "resnet18")
POLICIES = 4  # a phase's real evaluations (the quick preset plans 5 in its warm-up, 2 per cycle)
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def phase():
    """``evaluator(threads)``: a fresh evaluator of an untrained ``MODEL`` (timings do not depend on its weights),
    and one phase's policies."""
    set_threads()
    bundle = load_data("fashion-mnist-mini", img_size=32)
    model = build_model(model_config(MODEL, bundle.num_classes, bundle.in_chans, 32)).eval()
    topo = build_topology(model, (1, bundle.in_chans, 32, 32))
    specs = list(topo.layers)
    rng = np.random.default_rng(0)
    base = Constraints.from_config(SearchConfig())
    batch = [share_group_keeps(specs, random_policy(specs, rng, base)) for _ in range(POLICIES)]
    return lambda threads: RealEvaluator(model, topo, bundle, Predictors(model, topo), seed=0, threads=threads), batch


def _run(scorer, batch) -> tuple[list[float], float]:
    """One phase: every policy of ``batch`` really evaluated; the scores and the wall time."""
    t = time.perf_counter()
    if hasattr(scorer, "real_accuracies"):
        accs = [a for a, _ in scorer.real_accuracies(batch)]
    else:
        accs = [scorer.real_accuracy(p) for p in batch]
    return accs, time.perf_counter() - t


VARIANTS = {"1-worker": (1, 1), "1-worker-all-cores": (1, os.cpu_count() or 1), "2-workers": (2, 1)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_evaluation_phase(benchmark, phase, variant, capsys):
    evaluator, batch = phase
    workers, threads = VARIANTS[variant]
    ev = evaluator(threads)
    t = time.perf_counter()
    with distributed(ev, workers) as scorer:
        start_s = time.perf_counter() - t
        cold_accs, cold_s = _run(scorer, batch)
        accs, warm_s = benchmark.pedantic(_run, args=(scorer, batch), rounds=1, iterations=1)
    assert accs == cold_accs  # the same policies score the same, wherever they run
    MEASURED[variant] = {"accs": accs, "start_s": start_s, "cold_s": cold_s, "warm_s": warm_s}
    benchmark.extra_info.update(model=MODEL, policies=POLICIES, workers=workers, threads=threads,
                                start_s=round(start_s, 2), cold_phase_s=round(cold_s, 2), warm_phase_s=round(warm_s, 2))
    with capsys.disabled():
        print(f"\n{MODEL}, {POLICIES} real evaluations, {variant}: start {start_s:.1f} s, cold phase {cold_s:.1f} s, "
              f"warm phase {warm_s:.1f} s ({warm_s / POLICIES:.1f} s per evaluation)")
    if "1-worker" in MEASURED and "2-workers" in MEASURED:
        assert MEASURED["1-worker"]["accs"] == MEASURED["2-workers"]["accs"]  # bit-identical scores
    if len(MEASURED) == len(VARIANTS):
        one, two = MEASURED["1-worker"], MEASURED["2-workers"]
        with capsys.disabled():
            print(f"{MODEL}: warm phase {one['warm_s']:.1f} s on 1 worker, {two['warm_s']:.1f} s on 2 "
                  f"(x{one['warm_s'] / two['warm_s']:.2f}; in process on all cores "
                  f"{MEASURED['1-worker-all-cores']['warm_s']:.1f} s); cold {one['cold_s']:.1f} s vs "
                  f"{two['cold_s']:.1f} s + Ray start {two['start_s']:.1f} s")
