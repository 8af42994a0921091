"""Weight-only quantized GEMV for decode on a slice-interleaved copy of the codes.

Decode multiplies one activation row by every weight, so it is bound by the bytes of the weight
(b/16 of bf16) and — once those are few — by the instructions spent per code. In the canonical
packing (:mod:`leanlm.kernels.quant_gemm`: a little-endian bit stream along K) the 32/b codes of a
word are consecutive columns, so a thread needs 32/b scattered activations per word. Here, as in
exllama's and Marlin's shuffled layouts, the codes are re-packed once per layer
(:func:`interleave`): K is cut into chunks of 32 words (32·32/b codes), and in chunk c bit-field j of
word i holds column

    k = c · 32 · (32/b) + 32 · j + i        (i < 32, j < 32/b),

so for a fixed j the 32 words of a chunk pair with 32 *contiguous* activations. A program owns
BLOCK_N rows; per chunk it loads [BLOCK_N, 32] words (16-byte vector loads), and for each j moves
field j to the top of an fp32 mantissa under the exponent of 1.0 — one shift and one and/or,
giving the float 1 + q/2^b exactly — and accumulates it times x_j with one FMA: three instructions
per code. Since Σ (1 + q_k/2^b) x_k = Σ x_k + 2^-b Σ q_k x_k, and

    Σ_{k∈g} s(q_k − z) x_k = s · (Σ_{k∈g} q_k x_k − z · Σ_{k∈g} x_k),

scales, zeros and the offset leave the inner loop: per group, acc += s · part in a [BLOCK_N, 32]
accumulator (one FMA per row and word lane) and corr += s · (2^b + z) · Σ_{k∈g} x_k per row, and
y = 2^b · Σ_lanes acc − corr: the row sum is the only cross-thread reduction of the weights' terms.
Optionally (``prefetch``) the next chunk's words are loaded before the current one is reduced (the
loop has no tl.dot, so Triton's pipeliner does not do it), and ``chunks`` > 1 puts several chunks
side by side in one tile (more loads in flight per step; scales then gathered per lane).

Measured on an H200 (benchmarks/RESULTS.md): 37 µs for 1 × 4096 → 11008 at 4 bits, 15% of copy
bandwidth — still bound by instructions and latency, not by memory. Contiguous groups only
(``g_idx = k // group_size``) with 32 | group size and a group spanning whole chunks or a whole
number of groups per chunk. Act-order layers (GPTQ desc_act) fit once their columns are sorted by
group, the input gathered with the same permutation (:class:`~leanlm.quant.linear.QuantLinear`).
"""

from __future__ import annotations

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor
from leanlm.kernels._triton import tl, triton
from leanlm.kernels.packing import unpack_codes
from leanlm.kernels.quant_gemm import check_params

LANES = 32  # words per chunk
ONE_BITS = 0x3F800000  # 1.0f


def chunk_codes(bits: int) -> int:
    """Columns per chunk of 32 words."""
    return LANES * 32 // bits


def supports(k: int, bits: int, group_size: int) -> bool:
    """Whether a [N, k] layer of ``bits``-bit codes with contiguous ``group_size`` groups has this layout."""
    c = chunk_codes(bits) if bits in (2, 4, 8) else 0
    g = group_size if group_size != -1 else k
    return bool(c) and k % c == 0 and g % LANES == 0 and (g % c == 0 or c % g == 0)


def interleave(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Canonical packed codes [N, K·b/8] uint8 -> the interleaved layout [N, K·b/32] int32."""
    check(supports(k, bits, -1),
          f"interleave needs K a multiple of {chunk_codes(bits)} at {bits} bits, got {k}")
    per = 32 // bits
    codes = unpack_codes(qweight, bits, k).to(torch.int64)
    n = codes.shape[0]
    fields = codes.view(n, k // chunk_codes(bits), per, LANES).transpose(2, 3)  # [N, chunk, i, j]
    words = (fields << (torch.arange(per, device=codes.device) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the int32 with those 32 bits
    return words.to(torch.int32).reshape(n, -1).contiguous()


def reference(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bits: int, group_size: int) -> torch.Tensor:
    """x [M, K] @ ŵᵀ read back from the interleaved layout (in x's dtype)."""
    k = x.shape[1]
    per, n = 32 // bits, words.shape[0]
    fields = (words.long()[:, :, None] >> (torch.arange(per, device=x.device) * bits)) & (2**bits - 1)
    codes = fields.view(n, -1, LANES, per).transpose(2, 3).reshape(n, k)  # [N, chunk, j, i] -> columns
    groups = torch.arange(k, device=x.device) // (group_size if group_size != -1 else k)
    w = (codes.to(x.dtype) - zeros[:, groups].to(x.dtype)) * scales[:, groups].to(x.dtype)
    return x @ w.t()


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, sx_m, sw_n, ss_n, sz_n, sy_m, one,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SLICES: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PREFETCH: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr):
    # GROUP: columns per group (K for one group per row), a constant so that k // GROUP is a shift.
    # SLICES: bit-fields j per group within a chunk (all of them when a group spans whole chunks).
    # CHUNKS: chunks per loop step, side by side in one [BLOCK_N, 32·CHUNKS] tile (lane l is word
    # l % 32 of chunk l // 32): more loads in flight per step; scales are then gathered per lane.
    # one: the bits of 1.0f, an argument rather than a literal so that ptxas fuses (f & M) | one
    # into one LOP3 (two literals take two)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    CODES: tl.constexpr = 32 * PER
    TOP: tl.constexpr = 23 - BITS  # where a field sits in an fp32 mantissa
    WIDTH: tl.constexpr = 32 * CHUNKS
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    rl = tl.arange(0, WIDTH)
    col = (rl // 32) * CODES + rl % 32  # lane l's column of field 0, from the step's first column
    x_row = x_ptr + pid_m.to(tl.int64) * sx_m
    w_rows = w_ptr + rn64[:, None] * sw_n + rl[None, :]
    acc = tl.zeros([BLOCK_N, WIDTH], tl.float32)
    if CHUNKS == 1:  # Σ_g s·(2^B + z)·Σ_{k∈g} x_k per row
        corr = tl.zeros([BLOCK_N], tl.float32)
    else:  # the same per lane, summed at the end
        corr = tl.zeros([BLOCK_N, WIDTH], tl.float32)
    steps = K // (CODES * CHUNKS)
    if PREFETCH:
        words = tl.load(w_rows, mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
    for t in range(0, steps):
        if PREFETCH:
            nxt = tl.load(w_rows + (t + 1) * WIDTH, mask=n_mask[:, None] & (t + 1 < steps),
                          other=0).to(tl.uint32, bitcast=True)
        else:
            words = tl.load(w_rows + t * WIDTH, mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        first = t * CODES * CHUNKS
        part = tl.zeros([BLOCK_N, WIDTH], tl.float32)
        xs = tl.zeros([WIDTH], tl.float32)
        for j in tl.static_range(PER):
            x = tl.load(x_row + first + col + j * 32).to(tl.float32)
            # field j moved to the top of an fp32 mantissa: the float 1 + q / 2^BITS, exactly
            if j * BITS <= TOP:
                f = words << (TOP - j * BITS)
            else:
                f = words >> (j * BITS - TOP)
            part += ((f & (MASK << TOP)) | one).to(tl.float32, bitcast=True) * x[None, :]
            xs += x
            if (j + 1) % SLICES == 0:  # the end of a group's fields: apply its scale and zero
                # part = Σ (1 + q/2^B) x: s·Σ(q − z)x = 2^B·s·part − s·(2^B + z)·Σx
                if CHUNKS == 1:  # one group per row: [BLOCK_N] scales, Σx over the lanes
                    grp = (first + j * 32) // GROUP
                    s = tl.load(s_ptr + rn64 * ss_n + grp, mask=n_mask, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + rn64 * sz_n + grp, mask=n_mask, other=0).to(tl.float32)
                    acc += s[:, None] * part
                    corr += s * ((1 << BITS) + z) * tl.sum(xs, axis=0)
                else:  # each chunk of the tile has its own group
                    grp = (first + col + j * 32) // GROUP
                    s = tl.load(s_ptr + rn64[:, None] * ss_n + grp[None, :], mask=n_mask[:, None],
                                other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + rn64[:, None] * sz_n + grp[None, :], mask=n_mask[:, None],
                                other=0).to(tl.float32)
                    acc += s * part
                    corr += s * ((1 << BITS) + z) * xs[None, :]
                part = tl.zeros([BLOCK_N, WIDTH], tl.float32)
                xs = tl.zeros([WIDTH], tl.float32)
        if PREFETCH:
            words = nxt
    if CHUNKS == 1:
        y = tl.sum(acc, axis=1) * (1 << BITS) - corr
    else:
        y = tl.sum(acc * (1 << BITS) - corr, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m.to(tl.int64) * sy_m + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def default_config(m: int, n: int, device: torch.device) -> dict[str, int]:
    """BLOCK_N: the largest of 32/16/8 that still gives ≥ 4 programs per SM; 8 warps, no prefetch,
    one chunk per step — the best of 40 tiles swept on an H200 at 1 × 4096 → 11008 (RESULTS.md)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    block_n = next((bn for bn in (32, 16) if m * triton.cdiv(n, bn) >= 4 * sms), 8)
    return {"block_n": block_n, "num_warps": 8, "prefetch": 0, "chunks": 1}


def quant_gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               config: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (into ``out`` if given), ``words`` from :func:`interleave`;
    ``config`` overrides ``block_n``, ``num_warps``, ``prefetch`` and ``chunks`` (a benchmark's
    sweep; chunks per loop step is cut to a power of 2 that divides K's chunks)."""
    dev = x.device
    check_runnable(dev)
    check_tensor("x", x, 2, FLOATS, dev)
    m, k = x.shape
    check(bits in (2, 4, 8) and supports(k, bits, group_size),
          f"quant_gemv needs 2/4/8 bits, K a multiple of {chunk_codes(bits) if bits in (2, 4, 8) else '?'} "
          f"and groups of a multiple of 32 columns aligned to chunks; got bits={bits}, K={k}, "
          f"group_size={group_size}")
    check_tensor("words", words, 2, (torch.int32,), dev)
    n = words.shape[0]
    check(words.shape[1] == k * bits // 32,
          f"words must be [N, {k * bits // 32}] for K={k}, got {tuple(words.shape)}")
    check_params(x, n, scales, zeros, group_size, bias, out)
    cfg = {**default_config(m, n, dev), **(config or {})}
    block_n = cfg["block_n"]
    check(block_n >= 1 and block_n & (block_n - 1) == 0,
          f"config block_n must be a power of 2, got {block_n}")
    gs = group_size if group_size != -1 else k
    slices = min(gs, chunk_codes(bits)) // LANES
    total = k // chunk_codes(bits)
    chunks = 1 << (max(1, min(cfg["chunks"], total)).bit_length() - 1)  # a power of 2 ...
    while total % chunks:  # ... dividing K's chunks
        chunks //= 2
    y = torch.empty(m, n, dtype=x.dtype, device=dev) if out is None else out
    if m and n:
        _gemv_kernel[(m, triton.cdiv(n, block_n))](
            x, words, scales, zeros, scales if bias is None else bias, y, n, k, x.stride(0),
            words.stride(0), scales.stride(0), zeros.stride(0), y.stride(0), ONE_BITS, BITS=bits, GROUP=gs,
            SLICES=slices, HAS_BIAS=bias is not None, PREFETCH=bool(cfg["prefetch"]), CHUNKS=chunks,
            BLOCK_N=block_n, num_warps=cfg["num_warps"])
    return y
