"""Weight-only quantized GEMM / GEMV: y = x ŵᵀ (+ b) with ŵ dequantized in registers.

The weight is :class:`~leanlm.quant.linear.QuantLinear`'s canonical state, which GPTQ and AWQ
checkpoints are converted to on load (:mod:`leanlm.quant.formats`): codes packed as a
little-endian bit stream along K (``qweight`` [N, ⌈K·b/8⌉] uint8; code k of a row sits at bits
``[b·k, b·k + b)``), ``scales`` and integer ``zeros`` [N, G] and the column → group map
``g_idx`` [K]. A tile of BLOCK_K × BLOCK_N codes is read as bytes, shifted and masked, and
becomes ŵ = s · (q − z) in fp32 before the tensor-core dot with the activations — the weight is
read from memory at b/16 of its bf16 size, which is where a memory-bound decode step gains.

Groups: for ``g_idx = k // group_size`` (RTN, AWQ, GPTQ without act-order) a K-tile lies inside
one group (BLOCK_K divides the group size), so one row of scales and zeros serves the tile. With
GPTQ's act-order (desc_act) the group of each column is looked up through ``g_idx``
(``HAS_G_IDX``), as AutoGPTQ's Triton kernel does.

Decode has M ≤ 16 rows and too few N-tiles to fill a large GPU, so GEMV-shaped calls split K
across programs (``SPLIT_K``) and accumulate partial sums with fp32 atomics.
Bits 2, 4 and 8 (codes that never straddle a byte) are supported; 3-bit layers use dequantize + GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor, interpreting

SUPPORTED_BITS = (2, 4, 8)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ ŵᵀ in x's dtype (fp64 for fp64 inputs), ŵ unpacked and dequantized in torch."""
    k = x.shape[1]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)
    codes = ((qweight[:, :, None] >> shifts) & (2**bits - 1)).flatten(1)[:, :k]
    groups = g_idx.long()
    w = (codes.to(x.dtype) - zeros[:, groups].to(x.dtype)) * scales[:, groups].to(x.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias.to(y.dtype)


@triton.jit
def _quant_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, group_size,
                       k_per_split, sx_m, sq_n, ss_n, sz_n, sy_m,
                       BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_hi
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sx_m + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        byte = tl.load(qw_ptr + rn64[None, :] * sq_n + (rk * BITS // 8)[:, None], mask=w_mask, other=0)
        q = ((byte >> ((rk * BITS) % 8)[:, None].to(tl.uint8)) & ((1 << BITS) - 1)).to(tl.float32)
        if HAS_G_IDX:  # act-order: any column may belong to any group
            grp = tl.load(g_ptr + rk, mask=k_mask, other=0)
            s = tl.load(s_ptr + rn64[None, :] * ss_n + grp[:, None], mask=w_mask, other=0.0)
            z = tl.load(z_ptr + rn64[None, :] * sz_n + grp[:, None], mask=w_mask, other=0)
            w = (q - z.to(tl.float32)) * s.to(tl.float32)
        else:  # the whole K-tile lies in group k0 // group_size
            grp = k0 // group_size
            s = tl.load(s_ptr + rn64 * ss_n + grp, mask=n_mask, other=0.0)
            z = tl.load(z_ptr + rn64 * sz_n + grp, mask=n_mask, other=0)
            w = (q - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        elif x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS and pid_k == 0:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_off = rm[:, None].to(tl.int64) * sy_m + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + y_off, acc, mask=mask)
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _config(m: int, n: int, k: int, group_size: int, device: torch.device) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K): GEMV-shaped calls split K until the grid has about
    four programs per SM; BLOCK_K divides the group size."""
    block_k = 64 if group_size == -1 else min(64, group_size)
    if m > 16:
        return 64, 64, block_k, 1
    block_n = 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(4 * sms, tiles), k // (4 * block_k)))
    return 16, block_n, block_k, triton.next_power_of_2(split) if split > 1 else 1


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None, bits: int, group_size: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """Launch the kernel: x [M, K] -> y [M, N] in x's dtype.

    ``g_idx`` None means the default ``k // group_size`` (contiguous groups); ``split_k``
    overrides the configuration's K split.
    """
    dev = x.device
    check_runnable(dev)
    check(bits in SUPPORTED_BITS, f"quant_gemm runs {SUPPORTED_BITS}-bit codes, got {bits}")
    check_tensor("x", x, 2, FLOATS, dev)
    m, k = x.shape
    check_tensor("qweight", qweight, 2, (torch.uint8,), dev)
    n = qweight.shape[0]
    check(qweight.shape[1] == -(-k * bits // 8),
          f"qweight must be [N, {-(-k * bits // 8)}] bytes for K={k} at {bits} bits, got "
          f"{tuple(qweight.shape)}")
    groups = 1 if group_size == -1 else -(-k // group_size)
    check_tensor("scales", scales, 2, FLOATS, dev)
    check_tensor("zeros", zeros, 2, (torch.uint8,), dev)
    check(tuple(scales.shape) == (n, groups) and tuple(zeros.shape) == (n, groups),
          f"scales and zeros must be [{n}, {groups}], got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if g_idx is not None:
        check_tensor("g_idx", g_idx, 1, (torch.int32, torch.int64), dev)
        check(g_idx.shape[0] == k, f"g_idx has {g_idx.shape[0]} entries for K={k}")
    if bias is not None:
        check_tensor("bias", bias, 1, FLOATS, dev)
        check(bias.shape[0] == n, f"bias has {bias.shape[0]} entries for N={n}")
    block_m, block_n, block_k, split = _config(m, n, k, group_size, dev)
    split = split_k or split
    if out is not None:
        check(tuple(out.shape) == (m, n) and out.dtype == x.dtype and out.stride(-1) == 1,
              f"out must be [{m}, {n}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    y = out if split == 1 and out is not None else (
        torch.zeros(m, n, dtype=torch.float32, device=dev) if split > 1
        else torch.empty(m, n, dtype=x.dtype, device=dev))
    if m and n:
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        _quant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)](
            x, qweight, scales, zeros, qweight if g_idx is None else g_idx,
            scales if bias is None else bias, y, m, n, k, max(group_size, 1) if group_size != -1 else k,
            k_per_split, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
            BITS=bits, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
            UPCAST=interpreting() and x.dtype != torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k)
    if split > 1:
        if out is not None:
            return out.copy_(y)
        return y.to(x.dtype)
    return y
