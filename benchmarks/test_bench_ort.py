"""ONNX Runtime latency of every ONNX artifact under a run directory, batch 1 and 8.

Set HIRELC_BENCH_RUN to a run directory (or a `hirelc bench` output folder): every ``*.onnx`` below it is
timed (fp32.onnx, ort_int8.onnx, model.onnx, and each method's model in a comparison). Skipped otherwise.
"""

import os
from pathlib import Path

import numpy as np
import pytest

RUN = os.environ.get("HIRELC_BENCH_RUN")


def _artifacts() -> list[Path]:
    if not RUN or not Path(RUN).is_dir():
        return []
    return sorted(p for p in Path(RUN).rglob("*.onnx") if p.is_file())


ARTIFACTS = _artifacts()


@pytest.mark.skipif(not ARTIFACTS, reason="set HIRELC_BENCH_RUN to a run directory holding .onnx files")
@pytest.mark.parametrize("artifact", ARTIFACTS or [None],
                         ids=[str(p.relative_to(RUN)) for p in ARTIFACTS] if ARTIFACTS else ["none"])
@pytest.mark.parametrize("batch", [1, 8])
def test_session_latency(benchmark, artifact, batch):
    from hirelc.export import make_session

    sess = make_session(artifact)
    inp = sess.get_inputs()[0]
    c, h, w = (d if isinstance(d, int) else 1 for d in inp.shape[1:])
    x = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
    benchmark.extra_info.update(artifact=str(artifact), bytes=artifact.stat().st_size, batch=batch)
    out = benchmark(lambda: sess.run(None, {inp.name: x}))
    assert out[0].shape[0] == batch
