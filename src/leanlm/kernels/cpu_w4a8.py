"""4-bit weights times int8 activations on CPUs with AVX512-VNNI (W4A8, ``LEANLM_W4A8=1``).

A weight-only int4 layer on a CPU without bf16 dot products widens every weight to fp32 before
multiplying (:func:`leanlm.kernels.cpu_ops.int4pack_mm`): 16 multiply-adds an instruction, plus the
widening. Rounding the activations to int8 lets the integer product of a group run as VNNI's
``vpdpbusd`` (u8 code × s8 activation, 64 multiply-adds an instruction, exact in int32) on codes
that never leave the byte — what llama.cpp's Q4_0 (× Q8_0) and torchao's ``da8w4`` do on these
CPUs. (torchao's CPU kernels are not in its pip wheel, so leanlm builds its own:
``csrc/w4a8_gemm.cpp``.) Per input row i and weight group g, with w = q·s + c (c = m − 8s in
torch's int4pack pairs (s, m)):

    a[i, g] = max(max_k |x[i, k]|, 1e-8) / 127,   x̂[i, k] = round(x[i, k] / a[i, g])
    y[i, n] = Σ_g s[g, n] · a[i, g] · Σ_{k∈g} q[n, k] x̂[i, k]  +  c[g, n] · Σ_{k∈g} x[i, k]

The zero point's term sees the unrounded row sum, so the rounding touches only the scaled part.
This changes a layer's numerics (the activations of each group to 8 bits, like Q8_0's blocks
of 32), so it is a switch (:func:`leanlm.kernels.w4a8`), off by default; the perplexity cost
is in benchmarks/RESULTS.md.

Layout (:func:`pack`): blocks of 64 output rows; in a block, each 8 input columns (an octet)
take 4 × 64 bytes, one line per 16 rows, byte 4l + t of line i holding row 16i + l's codes for
columns 8o + t (low nibble) and 8o + 4 + t (high nibble). ``sz`` is block-major:
[N/64, G, 64, 2] bf16 (s, m), so each thread streams its blocks' codes and scales in order.
"""

from __future__ import annotations

import torch

from leanlm.kernels import cpu_ops


def available() -> bool:
    """Whether this CPU has AVX512-VNNI and leanlm's C++ ops are built for AVX-512."""
    return cpu_ops.x86_level() == "v4" and "avx512_vnni" in cpu_ops.cpu_flags() and cpu_ops.ops() is not None


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15; N a multiple of 64, K of 8) in the layout above: uint8 [N, K/2]."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // 64, 4, 16, k // 8, 2, 4)  # block, line, lane, octet, half, t
    c = c.permute(0, 3, 1, 2, 5, 4)  # block, octet, line, lane, t, half
    return (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n, k // 2)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: codes [n, k] (uint8)."""
    b = packed.reshape(n // 64, k // 8, 4, 16, 4)
    c = torch.stack([b & 15, b >> 4], dim=-1)  # block, octet, line, lane, t, half
    return c.permute(0, 2, 3, 1, 5, 4).reshape(n, k)


def block_scales(sz: torch.Tensor) -> torch.Tensor:
    """torch's int4pack (s, m) pairs [G, N, 2] (N a multiple of 64) block-major: [N/64, G, 64, 2]."""
    g, n, _ = sz.shape
    return sz.view(g, n // 64, 64, 2).transpose(0, 1).contiguous()


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, a): x [M, K] rounded to int8 codes per row and group ([M, G, gs], fp32), and the
    scales [M, G, 1]."""
    xg = x.float().reshape(x.shape[0], -1, group_size)
    a = xg.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(xg / a).clamp(-127, 127), a


def reference(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The formula above in fp32, from codes [N, K] and torch's (s, m) pairs [G, N, 2]; bf16 [M, N]."""
    xq, a = quantize_activations(x, group_size)
    q = codes.float().reshape(codes.shape[0], -1, group_size)  # [N, G, gs]
    s, c = sz[..., 0].float(), sz[..., 1].float() - 8 * sz[..., 0].float()  # [G, N]
    dot = torch.einsum("mgk,ngk->mgn", xq, q)  # exact: |Σ| ≤ 127 · 15 · gs < 2^24
    xs = x.float().reshape(x.shape[0], -1, group_size).sum(-1)  # [M, G]
    y = (s * a * dot).sum(1) + xs @ c
    return y.to(torch.bfloat16)


def mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] bf16 times the weight :func:`pack` and :func:`block_scales` made: bf16 [M, N]."""
    return cpu_ops.ops().w4a8_mm(x.contiguous(), packed, sz, group_size)
