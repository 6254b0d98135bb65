"""Export a lowered model to one ONNX file with integer initializers and ``DequantizeLinear`` / Q-DQ nodes.

The quantized layers emit their own ONNX nodes (see :mod:`hirelc.qmodules`); this module runs the
TorchScript exporter (fast, one file) and then post-processes the graph with ``onnx``:

* weights of layers with ``bits <= 4`` move from INT8/UINT8 to INT4/UINT4 initializers (two codes per byte);
  the codes keep their true range, so 3-bit weights live in 4-bit containers and 5..7-bit weights in 8-bit
  containers (ONNX has no types in between; the report's effective bits count the real widths). 2-bit weights
  take INT2/UINT2 (four codes per byte) when the export's opset is 25 or later (:data:`INT2_OPSET`), else INT4;
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
from hirelc.export.runtime import FLOAT_OPS, make_session, optimized_graph
from hirelc.policy import PerGroup, parse_granularity
from hirelc.qmodules import ActQuant, QConv2d, QLinear, quant_layers

DEFAULT_OPSET = 21  # first opset with INT4/UINT4 and blocked DequantizeLinear
INT2_OPSET = 25  # first opset with INT2/UINT2 (2-bit weights stored four codes per byte)
TORCHSCRIPT_OPSET = 21  # the TorchScript exporter writes at most 21: later opsets are converted from it
EXPORT_OPSETS = (17, 25)
_CONTAINERS = {(4, True): "int4", (4, False): "uint4", (8, True): "int8", (8, False): "uint8"}
_ONNX_TYPE = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4,  # INT2/UINT2 from onnx 1.20
              "int2": getattr(TensorProto, "INT2", None), "uint2": getattr(TensorProto, "UINT2", None)}
_RANGE = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}
_WIDTH = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2}


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
    """TorchScript export (fast, single file) into memory; input ``input``, output ``logits``, dynamic batch.

    Opsets past :data:`TORCHSCRIPT_OPSET` are exported at it and converted by ``onnx.version_converter``.
    """
    if opset > TORCHSCRIPT_OPSET:
        return _converted(_torch_export(model, input_shape, TORCHSCRIPT_OPSET), opset)
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


def _converted(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``proto`` converted to ``opset`` of the default domain, with the IR version that opset needs."""
    from onnx import version_converter  # with onnx, on use

    try:
        out = version_converter.convert_version(proto, opset)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HirelcError(f"ONNX export: cannot convert the graph to opset {opset}: {msg}") from None
    out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
    del out.graph.value_info[:]  # the shapes the converter inferred on the way: bytes no runtime needs
    return out


def _narrow(t: np.ndarray, name: str, container: str) -> onnx.TensorProto:
    """A packed INT4/UINT4/INT2/UINT2 initializer holding the integer values of ``t`` (which must fit)."""
    lo, hi = _RANGE[container]
    if t.size and (t.min() < lo or t.max() > hi):
        raise RuntimeError(f"{name}: values [{t.min()}, {t.max()}] do not fit {container}")
    packed = K.pack_int(torch.from_numpy(t.astype(np.int8 if lo < 0 else np.uint8)), _WIDTH[container])
    return helper.make_tensor(name, _ONNX_TYPE[container], list(t.shape), packed.numpy().tobytes(), raw=True)


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Rewriter:
    """Adds fresh initializers and constant-only nodes to a graph; shared (de-duplicated) tensors never change."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes: list[onnx.NodeProto] = []  # prepended: they read initializers only

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add(self, name: str, make) -> str:
        if name not in self.inits:
            t = make(name)
            self.graph.initializer.append(t)
            self.inits[name] = t
        return name

    def finish(self) -> None:
        if self.nodes:
            rest = list(self.graph.node)
            del self.graph.node[:]
            self.graph.node.extend(self.nodes + rest)
        _prune_unused(self.graph)


def _plain_node(rw: _Rewriter, name: str, node: onnx.NodeProto, container: str) -> None:
    """INT4/UINT4 codes (and zero points) straight into ``DequantizeLinear``."""
    for slot, suffix in ((0, "qweight"), (2, "zero_point")):
        if slot < len(node.input) and node.input[slot]:
            src = rw.array(node.input[slot])
            node.input[slot] = rw.add(f"{name}.{suffix}.{container}", lambda n, a=src: _narrow(a, n, container))


# Widest integer weight that ONNX Runtime's U8S8 kernels multiply without int16 saturation on CPUs without
# VNNI (two products of uint8 activations summed in int16: 2 * 255 * 64 < 2**15).
SATURATION_FREE = 64


def _fold_node(rw: _Rewriter, name: str, node: onnx.NodeProto, bits: int, int2: bool = False) -> str:
    """Rewrite one weight ``DequantizeLinear`` so ORT runs an integer kernel; returns the form used.

    Forms (all exact; every op before the ``DequantizeLinear`` reads constants only, so ORT's constant folding
    turns them into one int8 tensor at session creation, before QDQ fusion):

    * ``int4-cast``: 2..4-bit codes (symmetric, or asymmetric codes minus their zero point when that fits
      [-8, 7]) packed as INT4 -> ``Cast(INT8)`` -> DQ with zero point 0;
    * ``uint4-sub``: other asymmetric 2..4-bit codes as UINT4, widened and shifted in int32 (ORT's CPU ``Sub``
      has no int8 kernel) -> ``Cast(INT8)`` -> DQ with zero point 0;
    * ``int2-cast`` / ``uint2-sub``: the same for 2-bit codes in INT2/UINT2 when ``int2`` (opset >= 25);
    * ``int8``: 5..8-bit symmetric codes, or asymmetric ones minus their zero point when that stays within
      +-64 (no U8S8 saturation);
    * ``uint8``: asymmetric 8-bit codes that do not fit, kept with their zero point (ORT's U8U8 kernels);
    * ``*-blocked``: per-group codes stay as :func:`_plain_node` writes them (blocked DQ; 4-bit linear layers
      fuse into ``MatMulNBits``).
    """
    container = K.container_bits(bits)
    codes = rw.array(node.input[0])
    signed = codes.dtype == np.int8
    if _attr(node, "block_size"):
        if container == 4:
            _plain_node(rw, name, node, "int4" if signed else "uint4")
        return ("int" if signed else "uint") + f"{container}-blocked"
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    zp = rw.array(zp_name) if zp_name else np.zeros((), codes.dtype)
    bshape = [1] * codes.ndim
    if zp.ndim == 1:
        bshape[_attr(node, "axis", 1) % codes.ndim] = zp.size
    diff = codes.astype(np.int32) - zp.astype(np.int32).reshape(bshape if zp.ndim else ())
    width = _packed_width(name, diff, zp.size, bits, int2) if container == 4 else 8
    if width < 8 and _fits(diff, f"int{width}"):
        rw.add(f"{name}.qweight.int{width}", lambda n: _narrow(diff, n, f"int{width}"))
        form = f"int{width}-cast"
    elif width < 8:
        rw.add(f"{name}.qweight.uint{width}", lambda n: _narrow(codes, n, f"uint{width}"))
        rw.add(f"{name}.zero_point.uint{width}",
               lambda n: _narrow(zp.reshape(bshape if zp.ndim else ()), n, f"uint{width}"))
        form = f"uint{width}-sub"
    elif signed:
        return "int8"
    elif diff.min() >= -SATURATION_FREE and diff.max() <= SATURATION_FREE:
        node.input[0] = rw.add(f"{name}.qweight.int8", lambda n: numpy_helper.from_array(diff.astype(np.int8), n))
        form = "int8"
    else:
        return "uint8"
    shape = "x".join(map(str, zp.shape)) or "scalar"
    zeros = rw.add(f"hirelc.zero_point.int8.{shape}",  # one shared tensor of zeros per shape
                   lambda n: numpy_helper.from_array(np.zeros(zp.shape, np.int8), n))
    if form != "int8":
        chain = fold_chain(name, form.endswith("-sub"), width)
        have = {o for n in rw.nodes for o in n.output}
        rw.nodes.extend(n for n in chain if n.output[0] not in have)
        node.input[0] = chain[-1].output[0]
    if zp_name:
        node.input[2] = zeros
    else:
        node.input.append(zeros)
    return form


def _fits(t: np.ndarray, container: str) -> bool:
    lo, hi = _RANGE[container]
    return bool(t.min() >= lo and t.max() <= hi)


INT2_ZERO_POINT_BYTES = 40  # name and header of the UINT2 zero-point initializer an asymmetric 2-bit layer gets


def _packed_width(name: str, diff: np.ndarray, zp_size: int, bits: int, int2: bool) -> int:
    """4, or 2 for 2-bit codes when ``int2`` and INT2/UINT2 make the file smaller: asymmetric codes whose
    difference to their zero point leaves [-2, 1] need the longer ``uint2-sub`` chain (and a zero-point tensor),
    where INT4 takes the difference with a single ``Cast``; a small layer does not save those bytes."""
    if not int2 or bits > 2 or _fits(diff, "int2"):
        return 2 if int2 and bits <= 2 else 4
    # the longer chain, and the zero points as an initializer of their own
    extra = fold_graph_bytes(name, True) - fold_graph_bytes(name, False) + INT2_ZERO_POINT_BYTES + zp_size / 4
    return 2 if diff.size / 4 > extra else 4


def fold_chain(name: str, asym: bool, width: int = 4) -> list[onnx.NodeProto]:
    """The constant-only nodes that widen layer ``name``'s packed ``width``-bit codes to int8 (see
    :func:`_fold_node`)."""
    w = f"{name}.qweight"
    if not asym:
        return [helper.make_node("Cast", [f"{w}.int{width}"], [f"{w}.as_int8"], to=TensorProto.INT8)]
    z = f"{name}.zero_point"
    return [helper.make_node("Cast", [f"{w}.uint{width}"], [f"{w}.as_int32"], to=TensorProto.INT32),
            helper.make_node("Cast", [f"{z}.uint{width}"], [f"{z}.as_int32"], to=TensorProto.INT32),
            helper.make_node("Sub", [f"{w}.as_int32", f"{z}.as_int32"], [f"{w}.centered_int32"]),
            helper.make_node("Cast", [f"{w}.centered_int32"], [f"{w}.as_int8"], to=TensorProto.INT8)]


def fold_graph_bytes(name: str, asym: bool) -> int:
    """Bytes the ``fold`` form adds to the file for one 4-bit layer: its widening nodes (2 bytes of framing each;
    a 2-bit layer's INT2 chain has names of the same length)."""
    return sum(n.ByteSize() + 2 for n in fold_chain(name, asym))


WEIGHT_FORMATS = ("fold", "plain")


def narrow_weights(graph: onnx.GraphProto, model: nn.Module, weight_format: str = "fold",
                   int2: bool = False) -> dict[str, str]:
    """Rewrite every quantized layer's weight codes in ``weight_format``; returns layer -> form written.

    ``fold`` (default): every format runs on ONNX Runtime's integer kernels (see :func:`_fold_node`); with
    ``int2`` (opset >= 25) 2-bit codes are stored as INT2/UINT2.
    ``plain``: 2..4-bit codes (and zero points) as INT4/UINT4 straight into ``DequantizeLinear``, for runtimes
    that dequantize natively; ONNX Runtime's CPU EP runs those layers as float kernels. It keeps 2-bit codes in
    INT4 at every opset: ONNX Runtime 1.32 fuses an INT2 ``DequantizeLinear`` into ``QLinearConv``, which then
    rejects the INT2 weight, so no session can be created.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise HirelcError(f"unknown weight format {weight_format!r} (use {', '.join(WEIGHT_FORMATS)})")
    layers = quant_layers(model)
    rw = _Rewriter(graph)
    forms: dict[str, str] = {}
    for name, nodes in map_weight_dequantizers(graph, model).items():
        q = layers[name]
        for node in nodes:
            for slot in (0, 2):
                if slot < len(node.input) and node.input[slot] and node.input[slot] not in rw.inits:
                    raise RuntimeError(f"export: {name}: DequantizeLinear input {node.input[slot]!r} is not constant")
            if weight_format == "fold":
                forms[name] = _fold_node(rw, name, node, q.bits, int2)
                continue
            signed = q.qweight.dtype == torch.int8
            container = _CONTAINERS[(K.container_bits(q.bits), signed)]
            forms[name] = container
            if container in _ONNX_TYPE:
                _plain_node(rw, name, node, container)
    rw.finish()
    return forms


def check_export_options(opset: int, weight_format: str) -> None:
    """Reject an opset or weight format before anything is exported or written (whether the installed ONNX
    Runtime runs the graph is checked on the graph itself, before it is saved: :func:`check_loads`)."""
    if weight_format not in WEIGHT_FORMATS:
        raise HirelcError(f"unknown weight format {weight_format!r} (use {', '.join(WEIGHT_FORMATS)})")
    lo, hi = EXPORT_OPSETS
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise HirelcError(f"opset {opset!r} is not supported: hirelc exports opsets {lo}..{hi}")
    if opset > onnx.defs.onnx_opset_version() or (opset >= INT2_OPSET and _ONNX_TYPE["int2"] is None):
        raise HirelcError(f"opset {opset} is not supported by the installed onnx {onnx.__version__}: "
                          f"use --opset {TORCHSCRIPT_OPSET} or a newer onnx")


def check_loads(model: onnx.ModelProto, what: str) -> None:
    """The installed ONNX Runtime must be able to load and optimize the graph (one-line error otherwise)."""
    try:
        make_session(model.SerializeToString(), threads=1)
    except HirelcError as e:
        raise HirelcError(f"{what}: {e}") from None


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
                  weight_only: bool = False, weight_format: str = "fold") -> tuple[onnx.ModelProto, dict[str, str]]:
    """The post-processed ONNX graph of a lowered model, in memory, and the form each layer's weight took."""
    check_export_options(opset, weight_format)
    qls = quant_layers(model)
    unfrozen = [n for n, q in qls.items() if not q.frozen]
    if unfrozen:
        raise HirelcError(f"layer(s) {unfrozen[:3]} are not frozen: lower the model (freeze) before export")
    with strip_activation_qdq(model) if weight_only else contextlib.nullcontext():
        proto = _torch_export(model, tuple(input_shape), opset)
    _inline_identities(proto.graph)
    containers = narrow_weights(proto.graph, model, weight_format, int2=opset >= INT2_OPSET) if qls else {}
    return proto, containers


def export_lowered(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                   opset: int = DEFAULT_OPSET, weight_only: bool = False, weight_format: str = "fold",
                   check_runtime: bool = True) -> dict:
    """Export a lowered (frozen) model as ``path``: integer initializers + DequantizeLinear, Q/DQ activations.

    ``weight_only`` drops the activation Q/DQ pairs for this export (see :func:`strip_activation_qdq`);
    ``weight_format`` is how low-bit codes are written (:func:`narrow_weights`). The graph must pass the ONNX
    checker and load in the installed ONNX Runtime (``check_runtime``; internal exports that are timed or
    measured right away skip it), else nothing is written.
    Returns a summary: ``path``, ``bytes``, ``opset``, ``dequantize_linear``, ``quantize_linear``,
    ``op_counts``, ``initializer_dtypes``, ``layers`` (name -> bits, scheme, granularity, kind, shape,
    container: the form written), ``weight_only`` and ``weight_format``.
    """
    proto, containers = lowered_graph(model, input_shape, opset=opset, weight_only=weight_only,
                                      weight_format=weight_format)
    check_onnx(proto, str(path))
    if check_runtime:
        check_loads(proto, str(path))
    size = _save(proto, path)
    layers = {
        n: {"bits": q.bits, "scheme": q.scheme, "granularity": q.granularity,
            "kind": "conv" if isinstance(q, QConv2d) else "linear", "shape": list(q.qweight.shape),
            "container": containers[n]}
        for n, q in quant_layers(model).items()
    }
    return {"path": str(path), "bytes": size, **graph_summary(proto), "layers": layers, "weight_only": weight_only,
            "weight_format": weight_format}


def _optimized(model: nn.Module, input_shape: tuple[int, ...],
               weight_format: str = "fold") -> tuple[onnx.ModelProto, list[str], list]:
    """Export ``model`` (a frozen copy if still training) and let ORT optimize it (level "extended").

    Returns the narrowed graph, the quantized layers ORT left as float Conv/MatMul/Gemm, and ORT's optimized
    (op_type, node name) list. A float op is traced to its layer through the weight ``DequantizeLinear`` it
    reads (by that node's output name, else by its scale's content), not by its own name: ORT renames the nodes
    it fuses (MatMul + Add -> Gemm).
    """
    if any(not q.frozen for q in quant_layers(model).values()):
        model = copy.deepcopy(model)
        for q in quant_layers(model).values():
            q.freeze()
    proto = _torch_export(model, tuple(input_shape), DEFAULT_OPSET)
    _inline_identities(proto.graph)
    # Map DQ outputs to layers before narrowing (4-bit tensors no longer compare equal to the layers' codes);
    # ORT keeps the output names of the DQ nodes it leaves in place.
    dq_layer = {n.output[0]: name for name, nodes in map_weight_dequantizers(proto.graph, model).items()
                for n in nodes}
    narrow_weights(proto.graph, model, weight_format)
    by_scale: dict[tuple, str] = {}
    for name, q in quant_layers(model).items():
        by_scale.setdefault(_digest(_expected_tensors(q)[1].astype(np.float32)), name)
    opt = optimized_graph(proto.SerializeToString(), level="extended")
    inits = {t.name: t for t in opt.initializer}
    for n in opt.node:  # a DQ that ORT rebuilt under a new name: its scale's content names the layer
        if (n.op_type == "DequantizeLinear" and n.output[0] not in dq_layer and n.input[0] in inits
                and len(n.input) > 1 and n.input[1] in inits):
            layer = by_scale.get(_digest(numpy_helper.to_array(inits[n.input[1]])))
            if layer is not None:
                dq_layer[n.output[0]] = layer
    floating = sorted({dq_layer[i] for n in opt.node if n.op_type in FLOAT_OPS for i in n.input if i in dq_layer})
    return proto, floating, [(n.op_type, n.name) for n in opt.node]


def unfused_layers(model: nn.Module, input_shape: tuple[int, ...], weight_format: str = "fold") -> list[str]:
    """Quantized layers that ONNX Runtime (CPU) leaves as float Conv/MatMul/Gemm instead of an integer kernel.

    Typically convs whose output is not quantized again (it feeds a residual ``Add``, a pool or the head):
    ORT only builds ``QLinearConv`` from ``DQ -> Conv -> Q``, so these run in float on weights dequantized at
    every call. Giving them
    an output activation quantizer at lowering time makes them fuse. Call it after activation calibration
    (uncalibrated layers export without Q/DQ, so nothing fuses); layers still in quantization-aware training
    are checked on a frozen copy.
    """
    return _optimized(model, input_shape, weight_format)[1]


def integer_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many adds ONNX Runtime (CPU) runs as integer ``QLinearAdd`` in the exported model."""
    return sum(op == "QLinearAdd" for op, _ in _optimized(model, input_shape)[2])


class OrtProbe:
    """ONNX Runtime (CPU) as the runtime lowering asks where quantizers pay (the ``probe`` of
    :func:`hirelc.lower.lower_model`): which quantized layers it leaves in float, how many adds it runs on
    integers."""

    def unfused_layers(self, model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
        return unfused_layers(model, input_shape)

    def integer_adds(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        return integer_adds(model, input_shape)


ORT_PROBE = OrtProbe()


def export_fp32(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                opset: int = DEFAULT_OPSET) -> dict:
    """Export the float baseline (BatchNorm folded by the exporter) as one ONNX file, atomically."""
    proto = _torch_export(model, tuple(input_shape), opset)
    check_onnx(proto, str(path))
    size = _save(proto, path)
    return {"path": str(path), "bytes": size, **graph_summary(proto)}
