"""The layer abstraction that decouples the search from the network.

This is the only module that walks a model's module tree. It produces, for any model:

* a :class:`LayerSpec` for every ``Conv2d`` / ``Linear`` (name, kind, shapes, params, MACs at the input size);
* their grouping into **blocks**. Generic rule, no model-specific tables: a layer belongs to its nearest
  ancestor whose name ends in an integer index (an element of a ``Sequential``/``ModuleList``, which is how
  timm stores ResNet BasicBlock/Bottleneck, MobileNet InvertedResidual and ViT Block); a layer with no such
  ancestor belongs to its top-level child (``conv1``, ``patch_embed``, ``head`` ...);
* the **coupled pruning groups** from torch-pruning's dependency graph: layers whose output channels must be
  removed together (residual adds, depthwise convs following their expansion). A group is prunable from the
  search's point of view when none of its layers is the classifier; attention ``qkv`` layers are pruned by
  whole heads. A group whose layers span several blocks is a **residual stream** (the channels a stage's
  residual adds share, or a ViT's embedding dimension): it is marked ``stream`` and is offered only when a
  trial prune of one channel on a copy of the model still runs, so models whose stream torch-pruning cannot
  follow keep it whole.

Grouped convolutions (``groups > 1`` but not depthwise: RegNet, ResNeXt, NFNet) are kept out of pruning.
Cutting one correctly means keeping every group equally wide (whole groups removed with ``groups`` lowered,
or the same channels from each group) on its inputs and its outputs at once. torch-pruning does neither: it
couples a conv's inputs to its outputs for depthwise convs only and slices a grouped conv's per-group input
weights with whole-layer indices, which is an index error (RegNet: "INDICES element is out of DATA bounds")
or, where the indices happen to fit, silently the wrong weights. Teaching hirelc to cut whole groups would
mean new rules in the keep ratios, the channel rounding of :func:`hirelc.cost.kept_channels` and the
search's masks; instead every prune group whose channels a grouped conv writes (it is a member) or reads (it
is one of the layers whose input channels the group's cut removes) is not prunable: ``prune_group`` -1, its
layers marked ``grouped_tied``. The search space, policy resolution, the cost model and the lowering all go
by ``prunable``, so none of them offers or makes a cut there and predicted storage stays what the lowered
model holds. The rest of such a model (stem, residual streams, convs that feed plain convs) prunes as
usual; :func:`hirelc.lower.lower_model` names the layers kept whole for this reason (``unprunable_grouped``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hirelc.errors import HirelcError


@dataclass(frozen=True)
class LayerSpec:
    """What the search sees of one compressible layer (no nn.Module inside)."""

    name: str
    kind: str  # "conv", "dwconv", "pwconv", "linear", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "classifier"
    in_features: int  # input channels (per group for grouped convs: weight.shape[1])
    out_features: int
    kernel: tuple[int, ...]
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates for one input at the reference input size
    block: str
    prune_group: int  # -1 when the layer's outputs are not prunable on their own
    prunable: bool = False  # the search may choose keep_ratio < 1 for this layer
    input_group: int = -1  # prune group whose keep ratio shrinks this layer's input channels (-1: none)
    folds_bn: bool = False  # a BatchNorm consumes this conv's output alone: lowering folds it into a bias
    num_heads: int = 0  # attention heads for attn_qkv (pruned by whole heads)
    stream: bool = False  # the layer's prune group is a residual stream spanning several blocks
    grouped_tied: bool = False  # kept whole: a grouped (non-depthwise) conv writes or reads its output channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel"] = list(self.kernel)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        return cls(**{**d, "kernel": tuple(d["kernel"])})


@dataclass(frozen=True)
class Topology:
    """Layers, blocks and prune groups of one model at one input size."""

    layers: tuple[LayerSpec, ...]
    input_shape: tuple[int, ...]  # (1, C, H, W) used for MACs and the dependency graph
    classifier: str  # qualified name of the output layer (never pruned at its output)

    @property
    def blocks(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in self.layers:
            out.setdefault(s.block, []).append(s.name)
        return out

    @property
    def unprunable_grouped(self) -> list[str]:
        """Layers whose output channels are kept whole because a grouped conv writes or reads them."""
        return [s.name for s in self.layers if s.grouped_tied]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layers]

    def spec(self, name: str) -> LayerSpec:
        for s in self.layers:
            if s.name == name:
                return s
        raise HirelcError(f"unknown layer {name!r}")

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "classifier": self.classifier,
            "layers": [s.to_dict() for s in self.layers],
        }


def block_of(name: str) -> str:
    """The block a layer belongs to (see the module docstring for the rule)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return parts[0]


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "num_heads", None), int) and isinstance(getattr(mod, "qkv", None), nn.Linear)


def _kind(name: str, mod: nn.Module, parent: nn.Module | None, classifier: str) -> str:
    if name == classifier:
        return "classifier"
    if isinstance(mod, nn.Conv2d):
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
            return "dwconv"
        return "pwconv" if tuple(mod.kernel_size) == (1, 1) else "conv"
    leaf = name.rsplit(".", 1)[-1]
    if parent is not None and _is_attention(parent):
        if mod is parent.qkv:
            return "attn_qkv"
        return "attn_proj" if leaf == "proj" else "linear"
    if leaf in ("fc1", "fc2") and ".mlp." in f".{name}":
        return f"mlp_{leaf}"
    return "linear"


def _compressible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _shape_of(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Output shape of every conv/linear at ``input_shape`` and their execution order."""
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []
    for n, m in _compressible(model):
        def hook(_m, _inp, out, n=n):
            if n not in shapes:
                order.append(n)
            shapes[n] = tuple(out.shape)

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    except Exception as e:  # a model that cannot run at this size is a user problem (wrong img size)
        raise HirelcError(f"the model does not run on inputs of shape {tuple(input_shape)}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes, order


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (a dotted path) by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, input_shape: tuple[int, ...], single: bool = True) -> list[tuple[str, str]]:
    """(conv, BatchNorm2d) name pairs where the BN directly and alone consumes the conv's output.

    Pairs are found by running the model once and matching tensor identity (conv output is the BN input),
    which works for any architecture; a conv read by two BNs is left out (kept with ``single=False``).
    """
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda _m, _i, out, n=n: produced.__setitem__(id(out), n)))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(_m, inp, n=n):
                src = produced.get(id(inp[0]))
                if src is not None:
                    pairs.append((src, n))

            hooks.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not single:
        return pairs
    consumers: dict[str, int] = {}
    for c, _ in pairs:
        consumers[c] = consumers.get(c, 0) + 1
    return [(c, b) for c, b in pairs if consumers[c] == 1]


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]):
    """torch-pruning's dependency graph of ``model`` (built on a zero input of ``input_shape``)."""
    import torch_pruning as tp  # heavy: imported when a dependency graph is built

    was_training = model.training
    model.eval()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(input_shape))
    model.train(was_training)
    return dg


def out_pruning_fn(mod: nn.Module):
    import torch_pruning as tp  # heavy: imported when a dependency graph is built

    return tp.prune_conv_out_channels if isinstance(mod, nn.Conv2d) else tp.prune_linear_out_channels


def coupled_members(dg, mod: nn.Module, names: dict[nn.Module, str]) -> tuple[set[str], set[str]]:
    """Conv/linear layers whose outputs (resp. inputs) are pruned together with ``mod``'s outputs."""
    group = dg.get_pruning_group(mod, out_pruning_fn(mod), idxs=[0])
    outs, ins = set(), set()
    for dep, _ in group:
        tm = dep.target.module
        if isinstance(tm, (nn.Conv2d, nn.Linear)) and tm in names:
            handler = getattr(dep.handler, "__name__", str(dep.handler))
            (outs if "out_channels" in handler else ins).add(names[tm])
    outs.add(names[mod])
    return outs, ins


def build_topology(model: nn.Module, input_shape: tuple[int, ...]) -> Topology:
    """LayerSpecs, blocks and coupled prune groups of ``model`` for inputs of ``input_shape`` (1, C, H, W)."""
    input_shape = tuple(int(v) for v in input_shape)
    shapes, order = _shape_of(model, input_shape)
    bn_fed = {conv for conv, _ in conv_bn_pairs(model, input_shape, single=False)}
    mods = dict(_compressible(model))
    if not order:
        raise HirelcError("the model has no Conv2d or Linear layer to compress")
    classifier = order[-1]
    # The dependency graph is built once, on a private copy: reading the groups leaves it intact, and the
    # trial prunes of residual streams below then run on the same copy and graph.
    work = copy.deepcopy(model).eval()
    work_mods = dict(_compressible(work))
    work_names = {m: n for n, m in work_mods.items()}
    dg = dependency_graph(work, input_shape)

    # Coupled groups over output channels; a group is prunable when none of its layers is the classifier.
    # Its leader (first non-depthwise member in execution order) carries the keep ratio.
    group_of: dict[str, int] = {}
    groups: list[tuple[list[str], set[str]]] = []
    for n in order:
        if n in group_of:
            continue
        outs, ins = coupled_members(dg, work_mods[n], work_names)
        members = [m for m in order if m in outs]
        for m in members:
            group_of[m] = len(groups)
        groups.append((members, ins))

    prunable_leader: dict[int, str] = {}
    streams: set[int] = set()
    grouped_tied: set[int] = set()  # groups a grouped conv writes or reads: kept whole (module docstring)
    for gid, (members, ins) in enumerate(groups):
        if classifier in members:
            continue
        leader = next((m for m in members if not _is_depthwise(mods[m])), None)
        if leader is None:
            continue
        if any(is_grouped_conv(mods[m]) for m in (*members, *ins) if m in mods):
            grouped_tied.add(gid)
            continue
        prunable_leader[gid] = leader
        if len({block_of(m) for m in members}) > 1:
            streams.add(gid)
    leaders = {g: prunable_leader[g] for g in sorted(streams)}
    for gid in _unprunable_streams(model, input_shape, leaders, work, dg):
        del prunable_leader[gid]
        streams.discard(gid)
    input_group: dict[str, int] = {}
    for gid in prunable_leader:
        for m in groups[gid][1]:
            input_group.setdefault(m, gid)

    specs = []
    for n in order:
        m = mods[n]
        parent = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else None
        kind = _kind(n, m, parent, classifier)
        out_shape = shapes[n]
        if isinstance(m, nn.Conv2d):
            kernel = tuple(int(k) for k in m.kernel_size)
            in_f, out_f = m.in_channels // m.groups, m.out_channels
            macs = int(torch.tensor(out_shape).prod()) * in_f * kernel[0] * kernel[1]
        else:
            kernel = ()
            in_f, out_f = m.in_features, m.out_features
            macs = int(torch.tensor(out_shape[:-1]).prod()) * in_f * out_f
        gid = group_of[n]
        specs.append(
            LayerSpec(
                name=n,
                kind=kind,
                in_features=int(in_f),
                out_features=int(out_f),
                kernel=kernel,
                params=sum(p.numel() for p in m.parameters(recurse=False)),
                macs=int(macs),
                block=block_of(n),
                prune_group=gid if gid in prunable_leader else -1,
                prunable=prunable_leader.get(gid) == n,
                num_heads=int(parent.num_heads) if kind == "attn_qkv" else 0,
                input_group=input_group.get(n, -1),
                folds_bn=n in bn_fed,
                stream=gid in streams,
                grouped_tied=gid in grouped_tied,
            )
        )
    return Topology(layers=tuple(specs), input_shape=input_shape, classifier=classifier)


def _unprunable_streams(model: nn.Module, input_shape: tuple[int, ...], leaders: dict[int, str],
                        work: nn.Module, dg) -> list[int]:
    """Stream groups (id -> leader) that torch-pruning cannot prune on this model.

    Each group loses one channel on ``work`` (a private copy of ``model`` with its dependency graph ``dg``),
    which must then still run and produce the same output shape; a group that fails (an unusual parameter
    torch-pruning does not see, a reshape to a fixed width) is reported and the copy rebuilt from ``model``.
    """
    if not leaders:
        return []
    bad: list[int] = []
    with torch.no_grad():
        ref_shape = tuple(work(torch.zeros(input_shape)).shape)
    for gid, leader in leaders.items():
        if work is None:
            work = copy.deepcopy(model).eval()
            dg = dependency_graph(work, input_shape)
        mod = work.get_submodule(leader)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dg.get_pruning_group(mod, out_pruning_fn(mod), idxs=[0]).prune()
                with torch.no_grad():
                    ok = tuple(work(torch.zeros(input_shape)).shape) == ref_shape
        except Exception:
            ok = False
        if not ok:
            bad.append(gid)
            work = dg = None
    return bad


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped_conv(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (its groups are wider than one channel on some side)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def topology_summary(topo: Topology) -> dict:
    return {
        "layers": len(topo.layers),
        "blocks": len(topo.blocks),
        "prunable_layers": sum(s.prunable for s in topo.layers),
        "stream_groups": len({s.prune_group for s in topo.layers if s.stream and s.prunable}),
        "grouped_tied_layers": sum(s.grouped_tied for s in topo.layers),
        "params": sum(s.params for s in topo.layers),
        "macs": sum(s.macs for s in topo.layers),
    }
