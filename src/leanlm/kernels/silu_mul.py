"""SiLU(gate) ⊙ up of a gated MLP (SwiGLU, Shazeer 2020), read from the fused gate/up output.

With gate and up fused into one linear (:mod:`leanlm.fusion`) the MLP's first product gives
h = [x W_gateᵀ, x W_upᵀ] of shape [..., 2I], and its activation is

    y = SiLU(h[..., :I]) ⊙ h[..., I:],      SiLU(g) = g · σ(g) = g / (1 + e^{-g})

Unfused, torch launches one kernel for SiLU (writing a temporary [..., I]) and one for the product
(reading it back); fused, each row of h is read once and y written once. The kernel rounds
SiLU(g) to the input dtype before the product, as the two torch ops do, so its bf16 results are
those of the torch path up to the last bit of ``exp``; the math is fp32 in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor
from leanlm.kernels._triton import tl, triton

BLOCK = 1024  # columns per program (a fixed config: autotuning does not run in the interpreter)


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) ⊙ up of ``gate_up`` [..., 2I] (gate first): the two torch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(h_ptr, y_ptr, n_cols, h_stride, y_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0)
    u = tl.load(h_ptr + row * h_stride + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded as F.silu's output is
    y = act.to(tl.float32) * u.to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel on ``gate_up`` [..., 2I] (unit stride on the last dimension); returns
    y [..., I] in its dtype (into ``out`` when given)."""
    check_runnable(gate_up.device)
    two_i = gate_up.shape[-1]
    check(two_i % 2 == 0, f"gate_up's last dimension must be even (gate, up), got {two_i}")
    h = gate_up.reshape(-1, two_i)
    check_tensor("gate_up", h, 2, FLOATS, gate_up.device)
    i = two_i // 2
    shape = (*gate_up.shape[:-1], i)
    y = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    check(tuple(y.shape) == shape and y.dtype == gate_up.dtype and y.is_contiguous(),
          f"out must be a contiguous {shape} {gate_up.dtype}, got {tuple(y.shape)} {y.dtype}")
    y2 = y.view(-1, i)
    if h.shape[0] and i:
        grid = (h.shape[0], triton.cdiv(i, BLOCK))
        _silu_mul_kernel[grid](h, y2, i, h.stride(0), y2.stride(0), BLOCK=BLOCK, num_warps=4)
    return y
