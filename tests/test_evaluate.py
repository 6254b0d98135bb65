"""Tests for hirelc.evaluate.RealEvaluator: how the search scores candidates on the real model."""

from __future__ import annotations

import pytest

from hirelc import lower as L
from hirelc.evaluate import Predictors, RealEvaluator
from hirelc.policy import PRESETS


@pytest.fixture()
def evaluator(built, bundle):
    b = built("test_resnet")
    return b, RealEvaluator(b.model, b.topo, bundle, Predictors(b.model, b.topo), qat_steps=1, train_samples=64,
                            val_samples=32, calib_samples=16, batch_size=16)


def test_saliency_is_measured_once_for_every_pruned_candidate(evaluator, monkeypatch):
    b, ev = evaluator
    calls = []
    real = L.channel_saliency
    monkeypatch.setattr(L, "channel_saliency", lambda *a, **k: calls.append(1) or real(*a, **k))
    pruned = PRESETS["w4-prune50"].resolve(list(b.topo.layers))
    unpruned = PRESETS["int8"].resolve(list(b.topo.layers))
    assert ev.saliency(unpruned) is None  # nothing to rank when no layer is pruned
    ev.proxy_drop(pruned)
    acc = ev.real_accuracy(pruned)
    ev.proxy_drop(pruned)
    assert len(calls) == 1
    assert 0.0 <= acc <= 100.0
    assert set(ev.saliency(pruned)) >= {s.name for s in b.topo.layers if s.prunable}
