"""Deployment: ONNX export with integer initializers and QDQ nodes, ONNX Runtime sessions, verification.

``onnxruntime`` is imported lazily inside the functions that need it. Nothing here imports the lowering or
training code: :func:`verify_run` takes the lowered PyTorch model's logits from its caller, and
:class:`OrtProbe` is what :func:`hirelc.lower.lower_model` asks about ONNX Runtime's fusions.
"""

from hirelc.export.onnx_export import (
    ORT_PROBE,
    OrtProbe,
    export_fp32,
    export_lowered,
    integer_adds,
    lowered_graph,
    map_weight_dequantizers,
    strip_activation_qdq,
    unfused_layers,
)
from hirelc.export.ort_baseline import ort_int8_baseline
from hirelc.export.runtime import (
    available_providers,
    benchmark_interleaved,
    fused_op_counts,
    make_session,
    optimized_ops,
    ort_accuracy,
    ort_predict,
)
from hirelc.export.verify import VerifyConfig, check_gate, format_markdown, format_table, verify_run

__all__ = [
    "ORT_PROBE",
    "OrtProbe",
    "VerifyConfig",
    "available_providers",
    "benchmark_interleaved",
    "check_gate",
    "export_fp32",
    "export_lowered",
    "format_markdown",
    "format_table",
    "fused_op_counts",
    "lowered_graph",
    "make_session",
    "map_weight_dequantizers",
    "optimized_ops",
    "ort_accuracy",
    "ort_int8_baseline",
    "ort_predict",
    "strip_activation_qdq",
    "integer_adds",
    "unfused_layers",
    "verify_run",
]
