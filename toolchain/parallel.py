"""A search phase's real evaluations (and large proxy batches) as Ray tasks: ``--workers N`` / ``--ray-address``.

:func:`distributed` wraps the run's :class:`~hirelc.evaluate.RealEvaluator`. With one worker and no address it
hands the evaluator back untouched and Ray is never imported. Otherwise it starts a local Ray instance with N
CPUs (or joins the cluster at the address), puts the evaluator (model, data subsets, baseline logits, saliency)
into the object store once, and returns a :class:`RayEvaluator`: each real evaluation of a batch is one task,
on a worker that fetches the evaluator from the object store on its first task and keeps it for the next ones.
Results are returned in the batch's order, whatever order the tasks finish in; a task whose worker dies is run
again (``max_retries``). Each task asks Ray for as many CPUs as the evaluator runs torch threads
(``RealEvaluator.threads``, 1 by default: N workers on N cores do not oversubscribe them), and that count, not
the number of workers, is what a score depends on: the policy is the same for 1, 2 or 100 workers.

Ray is an optional dependency: ``pip install -e ".[ray]"``. On a cluster, every node needs hirelc installed
(the same version as the driver's): tasks import it by name.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

from hirelc.compat import ensure_timm_importable
from hirelc.errors import HirelcError
from hirelc.evaluate import RealEvaluator
from hirelc.policy import LayerPolicy

RAY_INSTALL = 'pip install -e ".[ray]"'
TASK_RETRIES = 3  # runs of a task after its worker died (a Python error in the task is not retried)
PROXY_CHUNK = 8  # a proxy batch goes to workers only when each of at least two of them gets this many policies

Layers = dict[str, LayerPolicy]

# On a worker process: the evaluator of the current search (its object reference's hex -> the evaluator).
_WORKER_EVALUATOR: dict[str, RealEvaluator] = {}


def needs_ray(workers: int, address: str | None) -> bool:
    """Validate ``workers`` / ``address``; True when they ask for Ray (and Ray is importable)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise HirelcError(f"--workers must be an integer >= 1, got {workers!r}")
    if address is not None and not address.strip():
        raise HirelcError("--ray-address is empty (give host:port, or 'auto' for the cluster this machine is in)")
    if workers == 1 and address is None:
        return False
    import_ray("--ray-address" if address is not None else f"--workers {workers}")
    return True


def import_ray(what: str) -> ModuleType:
    """The ``ray`` module, or a one-line HirelcError saying how to install it."""
    try:
        import ray  # optional extra: imported only when a search asks for workers or a cluster
    except ImportError:
        raise HirelcError(f"{what} needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


@contextlib.contextmanager
def distributed(evaluator: RealEvaluator, workers: int = 1, address: str | None = None, *,
                max_retries: int = TASK_RETRIES) -> Iterator:
    """``evaluator`` itself (one worker, no address), or a :class:`RayEvaluator` on a Ray instance started here
    with ``workers * evaluator.threads`` CPUs (shut down on exit) or on the cluster at ``address``.

    A Ray instance this process already runs is used as it is (and left running).
    """
    if not needs_ray(workers, address):
        yield evaluator
        return
    ray = import_ray(f"--workers {workers}")
    threads = evaluator.threads
    started = not ray.is_initialized()
    if started:
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address is not None:
            check_reachable(address)
        try:
            if address is None:
                ray.init(num_cpus=workers * threads, include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
        except Exception as e:  # unreachable address, port clash, no shared memory: all the user's to fix
            where = f"join the Ray cluster at {address}" if address else f"start a local Ray with {workers} CPUs"
            raise HirelcError(f"cannot {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        if address is not None:  # a cluster: as many workers as it has CPUs for tasks
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        yield RayEvaluator(evaluator, ray, workers, max_retries)
    finally:
        if started:
            ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address nothing answers at is an error now (Ray itself would retry for minutes);
    ``auto`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise HirelcError(f"cannot join the Ray cluster at {address}: nothing answers there ({e}); start it with "
                          "`ray start --head` or check --ray-address") from None


class RayEvaluator:
    """The search's Evaluator (with the batch methods of :class:`hirelc.search.engine.BatchEvaluator`) whose real
    evaluations, and proxy batches of many policies, run as Ray tasks; predictions run here."""

    def __init__(self, local: RealEvaluator, ray: ModuleType, workers: int, max_retries: int = TASK_RETRIES,
                 proxy_chunk: int | None = None):
        self.local, self.workers, self.threads = local, workers, local.threads
        self.baseline_accuracy, self.proxy_cap = local.baseline_accuracy, local.proxy_cap
        self.max_fidelity = getattr(local, "max_fidelity", 0)
        self.eval_seconds: list[float] = []  # of every real evaluation, as measured on its worker
        self.proxy_chunk = PROXY_CHUNK if proxy_chunk is None else proxy_chunk
        self.max_retries = max_retries
        self._ray = ray
        # once: every task is handed this reference (inside a list, so Ray does not fetch it for each task)
        self._payload = [ray.put(local.for_workers())]
        options = dict(num_cpus=self.threads, max_retries=max_retries)
        self._real_task = ray.remote(**options)(_real_task)
        self._proxy_task = ray.remote(**options)(_proxy_task)

    def real_accuracies(self, batch: Sequence[Layers], fidelity: int = 0) -> Iterator[tuple[float, float]]:
        """Submit one task per policy now; yield ``(accuracy, seconds)`` in ``batch``'s order as they finish."""
        refs = [self._real_task.remote(self._payload, dict(layers), self.threads, fidelity) for layers in batch]
        return self._in_order(refs)

    def _in_order(self, refs: list) -> Iterator[tuple[float, float]]:
        n = 0
        try:
            for ref in refs:
                acc, seconds = self._get(ref)
                n += 1
                self.eval_seconds.append(seconds)
                yield acc, seconds
        finally:  # the caller stopped (an error, a Ctrl-C): what has not run yet is not wanted
            for ref in refs[n:]:
                self._ray.cancel(ref)

    def proxy_drops(self, batch: Sequence[Layers]) -> list[float]:
        """The proxy of each policy: here for a small batch, else split into one task per worker."""
        n = min(self.workers, len(batch) // self.proxy_chunk)
        if n < 2:
            return [self.local.proxy_drop(layers) for layers in batch]
        size, extra = divmod(len(batch), n)
        bounds = [i * size + min(i, extra) for i in range(n + 1)]
        refs = [self._proxy_task.remote(self._payload, [dict(x) for x in batch[bounds[i]:bounds[i + 1]]],
                                        self.threads) for i in range(n)]
        return [v for ref in refs for v in self._get(ref)]

    def _get(self, ref):
        exc = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exc.RayTaskError as e:  # the evaluation itself failed: the original error, not Ray's wrapper
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except exc.RayError as e:  # its worker or node died more often than it was retried
            raise HirelcError(f"a Ray worker died while evaluating a candidate ({type(e).__name__}, "
                              f"{self.max_retries} retries); every result before it is saved: run again with "
                              "--resume") from None

    def proxy_drop(self, layers: Layers) -> float:
        return self.local.proxy_drop(layers)

    def real_accuracy(self, layers: Layers, fidelity: int = 0) -> float:
        return next(self.real_accuracies([layers], fidelity))[0]

    def predict_bytes(self, layers: Layers) -> float:
        return self.local.predict_bytes(layers)

    def predict_latency_ms(self, layers: Layers) -> float | None:
        return self.local.predict_latency_ms(layers)


def _worker_evaluator(payload: list, threads: int) -> RealEvaluator:
    """On a worker: this search's evaluator, fetched from the object store on the worker's first task."""
    torch.set_num_threads(threads)  # the worker's own CPUs only (N workers on N cores would oversubscribe)
    ref = payload[0]
    key = ref.hex()
    if key not in _WORKER_EVALUATOR:
        ray = import_ray("a worker")
        ensure_timm_importable()  # the model unpickles timm classes: torchvision must be usable or stubbed first
        _WORKER_EVALUATOR.clear()  # a worker serves one search at a time
        _WORKER_EVALUATOR[key] = ray.get(ref)
    return _WORKER_EVALUATOR[key]


def _real_task(payload: list, layers: Layers, threads: int, fidelity: int = 0) -> tuple[float, float]:
    """One real evaluation on a worker, its fine-tune ``2**fidelity`` times as long: ``(accuracy %, seconds)``."""
    ev = _worker_evaluator(payload, threads)
    t = time.perf_counter()
    acc = float(ev.real_accuracy(layers, fidelity))
    return acc, time.perf_counter() - t


def _proxy_task(payload: list, batch: list[Layers], threads: int) -> list[float]:
    """The proxy of a chunk of policies on a worker."""
    ev = _worker_evaluator(payload, threads)
    return [float(ev.proxy_drop(layers)) for layers in batch]
