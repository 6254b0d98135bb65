"""Weight quantization schemes and granularities: how many scales a weight has and along which axes.

Plain frozen values shared by the kernels and every layer above them; :mod:`hirelc.policy` builds on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Union

from hirelc.errors import HirelcError


class Scheme(str, Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero-point) for the whole weight."""

    def to_json(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (axis 0 of the weight in PyTorch layout)."""

    axis: int = 0

    def to_json(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per block of ``group_size`` consecutive input channels, per output channel.

    Maps to ONNX ``DequantizeLinear`` with ``block_size=group_size`` along the input dimension.
    """

    group_size: int

    def __post_init__(self):
        if self.group_size < 2:
            raise HirelcError(f"per-group granularity needs a group size >= 2, got {self.group_size}")

    def to_json(self) -> str:
        return f"per-group:{self.group_size}"


Granularity = Union[PerTensor, PerChannel, PerGroup]


def parse_granularity(text: str) -> Granularity:
    """Parse ``per-tensor`` | ``per-channel`` | ``per-group:G`` (``G`` an integer)."""
    t = str(text).strip().lower()
    if t == "per-tensor":
        return PerTensor()
    if t == "per-channel":
        return PerChannel()
    if t.startswith("per-group"):
        _, _, g = t.partition(":")
        try:
            return PerGroup(int(g))
        except ValueError:
            raise HirelcError(f"bad granularity {text!r}: per-group needs a size, e.g. per-group:32") from None
    raise HirelcError(f"unknown granularity {text!r} (use per-tensor, per-channel or per-group:G)")
