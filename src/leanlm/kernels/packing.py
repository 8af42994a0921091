"""Bit-stream packing of b-bit integer codes into bytes: the layout every quantized kernel reads.

Codes are stored packed as a little-endian bit stream along K: code ``k`` occupies bits
``[b·k, b·k + b)`` of the row's stream (for 3 bits a code may straddle two bytes). Viewed as
little-endian int32 words this is exactly the GPTQ ``qweight`` layout (AutoGPTQ's ``pack``,
including its 3-bit scheme), which is why :mod:`leanlm.quant.formats` only transposes it, and
what the weight-only kernels (:mod:`~leanlm.kernels.quant_gemm`, :mod:`~leanlm.kernels.quant_gemv`)
unpack in registers. It lives with the kernels, below ``quant/``, which imports it.
"""

from __future__ import annotations

import torch

from leanlm.errors import LeanLMError


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., K] (values < 2^bits) into uint8 [..., K·bits/8], little-endian stream."""
    k = codes.shape[-1]
    if (k * bits) % 8:
        raise LeanLMError(f"cannot pack {k} {bits}-bit codes into whole bytes")
    c = codes.to(torch.int64)
    if bits in (2, 4, 8):
        per = 8 // bits
        c = c.reshape(*c.shape[:-1], k // per, per)
        shifts = torch.arange(per, device=c.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # general case (3 bits): 8 codes -> one 24-bit little-endian integer -> 3 bytes
    c = c.reshape(*c.shape[:-1], k // 8, 8)
    word = (c << (torch.arange(8, device=c.device) * bits)).sum(-1)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(bits)], -1)
    return out.reshape(*c.shape[:-2], k * bits // 8).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., K·bits/8] -> uint8 codes [..., K]."""
    mask = 2**bits - 1
    if bits == 8:
        return packed[..., :k]
    if bits in (2, 4):  # byte-wise, in uint8 (30x faster than widening to int64)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> shifts) & mask).reshape(*packed.shape[:-1], -1)[..., :k]
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    word = (p << (torch.arange(bits, device=p.device) * 8)).sum(-1)
    codes = (word[..., None] >> (torch.arange(8, device=p.device) * bits)) & mask
    return codes.reshape(*p.shape[:-2], -1)[..., :k].to(torch.uint8)


def packed_bytes(k: int, bits: int) -> int:
    """Bytes per row for ``k`` codes, with K padded to a whole number of bytes (8 codes)."""
    return -(-k * bits // 8) if bits != 3 else -(-k // 8) * 3


def pad_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pad codes [..., K] with zeros so that they pack into whole bytes (8-code units for 3 bits)."""
    unit = 8 if bits == 3 else 8 // bits
    pad = (-codes.shape[-1]) % unit
    return torch.nn.functional.pad(codes, (0, pad)) if pad else codes
