"""What a measurement ran on: CPU model, the instruction sets that decide ONNX Runtime's int8 speed, versions.

int8 latency depends on the CPU far more than fp32 does: without VNNI, ORT's U8S8 kernels multiply in int16
pairs; with AVX-512 VNNI / AVX-VNNI or AMX-INT8 integer convs and matmuls run much faster. Every report that
holds latencies records these so figures from different machines are never compared blindly.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu() -> dict:
    """``model`` (the CPU's name) and ``isa`` (which of :data:`INT8_ISA` it has; empty where unknown)."""
    model, flags = _cpuinfo()
    return {"model": model or platform.processor() or platform.machine(),
            "isa": [f for f in INT8_ISA if f in flags]}


def record(threads: int | None = None) -> dict:
    """The machine a report's figures were measured on.

    ``platform``, ``processor``, ``cpu`` (model name), ``isa`` (see :func:`cpu`), ``cpu_count`` and ``cores``
    (both ``os.cpu_count()``), ``system`` (terse platform), ``python``, ``onnxruntime`` and ``torch`` versions,
    ``threads`` (ONNX Runtime intra-op threads; ``threads`` or every core) and ``intra_op_spinning`` (false: idle
    ORT threads do not busy-wait).
    """
    import onnxruntime  # heavy dependency, imported on use so importing hirelc.machine stays cheap
    import torch  # heavy dependency, imported on use so importing hirelc.machine stays cheap

    c = cpu()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": c["model"], "isa": c["isa"], "cpu_count": os.cpu_count(), "cores": os.cpu_count(),
            "system": platform.platform(terse=True), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "threads": threads or os.cpu_count(), "intra_op_spinning": False}


DESCRIBE_KEYS = ("cpu", "isa", "cores", "system", "onnxruntime", "torch")


def describe() -> dict:
    """The short machine description (``DESCRIBE_KEYS`` of :func:`record`): CPU, cores, system, versions."""
    r = record()
    return {k: r[k] for k in DESCRIBE_KEYS}
