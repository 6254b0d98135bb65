"""A phase's real evaluations as a batch: committed in the plan's order (synthetic, no Ray), and as Ray tasks
(hirelc.parallel) on a local 2-worker cluster with test_resnet: the same policy as the in-process search, a
worker that dies retried, and a one-line error without Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from search_synth import BLOCK_SENS, SENS, SyntheticEvaluator, make_specs

from hirelc import parallel, pipeline, runs
from hirelc.errors import HirelcError
from hirelc.evaluate import RealEvaluator
from hirelc.pipeline import search_stage
from hirelc.search import Budget, SearchConfig, run_search

SENSITIVITY = {"layer": SENS, "block": BLOCK_SENS}
CFG = SearchConfig(seed=5, cycles=1, hla_timesteps=8, lla_timesteps=16, lla_episode_len=4, candidates_per_cycle=6,
                   real_evals_per_cycle=2, warmup_real_evals=4, min_surrogate_points=3, surrogate_members=2)
BUDGET = Budget(target_ratio=6.0)
TIMING_KEYS = ("wall_s", "eval_s")
# the tiny search, one agent per level; its cycle screens the candidates by the proxy (no surrogate yet)
TINY = {"ensemble": False, "min_surrogate_points": 3}


class Batched(SyntheticEvaluator):
    """Scores a batch last to first (as parallel workers may finish) and yields it in the batch's order; with
    ``die_after`` the driver is "killed" after that many results in all."""

    def __init__(self, specs, die_after: int | None = None):
        super().__init__(specs)
        self.batches: list[int] = []
        self.proxy_batches: list[int] = []
        self.die_after, self.yielded = die_after, 0

    def real_accuracies(self, batch):
        self.batches.append(len(batch))
        accs = [self.real_accuracy(p) for p in reversed(batch)][::-1]

        def results():
            for acc in accs:
                if self.die_after is not None and self.yielded >= self.die_after:
                    raise KeyboardInterrupt("simulated kill of the driver")
                self.yielded += 1
                yield acc, 0.0

        return results()

    def proxy_drops(self, batch):
        self.proxy_batches.append(len(batch))
        return [self.proxy_drop(p) for p in batch]


def _history(result) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in result.history]


def test_a_batch_evaluator_gives_the_sequential_history_and_resumes_after_a_kill(tmp_path):
    specs = make_specs()
    one = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), CFG, BUDGET, None, progress=False)
    ev = Batched(specs)
    batched = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, None, progress=False)
    assert _history(batched) == _history(one) and batched.layers == one.layers
    assert ev.batches == [4, 2]  # one batch per phase: the warm-up, then the cycle
    with pytest.raises(KeyboardInterrupt):  # killed inside cycle 1, after its first result
        run_search(specs, SENSITIVITY, Batched(specs, die_after=5), CFG, BUDGET, tmp_path, progress=False)
    assert len((tmp_path / runs.SEARCH_LOG).read_text().splitlines()) == 5
    ev = Batched(specs)
    resumed = run_search(specs, SENSITIVITY, ev, CFG, BUDGET, tmp_path, resume=True, progress=False)
    assert ev.batches == [1] and _history(resumed) == _history(one)


def test_the_proxy_screening_is_one_batch_per_cycle():
    specs = make_specs()
    cfg = dataclasses.replace(CFG, use_surrogate=False)
    ev = Batched(specs)
    result = run_search(specs, SENSITIVITY, ev, cfg, BUDGET, None, progress=False)
    assert ev.proxy_batches and max(ev.proxy_batches) > 1
    plain = run_search(specs, SENSITIVITY, SyntheticEvaluator(specs), cfg, BUDGET, None, progress=False)
    assert _history(result) == _history(plain)


# ---------------------------------------------------------------- Ray, on the tiny test_resnet run directory


def _search(rd: Path, tiny_search: dict, **kw) -> dict:
    return search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False, **kw)


@pytest.fixture(scope="module")
def one_worker(tiny_baseline, copy_run_module, tiny_search):
    """The tiny search in process, and whether it imported Ray (when something before it did, ``import ray`` is
    made to fail instead, which a search that needs Ray would report)."""
    rd = copy_run_module(tiny_baseline, "one-worker")
    loaded = "ray" in sys.modules
    with pytest.MonkeyPatch.context() as mp:
        if loaded:
            mp.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
        summary = _search(rd, {**tiny_search, **TINY}, workers=1)
        imported = not loaded and "ray" in sys.modules
    return rd, summary, imported


def test_one_worker_never_imports_ray(one_worker):
    _, summary, imported = one_worker
    assert summary["workers"] == 1 and summary["n_real_evals"] >= 3
    assert not imported


def _log(rd: Path) -> list[dict]:
    lines = [json.loads(x) for x in (rd / runs.SEARCH_LOG).read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in lines]


class Crashing(RealEvaluator):
    """Kills its worker process the first time any copy of it evaluates (``marker`` not there yet)."""

    marker: str = ""

    def real_accuracy(self, layers, fidelity=0):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().real_accuracy(layers, fidelity)


def test_two_workers_find_the_same_policy(one_worker, copy_run_module, tiny_baseline, tiny_search, monkeypatch,
                                          tmp_path):
    """`--workers 2` on a local Ray it starts: the first evaluation kills its worker (Ray runs it again), the
    warm-up's and the cycle's proxy screening run on the workers, and policy.json and every logged score are the
    in-process ones."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(Crashing, "marker", str(tmp_path / "crashed-once"))
    monkeypatch.setattr(pipeline, "RealEvaluator", Crashing)
    monkeypatch.setattr(parallel, "PROXY_CHUNK", 1)
    screened: list[int] = []
    proxy_drops = parallel.RayEvaluator.proxy_drops

    def recording(self, batch):
        screened.append(min(self.workers, len(batch) // self.proxy_chunk))  # tasks it spreads the batch over
        return proxy_drops(self, batch)

    monkeypatch.setattr(parallel.RayEvaluator, "proxy_drops", recording)
    rd1, one, _ = one_worker
    rd2 = copy_run_module(tiny_baseline, "two-workers")
    two = _search(rd2, {**tiny_search, **TINY}, workers=2)
    assert Path(Crashing.marker).exists() and not ray.is_initialized()  # a worker died; Ray shut down after
    assert screened == [2, 2]  # the warm-up's pool (quick screens it) and the cycle's candidates, on both workers
    assert two["workers"] == 2 and two["n_real_evals"] == one["n_real_evals"]
    assert (rd2 / runs.POLICY).read_bytes() == (rd1 / runs.POLICY).read_bytes()
    assert _log(rd2) == _log(rd1)  # every real accuracy and proxy bit-identical, in the same order
    assert two["best_acc"] == one["best_acc"] and two["mean_eval_s"] > 0


def test_without_ray_more_workers_is_a_one_line_error(one_worker, copy_run, tiny_search, monkeypatch):
    rd = copy_run(one_worker[0])
    log = (rd / runs.SEARCH_LOG).read_bytes()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(HirelcError) as e:
        _search(rd, tiny_search, workers=2)
    assert 'pip install -e ".[ray]"' in str(e.value) and "--workers 2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HirelcError, match="--ray-address needs Ray"):
        _search(rd, tiny_search, ray_address="127.0.0.1:6379")
    with pytest.raises(HirelcError, match="--workers must be an integer >= 1"):
        _search(rd, tiny_search, workers=0)
    assert (rd / runs.SEARCH_LOG).read_bytes() == log  # refused before anything was measured or written


def test_a_cluster_address_nothing_answers_at_is_an_error_at_once():
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Stub:
        threads = 1

    with pytest.raises(HirelcError, match=f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers"):
        with parallel.distributed(Stub(), address=f"127.0.0.1:{port}"):
            pass


def test_the_cli_without_ray_says_how_to_install_it(tiny_baseline, copy_run, monkeypatch):
    from typer.testing import CliRunner

    from hirelc.cli import app

    rd = copy_run(tiny_baseline)
    def files() -> list[str]:
        return sorted(p.name for p in rd.iterdir() if p.name != runs.LOCK)

    before = files()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    res = CliRunner().invoke(app, ["search", "-r", str(rd), "--workers", "2"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ('hirelc: error: --workers 2 needs Ray, which is not installed: '
                                  'pip install -e ".[ray]"')
    assert files() == before  # nothing written
    res = CliRunner().invoke(app, ["compress", "-r", str(rd / "new"), "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output and not (rd / "new").exists()
