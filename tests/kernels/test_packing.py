"""The bit-stream packing of b-bit codes (the layout the quantized kernels read)."""

from __future__ import annotations

import pytest
import torch

from leanlm.kernels.packing import pack_codes, pad_codes, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [8, 24, 64, 100])
def test_pack_unpack_round_trip(bits: int, k: int) -> None:
    torch.manual_seed(k)
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = pack_codes(pad_codes(codes, bits), bits)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_bit_order_is_little_endian_stream() -> None:
    # 4 bits: code k in bits [4k, 4k+4) -> byte 0 = c1<<4 | c0
    assert pack_codes(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3 bits: codes 0..7 -> the 24-bit number Σ k << 3k, little-endian bytes
    word = sum(k << (3 * k) for k in range(8))
    assert pack_codes(torch.arange(8)[None], 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
