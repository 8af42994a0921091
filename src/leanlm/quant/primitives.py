"""Group-wise integer quantization of weight matrices: the arithmetic every method shares.

A weight ``W`` [N out, K in] is cut along K into groups of ``group_size`` columns (the last
group may be shorter; ``group_size = -1`` is one group per row, "per-channel"). Each (row,
group) gets a scale ``s`` and an integer zero point ``z``; a weight becomes the unsigned code

    q = clamp(round(w / s) + z, 0, 2^b - 1),        w ≈ ŵ = s · (q - z)

Asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` with the range widened to
include 0. Symmetric: ``s = 2·max|w| / (2^b - 1)``, ``z = 2^(b-1)`` (GPTQ's ``Quantizer``,
so a symmetric 4-bit checkpoint stores z = 8 and, in the v1 GPTQ format, z - 1 = 7). An all-zero
group gets the range [-1, 1] so its scale is never 0.

``g_idx`` [K] maps each input column to its group. It is ``k // group_size`` unless GPTQ
quantized the columns in activation order (act-order, "desc_act"), where the group of a column
is decided by its position in that order.

Codes are stored packed as a little-endian bit stream along K (the GPTQ ``qweight`` layout):
:mod:`leanlm.kernels.packing`, re-exported here.
"""

from __future__ import annotations

import torch

from leanlm.errors import LeanLMError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128, 256)


def check_scheme(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LeanLMError(f"unsupported bits={bits}: expected one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUPS:
        raise LeanLMError(f"unsupported group_size={group_size}: expected one of {SUPPORTED_GROUPS} "
                          "(-1 = one group per output channel)")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [R, C] (the reduction is over the last dim)."""
    maxq = 2**bits - 1
    w = w.float()
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` with broadcastable ``scale``/``zero`` (float, same shape rules)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def group_params(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zeros [N, G] of ``w`` [N, K] with contiguous groups."""
    k = w.shape[1]
    if group_size == -1:
        s, z = qparams(w, bits, sym)
        return s[:, None], z[:, None]
    scales, zeros = [], []
    for g0 in range(0, k, group_size):
        s, z = qparams(w[:, g0:g0 + group_size], bits, sym)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (uint8) of ``w`` given per-group ``scales``/``zeros`` [N, G] and ``g_idx``."""
    g = g_idx.long()
    return quantize_codes(w, scales[:, g], zeros[:, g], bits).to(torch.uint8)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                      group_size: int = -1) -> torch.Tensor:
    """ŵ = s · (q - z) [N, K] from codes [N, K], scales/zeros [N, G] and g_idx [K]; with
    ``g_idx=None`` the groups are contiguous runs of ``group_size`` columns (broadcast, no gather).

    The math runs in the wider of ``dtype`` and the scales' dtype: (q - z) is a small integer,
    exact in bf16/fp16, so with bf16 scales bf16 math rounds once, like fp32 math then a cast."""
    math = torch.promote_types(dtype, scales.dtype) if dtype.is_floating_point else torch.float32
    if g_idx is not None:
        g = g_idx.long()
        return ((codes.to(math) - zeros.to(math)[:, g]) * scales.to(math)[:, g]).to(dtype)
    n, k = codes.shape
    groups = scales.shape[1]
    gs = k if groups == 1 else group_size
    pad = groups * gs - k
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    w = (c.view(n, groups, gs).to(math) - zeros.to(math)[..., None]) * scales.to(math)[..., None]
    return w.view(n, -1)[:, :k].to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize ``w`` (used by searches and tests)."""
    s, z = group_params(w, bits, group_size, sym)
    g = default_g_idx(w.shape[1], group_size, w.device)
    return dequantize_weight(quantize_weight(w, s, z, bits, g), s, z, g, w.dtype)
