import random

import pytest
import torch

from hirelc.errors import HirelcError
from hirelc.kernels import container_bits, pack_int, packed_nbytes, unpack_int

WIDTHS = [1, 2, 4, 8]
LENGTHS = [0, 1, 2, 3, 7, 8, 9, 31, 64, 129, 1001]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_pack_unpack_identity(bits, signed, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    dtype = torch.int8 if signed else torch.uint8
    q = torch.randint(lo, hi, (n,), generator=g).to(dtype)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits)
    out = unpack_int(packed, bits, n, signed)
    assert out.dtype == dtype and out.shape == (n,)
    assert torch.equal(out, q)


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_flattens_any_shape(bits):
    q = torch.randint(0, 2**bits, (3, 5, 2), dtype=torch.uint8)
    assert torch.equal(pack_int(q, bits), pack_int(q.reshape(-1), bits))
    assert torch.equal(unpack_int(pack_int(q, bits), bits, q.numel(), False), q.reshape(-1))


@pytest.mark.parametrize(
    "values, bits, expected",
    [
        ([1, 2], 4, [0x21]),
        ([1, 2, 3], 4, [0x21, 0x03]),  # last byte zero-padded
        ([-1, 7], 4, [0x7F]),  # -1 is 0xF in 4-bit two's complement
        ([-8, 0], 4, [0x08]),
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0x8D, 0x01]),
        ([3, 0, 1, 2], 2, [0b10010011]),
        ([-1, -2, 1, 0], 2, [0b00011011]),
        ([0xAB, 0x01], 8, [0xAB, 0x01]),
        ([-1, -128, 127], 8, [0xFF, 0x80, 0x7F]),
    ],
)
def test_known_bytes(values, bits, expected):
    packed = pack_int(torch.tensor(values), bits)
    assert packed.tolist() == expected
    signed = min(values) < 0
    assert unpack_int(packed, bits, len(values), signed).tolist() == values


def test_unpack_sign_extension():
    packed = torch.tensor([0xF8, 0x7F], dtype=torch.uint8)
    assert unpack_int(packed, 4, 4, signed=True).tolist() == [-8, -1, -1, 7]
    assert unpack_int(packed, 4, 4, signed=False).tolist() == [8, 15, 15, 7]
    assert unpack_int(packed, 1, 3, signed=True).tolist() == [0, 0, 0]
    assert unpack_int(packed, 1, 8, signed=True).tolist()[3:] == [-1, -1, -1, -1, -1]


def test_unpack_ignores_trailing_bytes_and_rejects_short_input():
    packed = torch.tensor([0x21, 0x43, 0xFF], dtype=torch.uint8)
    assert unpack_int(packed, 4, 3, False).tolist() == [1, 2, 3]
    with pytest.raises(HirelcError):
        unpack_int(packed, 4, 7, False)


@pytest.mark.parametrize("bits", [0, 3, 5, 6, 7, 16])
def test_bad_pack_width(bits):
    with pytest.raises(HirelcError):
        pack_int(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(HirelcError):
        unpack_int(torch.zeros(4, dtype=torch.uint8), bits, 4, False)


def test_packed_nbytes():
    for _ in range(200):
        n, bits = random.randrange(0, 5000), random.choice(WIDTHS)
        assert packed_nbytes(n, bits) == -(-n * bits // 8)
    assert packed_nbytes(0, 4) == 0
    assert packed_nbytes(1, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(3, 4) == 2
    assert packed_nbytes(5, 8) == 5


@pytest.mark.parametrize("bits, width", [(2, 4), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 8)])
def test_container_bits(bits, width):
    assert container_bits(bits) == width


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_container_bits_rejects(bits):
    with pytest.raises(HirelcError):
        container_bits(bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_sub_container_codes_fit_their_container(bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    q = torch.arange(lo, hi).to(torch.int8 if signed else torch.uint8)
    width = container_bits(bits)
    assert torch.equal(unpack_int(pack_int(q, width), width, q.numel(), signed), q)
