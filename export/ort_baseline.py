"""The comparison a user would otherwise pick: ONNX Runtime's own static int8 quantization of the fp32 model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from hirelc import runs
from hirelc.errors import HirelcError


def _reader(calib_x: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader  # imported on use, as in all of hirelc.export

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(calib_x), batch_size))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {input_name: np.ascontiguousarray(calib_x[i : i + batch_size], np.float32)}

    return _Batches()


def ort_int8_baseline(fp32_onnx_path: str | Path, out_path: str | Path, calib_x: np.ndarray, *,
                      per_channel: bool = True, reduce_range: bool = False, batch_size: int = 16,
                      act_int8: bool = False) -> dict:
    """Quantize ``fp32_onnx_path`` with ``onnxruntime.quantization.quantize_static`` into ``out_path``.

    ``act_int8``: symmetric signed int8 activations (zero point 0), the form TensorRT's explicit quantization
    takes, instead of uint8 (ONNX Runtime CPU's fast path).

    ``quant_pre_process`` (shape inference + graph optimisation, what ORT recommends) runs first; if it fails
    the raw model is quantized. Returns ``{path, bytes, preprocessed, calib_samples, per_channel, reduce_range}``.
    """
    import onnxruntime as ort  # imported on use, as in all of hirelc.export
    from onnxruntime.quantization import (  # imported on use, as in all of hirelc.export
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src = Path(fp32_onnx_path)
    if not src.is_file():
        raise HirelcError(f"fp32 ONNX model not found: {src}")
    calib_x = np.asarray(calib_x, dtype=np.float32)
    if calib_x.ndim != 4 or len(calib_x) == 0:
        raise HirelcError(f"calibration data must be a non-empty (N, C, H, W) array, got shape {calib_x.shape}")
    try:
        input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    except Exception as e:
        raise HirelcError(f"ONNX Runtime cannot load {src}: {str(e).splitlines()[0]}") from None
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice at INFO/WARNING level
    try:
        with tempfile.TemporaryDirectory(prefix="hirelc-ortq-") as d:
            pre = Path(d) / "pre.onnx"
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                preprocessed = True
            except Exception:
                pre, preprocessed = src, False
            with runs.atomic_path(out_path) as tmp:
                quantize_static(
                    str(pre), str(tmp), _reader(calib_x, input_name, batch_size),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8 if act_int8 else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
                    extra_options={"ActivationSymmetric": True} if act_int8 else None,
                )
    finally:
        logging.getLogger().setLevel(quiet)
    return {"path": str(out_path), "bytes": Path(out_path).stat().st_size, "preprocessed": preprocessed,
            "calib_samples": int(len(calib_x)), "per_channel": per_channel, "reduce_range": reduce_range,
            "act_int8": act_int8}
