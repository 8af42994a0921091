"""Fused residual-add + RMSNorm (Zhang & Sennrich 2019), one row per program.

    s = x + r            (the new residual stream, rounded to x's dtype as the unfused code does)
    y = w ⊙ (s / sqrt(mean(s²) + ε))

computed in fp32 and rounded to the input dtype before the weight, as Hugging Face's
``LlamaRMSNorm`` does, so bf16 results match the unfused module. Unfused, a decoder block reads
and writes the hidden state three times for the residual add and the norm; fused, it reads x and r
once and writes s and y once.
"""

from __future__ import annotations

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor
from leanlm.kernels._triton import tl, triton


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s) with s = x + residual (or x itself): the math of the module docstring in torch."""
    s = x if residual is None else x + residual
    dtype = s.dtype
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), s


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n_cols, x_stride, r_stride, y_stride,
                    s_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * s_stride + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on x [..., D] (and residual of the same shape); returns (y, s).

    y has x's dtype (the product with the weight is formed in fp32 and rounded once, which is
    what torch's ``weight * x`` followed by a cast to x's dtype gives). ``out`` (optional)
    receives y.
    """
    check_runnable(x.device)
    d = x.shape[-1]
    check_tensor("weight", weight, 1, FLOATS, x.device)
    check(weight.shape[0] == d, f"weight has {weight.shape[0]} elements, x's last dimension is {d}")
    x2 = x.reshape(-1, d)
    check_tensor("x", x2, 2, FLOATS, x.device)
    rows = x2.shape[0]
    y = torch.empty_like(x2) if out is None else out.view(-1, d)
    check(y.shape == x2.shape and y.dtype == x.dtype,
          f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}")
    r2 = s = x2
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype,
              f"residual must match x ({tuple(x.shape)} {x.dtype}), got "
              f"{tuple(residual.shape)} {residual.dtype}")
        r2 = residual.reshape(-1, d)
        check_tensor("residual", r2, 2, FLOATS, x.device)
        s = torch.empty_like(x2)
    if rows:
        block = triton.next_power_of_2(d)
        _rmsnorm_kernel[(rows,)](x2, r2, weight, y, s, d, x2.stride(0), r2.stride(0), y.stride(0),
                                 s.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                 num_warps=min(16, max(1, block // 256)))
    return y.view(x.shape), s.view(x.shape)
