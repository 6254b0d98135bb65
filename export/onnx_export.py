"""Export a lowered model to one ONNX file with integer initializers and ``DequantizeLinear`` / Q-DQ nodes.

The quantized layers emit their own ONNX nodes (see :mod:`hirelc.qmodules`); this module runs the
TorchScript exporter (fast, one file) and then post-processes the graph with ``onnx``:

* weights of layers with ``bits <= 4`` move from INT8/UINT8 to INT4/UINT4 initializers (two codes per byte);
  the codes keep their true range, so 2- and 3-bit weights live in 4-bit containers and 5..7-bit weights in
  8-bit containers (ONNX has no narrower types; the report's effective bits count the real widths);
* :func:`unfused_layers` asks ONNX Runtime which quantized layers it could *not* fuse into integer kernels
  (a conv whose output is not quantized again, e.g. it feeds a residual ``Add``, runs as a float conv on
  weights dequantized at every call); lowering can give exactly those layers an output quantizer.

Which ``DequantizeLinear`` belongs to which layer is found by *content*: the node's integer initializer
must equal the layer's codes (transposed for linear layers) and its scale the layer's scale. This needs no
assumption about the exporter's node names, initializer names or node order, and it is immune to the
exporter's de-duplication of identical tensors (converted tensors get fresh names; shared ones are never
changed in place).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hirelc import kernels as K
from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.policy import PerGroup, parse_granularity
from hirelc.qmodules import ActQuant, QConv2d, QLinear, quant_layers

DEFAULT_OPSET = 21  # first opset with INT4/UINT4 and blocked DequantizeLinear
_CONTAINERS = {(4, True): "int4", (4, False): "uint4", (8, True): "int8", (8, False): "uint8"}
_ONNX_TYPE = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


@contextlib.contextmanager
def strip_activation_qdq(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn every activation quantizer into the identity (scale 0); restored on exit."""
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    saved = [a.scale.clone() for a in acts]
    try:
        for a in acts:
            a.scale.zero_()
        yield model
    finally:
        for a, s in zip(acts, saved, strict=True):
            a.scale.copy_(s)


def _torch_export(model: nn.Module, input_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """TorchScript export (fast, single file) into memory; input ``input``, output ``logits``, dynamic batch."""
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros(input_shape),), buf, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except HirelcError:
        raise
    except Exception as e:
        raise HirelcError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    return onnx.load_from_string(buf.getvalue())


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node (subgraphs included) or exposed as a graph output."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(g)
    return used


def _inline_identities(graph: onnx.GraphProto) -> None:
    """Point consumers of ``Identity(initializer)`` (the exporter's de-duplication) at the initializer itself."""
    inits = {t.name for t in graph.initializer}
    alias: dict[str, str] = {}
    for n in graph.node:
        if n.op_type == "Identity":
            src = alias.get(n.input[0], n.input[0])
            if src in inits:
                alias[n.output[0]] = src
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    _prune_unused(graph)


def _prune_unused(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes and initializers nothing reads any more."""
    used = _used_names(graph)
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    used = _used_names(graph)
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _digest(a: np.ndarray) -> tuple:
    return a.dtype.str, a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _expected_tensors(q) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale) exactly as the layer writes them into the graph (linear weights are (I, O))."""
    w, s = q.qweight.numpy(), q.scale.numpy()
    if isinstance(q, QLinear):
        w = w.T
        if isinstance(parse_granularity(q.granularity), PerGroup):
            s = s.T
    return np.array(w, order="C"), np.array(s, order="C")  # (ascontiguousarray would make 0-d 1-d)


def map_weight_dequantizers(graph: onnx.GraphProto, model: nn.Module) -> dict[str, list[onnx.NodeProto]]:
    """Layer name -> the ``DequantizeLinear`` nodes that dequantize its weight, matched by content."""
    inits = {t.name: t for t in graph.initializer}
    by_key: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    layers = quant_layers(model)
    for name, q in layers.items():
        w, s = _expected_tensors(q)
        by_key.setdefault(_digest(w), []).append((name, s))
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        cands = by_key.get(_digest(numpy_helper.to_array(inits[n.input[0]])), [])
        if len(n.input) > 1 and n.input[1] in inits:  # confirm by the scale too
            s = numpy_helper.to_array(inits[n.input[1]])
            cands = [c for c in cands if c[1].shape == s.shape and np.array_equal(c[1], s)]
        if not cands:
            continue
        fresh = [c for c in cands if c[0] not in found]  # identical layers: assign in graph order
        found.setdefault((fresh or cands)[0][0], []).append(n)
    missing = sorted(set(layers) - set(found))
    if missing:
        raise RuntimeError(f"export: no DequantizeLinear found for quantized layer(s) {missing}")
    return found


def _narrow(t: np.ndarray, name: str, container: str) -> onnx.TensorProto:
    """A packed INT4/UINT4 initializer holding the integer values of ``t`` (which must fit)."""
    lo, hi = (-8, 7) if container == "int4" else (0, 15)
    if t.size and (t.min() < lo or t.max() > hi):
        raise RuntimeError(f"{name}: values [{t.min()}, {t.max()}] do not fit {container}")
    packed = K.pack_int(torch.from_numpy(t.astype(np.int8 if container == "int4" else np.uint8)), 4)
    return helper.make_tensor(name, _ONNX_TYPE[container], list(t.shape), packed.numpy().tobytes(), raw=True)


def narrow_weights(graph: onnx.GraphProto, model: nn.Module) -> dict[str, str]:
    """Move the codes (and zero-points) of layers with ``bits <= 4`` to INT4/UINT4; returns layer -> container."""
    inits = {t.name: t for t in graph.initializer}
    layers = quant_layers(model)
    containers: dict[str, str] = {}
    for name, nodes in map_weight_dequantizers(graph, model).items():
        q = layers[name]
        signed = q.qweight.dtype == torch.int8
        container = _CONTAINERS[(K.container_bits(q.bits), signed)]
        containers[name] = container
        if container not in _ONNX_TYPE:
            continue
        for node in nodes:
            for slot, suffix in ((0, "qweight"), (2, "zero_point")):
                if slot >= len(node.input) or not node.input[slot]:
                    continue
                if node.input[slot] not in inits:
                    raise RuntimeError(f"export: {name}: DequantizeLinear input {node.input[slot]!r} is not constant")
                new_name = f"{name}.{suffix}.{container}"
                if new_name not in inits:  # fresh tensor: a shared (de-duplicated) one is never changed
                    t = _narrow(numpy_helper.to_array(inits[node.input[slot]]), new_name, container)
                    graph.initializer.append(t)
                    inits[new_name] = t
                node.input[slot] = new_name
    _prune_unused(graph)
    return containers


def check_onnx(model: onnx.ModelProto, what: str) -> None:
    """ONNX checker (full) and strict shape inference; a failure is a one-line error naming ``what``."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise HirelcError(f"{what}: invalid ONNX graph: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _save(model: onnx.ModelProto, path: str | Path) -> int:
    """Write one self-contained file atomically; returns its size in bytes."""
    if model.ByteSize() >= 2**31:
        raise HirelcError(f"{path}: the model is over 2 GiB, too large for a single-file ONNX model")
    with runs.atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return Path(path).stat().st_size


def graph_summary(model: onnx.ModelProto) -> dict:
    """Op counts and initializer dtype histogram of a graph."""
    ops = Counter(n.op_type for n in model.graph.node)
    dtypes = Counter(TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "op_counts": dict(sorted(ops.items())),
        "initializer_dtypes": dict(sorted(dtypes.items())),
    }


def lowered_graph(model: nn.Module, input_shape: tuple[int, ...], *, opset: int = DEFAULT_OPSET,
                  weight_only: bool = False) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The post-processed, checked ONNX graph of a lowered model, in memory, and each layer's container."""
    qls = quant_layers(model)
    unfrozen = [n for n, q in qls.items() if not q.frozen]
    if unfrozen:
        raise HirelcError(f"layer(s) {unfrozen[:3]} are not frozen: lower the model (freeze) before export")
    with strip_activation_qdq(model) if weight_only else contextlib.nullcontext():
        proto = _torch_export(model, tuple(input_shape), opset)
    _inline_identities(proto.graph)
    containers = narrow_weights(proto.graph, model) if qls else {}
    return proto, containers


def export_lowered(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                   opset: int = DEFAULT_OPSET, weight_only: bool = False) -> dict:
    """Export a lowered (frozen) model as ``path``: integer initializers + DequantizeLinear, Q/DQ activations.

    ``weight_only`` drops the activation Q/DQ pairs for this export (see :func:`strip_activation_qdq`).
    Returns a summary: ``path``, ``bytes``, ``opset``, ``dequantize_linear``, ``quantize_linear``,
    ``op_counts``, ``initializer_dtypes``, ``layers`` (name -> bits, scheme, granularity, kind, shape,
    container) and ``weight_only``.
    """
    proto, containers = lowered_graph(model, input_shape, opset=opset, weight_only=weight_only)
    check_onnx(proto, str(path))
    size = _save(proto, path)
    layers = {
        n: {"bits": q.bits, "scheme": q.scheme, "granularity": q.granularity,
            "kind": "conv" if isinstance(q, QConv2d) else "linear", "shape": list(q.qweight.shape),
            "container": containers[n]}
        for n, q in quant_layers(model).items()
    }
    return {"path": str(path), "bytes": size, **graph_summary(proto), "layers": layers, "weight_only": weight_only}


def _optimized(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[onnx.ModelProto, dict[str, str], list]:
    """Export ``model`` (a frozen copy if still training) and let ORT optimize it (level "extended").

    Returns the narrowed graph, a map from each node using a quantized weight to that layer, and ORT's
    optimized (op_type, node name) list.
    """
    from hirelc.export.runtime import optimized_ops

    if any(not q.frozen for q in quant_layers(model).values()):
        model = copy.deepcopy(model)
        for q in quant_layers(model).values():
            q.freeze()
    proto = _torch_export(model, tuple(input_shape), DEFAULT_OPSET)
    _inline_identities(proto.graph)
    # Map DQ outputs to layers before narrowing: 4-bit tensors no longer compare equal to the layers' codes.
    dq_layer = {n.output[0]: name for name, nodes in map_weight_dequantizers(proto.graph, model).items()
                for n in nodes}
    narrow_weights(proto.graph, model)
    weight_of = {n.name: dq_layer[n.input[1]] for n in proto.graph.node
                 if len(n.input) > 1 and n.input[1] in dq_layer}
    return proto, weight_of, optimized_ops(proto.SerializeToString(), level="extended")


def unfused_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Quantized layers that ONNX Runtime (CPU) leaves as float Conv/MatMul/Gemm instead of an integer kernel.

    Typically convs whose output is not quantized again (it feeds a residual ``Add``, a pool or the head):
    ORT only builds ``QLinearConv`` from ``DQ -> Conv -> Q``, so these run in float on weights dequantized at
    every call. Giving them an output activation quantizer at lowering time makes them fuse. Call it after
    activation calibration (uncalibrated layers export without Q/DQ, so nothing fuses); layers still in
    quantization-aware training are checked on a frozen copy.
    """
    _, weight_of, ops = _optimized(model, input_shape)
    float_nodes = {name for op, name in ops if op in ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul")}
    return sorted({weight_of[n] for n in float_nodes if n in weight_of})


def integer_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many adds ONNX Runtime (CPU) runs as integer ``QLinearAdd`` in the exported model."""
    return sum(op == "QLinearAdd" for op, _ in _optimized(model, input_shape)[2])


def export_fp32(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                opset: int = DEFAULT_OPSET) -> dict:
    """Export the float baseline (BatchNorm folded by the exporter) as one ONNX file, atomically."""
    proto = _torch_export(model, tuple(input_shape), opset)
    check_onnx(proto, str(path))
    size = _save(proto, path)
    return {"path": str(path), "bytes": size, **graph_summary(proto)}
