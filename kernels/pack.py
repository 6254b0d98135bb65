"""Bit-packing of sub-byte integer codes for compact on-disk storage.

Layout (little-end-first, the same as ONNX INT4/UINT4 tensors): element ``i`` occupies bits
``[(i * bits) % 8, (i * bits) % 8 + bits)`` of byte ``i * bits // 8``, so for 4-bit codes ``[1, 2]``
the byte is ``0x21``. Signed codes are stored as ``bits``-wide two's complement. The last byte is
zero-padded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hirelc.errors import HirelcError

PACK_WIDTHS = (1, 2, 4, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    return (numel * bits + 7) // 8


def container_bits(bits: int) -> int:
    """On-disk container width for ``bits``-bit codes: 4 for 2..4 bits (INT4/UINT4), 8 for 5..8 (INT8/UINT8)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise HirelcError(f"quantization bits must be an integer in 2..8, got {bits!r}")
    return 4 if bits <= 4 else 8


def pack_int(q: Tensor, bits: int) -> Tensor:
    """Pack the low ``bits`` bits of every element of ``q`` (any shape, flattened) into a 1-D uint8 tensor.

    Values wider than ``bits`` are truncated to their low bits; negative values therefore come out
    as ``bits``-wide two's complement.
    """
    per_byte = _per_byte(bits)
    v = q.reshape(-1).to(torch.int32) & ((1 << bits) - 1)  # (N,)
    pad = -v.numel() % per_byte
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    shifts = torch.arange(per_byte, device=v.device, dtype=torch.int32) * bits  # (per_byte,)
    return (v.reshape(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)  # (ceil(N * bits / 8),)


def unpack_int(packed: Tensor, bits: int, numel: int, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int`: the first ``numel`` codes, int8 (sign-extended) if ``signed`` else uint8."""
    per_byte = _per_byte(bits)
    need = packed_nbytes(numel, bits)
    if packed.numel() < need:
        raise HirelcError(f"{numel} {bits}-bit codes need {need} bytes, got {packed.numel()}")
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits  # (per_byte,)
    b = packed.reshape(-1)[:need].to(torch.int32)  # (need,)
    v = ((b.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]  # (numel,)
    if signed:
        v = v - ((v >> (bits - 1)) << bits)  # codes >= 2**(bits-1) are negative
        return v.to(torch.int8)
    return v.to(torch.uint8)


def _per_byte(bits: int) -> int:
    if bits not in PACK_WIDTHS:
        raise HirelcError(f"can only pack {PACK_WIDTHS}-bit codes, got {bits!r}")
    return 8 // bits
