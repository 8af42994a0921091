"""4- and 8-bit weights times int8 activations on CPUs with AVX512-VNNI (W4A8 / W8A8,
``LEANLM_INT8_ACTIVATIONS=1``).

A weight-only int4 layer on a CPU without bf16 dot products widens every weight to fp32 before
multiplying (:func:`leanlm.kernels.cpu_ops.int4pack_mm`): 16 multiply-adds an instruction, plus the
widening; torch's int8 weight-only kernel does the same per few rows. Rounding the activations to
int8 lets the integer product of a group run as VNNI's ``vpdpbusd`` (u8 code × s8 activation, 64
multiply-adds an instruction, exact in int32) on codes that never leave the byte — what
llama.cpp's Q4_0 and Q8_0 (× Q8_0 activations) and torchao's ``da8w4`` do on these CPUs.
(torchao's CPU kernels are not in its pip wheel, so leanlm builds its own:
``csrc/vnni_gemm.cpp``.) Per input row i and weight group g, with w = q·s + c, c = m − h·s in
torch's int4pack pairs (s, m) (h = 8 for 4 bits, 128 for 8):

    a[i, g] = max(max_k |x[i, k]|, 1e-8) / 127,   x̂[i, k] = round(x[i, k] / a[i, g])
    y[i, n] = Σ_g s[g, n] · a[i, g] · Σ_{k∈g} q[n, k] x̂[i, k]  +  c[g, n] · Σ_{k∈g} x[i, k]

The zero point's term sees the unrounded row sum, so the rounding touches only the scaled part.
A per-channel weight is given groups of 128/64/32 columns with its (s, m) repeated
(:class:`leanlm.quant.linear.QuantLinear` does), so its activations are not rounded per whole
row: per token, W8A8 cost the default model +0.59% perplexity; per 64 columns, see RESULTS.md.
This changes a layer's numerics (each group's activations to 8 bits, like Q8_0's blocks of 32),
so it is a switch (:func:`leanlm.kernels.int8_activations`), off by default; the perplexity cost
is in benchmarks/RESULTS.md.

Layout (:func:`pack`): blocks of 64 output rows; in a block, each 8 input columns (an octet) are
two quads of 4 columns, each quad 4 lines of 64 bytes, byte 4l + t of line i holding row
16i + l's code for the quad's column t. 8 bits: the quads' lines one after the other; 4 bits:
the first quad in the low nibbles, the second in the high ones. ``sz`` is block-major:
[N/64, G, 64, 2] bf16 (s, m), so each thread streams its blocks' codes and scales in order.
"""

from __future__ import annotations

import torch

from leanlm.kernels import cpu_ops

BITS = (4, 8)


def available() -> bool:
    """Whether this CPU has AVX512-VNNI and leanlm's C++ ops are built for AVX-512."""
    return cpu_ops.x86_level() == "v4" and "avx512_vnni" in cpu_ops.cpu_flags() and cpu_ops.ops() is not None


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] (N a multiple of 64, K of 8) in the layout above: uint8 [N, K·bits/8]."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // 64, 4, 16, k // 8, 2, 4)  # block, line, lane, octet, quad, t
    if bits == 4:
        c = c.permute(0, 3, 1, 2, 5, 4)  # block, octet, line, lane, t, quad
        return (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n, k // 2)
    return c.permute(0, 3, 4, 1, 2, 5).contiguous().view(n, k)  # block, octet, quad, line, lane, t


def unpack(packed: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: codes [n, k] (uint8)."""
    if bits == 4:
        b = packed.reshape(n // 64, k // 8, 4, 16, 4)
        c = torch.stack([b & 15, b >> 4], dim=-1)  # block, octet, line, lane, t, quad
        return c.permute(0, 2, 3, 1, 5, 4).reshape(n, k)
    c = packed.reshape(n // 64, k // 8, 2, 4, 16, 4)  # block, octet, quad, line, lane, t
    return c.permute(0, 3, 4, 1, 2, 5).reshape(n, k)


def block_scales(sz: torch.Tensor) -> torch.Tensor:
    """(s, m) pairs [G, N, 2] (N a multiple of 64) block-major: [N/64, G, 64, 2]."""
    g, n, _ = sz.shape
    return sz.view(g, n // 64, 64, 2).transpose(0, 1).contiguous()


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, a): x [M, K] rounded to int8 codes per row and group ([M, G, gs], fp32), and the
    scales [M, G, 1]."""
    xg = x.float().reshape(x.shape[0], -1, group_size)
    a = xg.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(xg / a).clamp(-127, 127), a


def reference(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int,
              bits: int) -> torch.Tensor:
    """The formula above in fp32, from codes [N, K] and (s, m) pairs [G, N, 2]; bf16 [M, N]."""
    xq, a = quantize_activations(x, group_size)
    q = codes.float().reshape(codes.shape[0], -1, group_size)  # [N, G, gs]
    s, m = sz[..., 0].float(), sz[..., 1].float()  # [G, N]
    c = m - 2 ** (bits - 1) * s
    dot = torch.einsum("mgk,ngk->mgn", xq.double(), q.double()).float()  # exact integers
    xs = x.float().reshape(x.shape[0], -1, group_size).sum(-1)  # [M, G]
    y = (s * a * dot).sum(1) + xs @ c
    return y.to(torch.bfloat16)


def mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """x [M, K] bf16 times the weight :func:`pack` and :func:`block_scales` made: bf16 [M, N]."""
    return cpu_ops.ops().vnni_mm(x.contiguous(), packed, sz, group_size, bits)
