"""Per-layer compression policies: what each layer's bits, keep ratio, scheme and granularity are.

Everything is keyed by the layer's qualified name, so a policy can be saved as JSON, diffed, and applied to a
fresh copy of the model. A :class:`Policy` is a list of rules (fnmatch patterns over layer names, last match
wins) plus a default; :meth:`Policy.resolve` turns it into one :class:`LayerPolicy` per layer and validates the
result against the model's :class:`~hirelc.topology.LayerSpec` list.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hirelc.errors import HirelcError
from hirelc.kernels.granularity import (  # noqa: F401 (re-exported: policies are written in these terms)
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    Scheme,
    parse_granularity,
)
from hirelc.runs import atomic_write_text

if TYPE_CHECKING:
    from hirelc.topology import LayerSpec

POLICY_VERSION = 1
ALLOWED_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class LayerPolicy:
    """How one layer is compressed. ``bits=None`` keeps the weight in float."""

    bits: int | None = 8
    keep_ratio: float = 1.0
    scheme: Scheme = Scheme.SYMMETRIC
    granularity: Granularity = field(default_factory=PerChannel)

    def __post_init__(self):
        if self.bits is not None and self.bits not in ALLOWED_BITS:
            raise HirelcError(f"bits must be one of {ALLOWED_BITS} or float, got {self.bits}")
        if not (0.0 < float(self.keep_ratio) <= 1.0):
            raise HirelcError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not isinstance(self.scheme, Scheme):
            object.__setattr__(self, "scheme", _parse_scheme(self.scheme))
        if isinstance(self.granularity, str):
            object.__setattr__(self, "granularity", parse_granularity(self.granularity))

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def to_dict(self) -> dict:
        return {
            "bits": "float" if self.bits is None else self.bits,
            "keep_ratio": round(float(self.keep_ratio), 6),
            "scheme": self.scheme.value,
            "granularity": self.granularity.to_json(),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "policy") -> "LayerPolicy":
        if not isinstance(d, dict):
            raise HirelcError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"bits", "keep_ratio", "scheme", "granularity"}
        if unknown:
            raise HirelcError(f"{where}: unknown field(s) {sorted(unknown)}")
        bits = d.get("bits", 8)
        if bits in ("float", "fp32", None):
            bits = None
        elif not isinstance(bits, int) or isinstance(bits, bool):
            raise HirelcError(f"{where}: bits must be an integer or 'float', got {bits!r}")
        keep = d.get("keep_ratio", 1.0)
        if not isinstance(keep, (int, float)) or isinstance(keep, bool):
            raise HirelcError(f"{where}: keep_ratio must be a number, got {keep!r}")
        try:
            return cls(
                bits=bits,
                keep_ratio=float(keep),
                scheme=_parse_scheme(d.get("scheme", "symmetric")),
                granularity=parse_granularity(d.get("granularity", "per-channel")),
            )
        except HirelcError as e:
            raise HirelcError(f"{where}: {e}") from None


def _parse_scheme(s) -> Scheme:
    try:
        return Scheme(str(s.value if isinstance(s, Scheme) else s).lower())
    except ValueError:
        raise HirelcError(f"unknown scheme {s!r} (use symmetric or asymmetric)") from None


FLOAT = LayerPolicy(bits=None)


FORMAT_KEYS = ("w8", "w8-asym", "w4", "w4-asym", "w4-group", "w4-asym-group")


def format_key(lp: LayerPolicy) -> str:
    """The kernel-deciding weight format of a quantized layer: ``w{8,4}[-asym][-group]`` (``fp32`` when float).

    ``w8`` holds 5..8-bit codes, ``w4`` 2..4-bit ones; the latency table times one layer per format.
    """
    if lp.bits is None:
        return "fp32"
    key = "w4" if lp.bits <= 4 else "w8"
    if lp.scheme is Scheme.ASYMMETRIC:
        key += "-asym"
    if isinstance(lp.granularity, PerGroup):
        key += "-group"
    return key


def check_layer(spec: "LayerSpec", lp: LayerPolicy) -> str | None:
    """Why ``lp`` cannot be applied to ``spec`` (None when it can): the export could not represent it."""
    if isinstance(lp.granularity, PerGroup) and lp.quantized:
        if lp.bits > 4:
            return ("per-group scales need 2..4-bit weights (ONNX Runtime's 8-bit integer kernels, QLinearConv and "
                    "MatMulIntegerToFloat, take only per-tensor or per-channel scales)")
        if spec.kind == "dwconv":
            return "per-group granularity on a depthwise conv (one input channel per group)"
        if spec.in_features % lp.granularity.group_size != 0:
            return f"group size {lp.granularity.group_size} does not divide the input dim {spec.in_features}"
    if lp.keep_ratio < 1.0 and not spec.prunable:
        if spec.prune_group >= 0:
            return ("this layer's output channels are pruned with their group (a residual stream or a depthwise "
                    "conv); set keep_ratio on the group's leading layer")
        return "this layer's output channels cannot be pruned (they feed the classifier or are tied)"
    return None


def uniform_policy(specs: list["LayerSpec"], bits: int | None, keep: float, scheme: Scheme = Scheme.SYMMETRIC,
                   granularity: Granularity | None = None) -> dict[str, LayerPolicy]:
    """The same choice for every layer where valid (non-prunable layers keep 1.0; invalid groups -> per-channel)."""
    out = {}
    for s in specs:
        lp = LayerPolicy(bits, keep if s.prunable else 1.0, scheme, granularity or PerChannel())
        if check_layer(s, lp):
            lp = replace(lp, granularity=PerChannel())
        out[s.name] = lp
    return out


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


@dataclass(frozen=True)
class Policy:
    """Rules ``(pattern, LayerPolicy)`` applied in order over layer names (last match wins), plus a default."""

    default: LayerPolicy = field(default_factory=LayerPolicy)
    rules: tuple[tuple[str, LayerPolicy], ...] = ()
    name: str = "custom"

    def for_layer(self, layer_name: str) -> LayerPolicy:
        return self._match(layer_name)[0]

    def _match(self, layer_name: str) -> tuple[LayerPolicy, str | None]:
        """The policy for ``layer_name`` and the rule pattern that chose it (None: the default)."""
        chosen, by = self.default, None
        for pattern, lp in self.rules:
            if fnmatch.fnmatchcase(layer_name, pattern):
                chosen, by = lp, pattern
        return chosen, by

    def resolve(self, specs: list["LayerSpec"]) -> dict[str, LayerPolicy]:
        """One LayerPolicy per layer, validated against the layers.

        Rules are strict: an exact-name rule must name a real layer, and a rule that asks for something the
        layer cannot do (prune a non-prunable layer, a group size that does not divide its input dim, per-group
        on a depthwise conv or with more than 4 bits) raises, naming the layer. A glob rule's keep ratio passes over the layers that
        follow a group (their channels are cut by the group's leading layer). The default is a blanket: where
        it cannot apply, the layer keeps all its channels and falls back to per-channel scales.
        """
        names = {s.name for s in specs}
        for pattern, _ in self.rules:
            if not _is_glob(pattern) and pattern not in names:
                raise HirelcError(f"policy names unknown layer {pattern!r}")
        out: dict[str, LayerPolicy] = {}
        for s in specs:
            lp, by = self._match(s.name)
            follower = s.prune_group >= 0 and not s.prunable
            if lp.keep_ratio < 1.0 and not s.prunable and (by is None or (follower and _is_glob(by))):
                lp = LayerPolicy(lp.bits, 1.0, lp.scheme, lp.granularity)
            if by is None and isinstance(lp.granularity, PerGroup) and check_layer(s, lp):
                lp = LayerPolicy(lp.bits, lp.keep_ratio, lp.scheme, PerChannel())
            why = check_layer(s, lp)
            if why:
                raise HirelcError(f"layer {s.name!r}: {why}")
            out[s.name] = lp
        return out

    def unmatched(self, names) -> list[str]:
        """The glob rules that match none of ``names`` (likely a typo: they change nothing)."""
        names = list(names)
        return [p for p, _ in self.rules if _is_glob(p) and not any(fnmatch.fnmatchcase(n, p) for n in names)]

    @classmethod
    def from_layers(cls, layers: dict[str, LayerPolicy], name: str = "custom") -> "Policy":
        """An explicit policy with one rule per layer (what the search writes)."""
        return cls(default=LayerPolicy(), rules=tuple(layers.items()), name=name)

    def to_dict(self) -> dict:
        return {
            "version": POLICY_VERSION,
            "name": self.name,
            "default": self.default.to_dict(),
            "rules": [{"pattern": p, **lp.to_dict()} for p, lp in self.rules],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict):
            raise HirelcError("policy: expected a JSON object")
        if d.get("version") != POLICY_VERSION:
            raise HirelcError(f"policy: unsupported version {d.get('version')!r} (expected {POLICY_VERSION})")
        unknown = set(d) - {"version", "name", "default", "rules"}
        if unknown:  # e.g. a misspelt "rules" would otherwise silently drop every rule
            raise HirelcError(f"policy: unknown field(s) {sorted(unknown)}")
        default = LayerPolicy.from_dict(d.get("default", {}), "policy default")
        rules = []
        for i, r in enumerate(d.get("rules", [])):
            if not isinstance(r, dict) or "pattern" not in r:
                raise HirelcError(f"policy rule {i}: needs a 'pattern'")
            body = {k: v for k, v in r.items() if k != "pattern"}
            rules.append((str(r["pattern"]), LayerPolicy.from_dict(body, f"policy rule {i} ({r['pattern']})")))
        return cls(default=default, rules=tuple(rules), name=str(d.get("name", "custom")))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise HirelcError(f"policy file not found: {p}")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HirelcError(f"policy file {p} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _preset(name: str, bits: int | None, keep: float) -> Policy:
    return Policy(default=LayerPolicy(bits=bits, keep_ratio=keep), name=name)


PRESETS: dict[str, Policy] = {
    "fp32": _preset("fp32", None, 1.0),
    "int8": _preset("int8", 8, 1.0),
    "w6": _preset("w6", 6, 1.0),
    "w4": _preset("w4", 4, 1.0),
    "w4-prune50": _preset("w4-prune50", 4, 0.5),
    "w8-prune30": _preset("w8-prune30", 8, 0.7),
    "w4-group32": Policy(default=LayerPolicy(bits=4, granularity=PerGroup(32)), name="w4-group32"),
}


def get_policy(spec: str) -> Policy:
    """A preset name or a path to a policy JSON file."""
    if spec in PRESETS:
        return PRESETS[spec]
    p = Path(spec)
    if p.suffix == ".json" or p.exists():
        return Policy.load(p)
    raise HirelcError(f"unknown policy {spec!r}: not a preset ({', '.join(PRESETS)}) and not a file")
