"""ONNX Runtime latency of every artifact in a run directory (set HIRELC_BENCH_RUN=path; skipped otherwise)."""

import os
from pathlib import Path

import numpy as np
import pytest

RUN = os.environ.get("HIRELC_BENCH_RUN")
ARTIFACTS = ("fp32.onnx", "ort_int8.onnx", "model.onnx")


@pytest.mark.skipif(not RUN, reason="set HIRELC_BENCH_RUN to a run directory")
@pytest.mark.parametrize("artifact", ARTIFACTS)
@pytest.mark.parametrize("batch", [1, 8])
def test_session_latency(benchmark, artifact, batch):
    from hirelc.export import make_session

    path = Path(RUN) / artifact
    if not path.exists():
        pytest.skip(f"{path} missing")
    sess = make_session(path)
    inp = sess.get_inputs()[0]
    c, h, w = (d if isinstance(d, int) else 1 for d in inp.shape[1:])
    x = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
    out = benchmark(lambda: sess.run(None, {inp.name: x}))
    assert out[0].shape[0] == batch
