"""Rotary position embedding (RoFormer, Su et al. 2021) of q or k in one pass.

In the "rotate_half" layout of Hugging Face checkpoints, element i < d/2 of a head is paired with
element i + d/2 and the pair is rotated by the angle of its position and frequency:

    y_i       = x_i · cos θ_i − x_{i+d/2} · sin θ_i
    y_{i+d/2} = x_{i+d/2} · cos θ_i + x_i · sin θ_i

``cos``/``sin`` [B, 1, S, D] are the tables the model builds once per forward (both halves equal).
Unfused, torch runs a chunk, a negation, a cat and three elementwise ops per tensor, each a full
read and write; the kernel reads x and the tables once. Products are formed in fp32 and rounded
once, so bf16 results may differ from the unfused module's by one rounding.
"""

from __future__ import annotations

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor
from leanlm.kernels._triton import tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by cos/sin [B, 1, S, D]."""
    return x * cos + rotate_half(x) * sin


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, seq, n_heads, half,
                   xb, xh, xs, cb, cs, yb, yh, ys,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    bs = tl.program_id(0)
    b = (bs // seq).to(tl.int64)
    s = (bs % seq).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    cos = tl.load(cos_ptr + b * cb + s * cs + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * cb + s * cs + d, mask=dmask, other=0.0).to(tl.float32)
    mask = (heads[:, None] < n_heads) & dmask[None, :]
    x_row = x_ptr + b * xb + s * xs + heads[:, None].to(tl.int64) * xh + d[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    y_row = y_ptr + b * yb + s * ys + heads[:, None].to(tl.int64) * yh + d[None, :]
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_row, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(y_row + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel: x [B, H, S, D] (any strides but unit stride on D), cos/sin [B or 1, 1, S, D]."""
    check_runnable(x.device)
    check_tensor("x", x, 4, FLOATS, x.device)
    b, h, s, d = x.shape
    check(d % 2 == 0, f"rotary needs an even head dimension, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 4, FLOATS, x.device)
        check(t.shape[0] in (1, b) and t.shape[1] == 1 and tuple(t.shape[2:]) == (s, d),
              f"{name} must be [{b} or 1, 1, {s}, {d}], got {tuple(t.shape)}")
    check(cos.stride() == sin.stride(), "cos and sin must have the same strides")
    y = torch.empty_like(x) if out is None else out  # x's layout (dense views keep their strides)
    check(y.shape == x.shape and y.dtype == x.dtype and y.stride(-1) == 1,
          f"out must be {tuple(x.shape)} {x.dtype} with unit stride on D, got "
          f"{tuple(y.shape)} {y.dtype} strides {y.stride()}")
    if x.numel():
        block_h = min(triton.next_power_of_2(h), 16)
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        _rotary_kernel[(b * s, triton.cdiv(h, block_h))](
            x, cos, sin, y, s, h, d // 2, x.stride(0), x.stride(1), x.stride(2), cb, cos.stride(2),
            y.stride(0), y.stride(1), y.stride(2), BLOCK_H=block_h,
            BLOCK_D=triton.next_power_of_2(d // 2))
    return y
