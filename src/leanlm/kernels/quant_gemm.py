"""Weight-only quantized GEMM / GEMV: y = x ŵᵀ (+ b) with ŵ dequantized in registers.

The weight is :class:`~leanlm.quant.linear.QuantLinear`'s canonical state, which GPTQ and AWQ
checkpoints are converted to on load (:mod:`leanlm.quant.formats`): codes packed as a
little-endian bit stream along K (``qweight`` [N, ⌈K·b/8⌉] uint8; code k of a row sits at bits
``[b·k, b·k + b)``), ``scales`` and integer ``zeros`` [N, G] and the column → group map
``g_idx`` [K], ŵ = s · (q − z). The weight is read at b/16 of its bf16 size, which is where a
memory-bound decode step gains. Bits 2, 4 and 8 (codes that never straddle a byte) are supported;
3-bit layers use dequantize + GEMM.

Two kernels; :func:`quant_gemm` picks by the number of rows (:func:`_path`):

- M ≤ ``GEMV_MAX_M`` (decode; QuantLinear sends layers whose shapes fit to the faster
  :mod:`leanlm.kernels.quant_gemv` instead, act-order ones with their columns sorted by group,
  so this one serves the rest) —
  ``_gemv_kernel``, grid (M, ⌈N/BLOCK_N⌉, SPLIT_K), no tensor cores:
  acc[BLOCK_N] in fp32 gathers Σ_k q_k x_k over K-tiles. Codes are loaded as 32-bit words
  (``qweight.view(int32)``, free when a row is a whole number of words; little-endian, so word w
  holds codes 32w/b … 32(w+1)/b − 1; else as bytes) and code j of each word is
  ``word >> b·j & (2^b − 1)``, made an fp32 as bits(2^23 | q) − 2^23. With contiguous groups
  (g_idx None) dequantization leaves the inner loop: for a row and a group g,
  Σ_{k∈g} s(q_k − z) x_k = s · (Σ_{k∈g} q_k x_k − z · Σ_{k∈g} x_k), so a code costs shift, and/or,
  add and FMA, and s, z are read once per (row, group); a K-tile holds part of one group (BLOCK_K
  divides the group size) or GROUP_TILE whole groups. Otherwise (act-order ``g_idx``, or groups
  that do not align with words) each code looks its group up and becomes (q − z) · s. SPLIT_K = 1
  stores y in x's dtype; SPLIT_K > 1 adds fp32 partial sums atomically into a zeroed buffer.
- larger M — ``_quant_gemm_kernel``: a [BLOCK_K, BLOCK_N] tile of codes is read as bytes, becomes
  ŵ in fp32 and goes through tl.dot with a [BLOCK_M, BLOCK_K] tile of x; a K-tile lies inside one
  group (BLOCK_K divides the group size) or, with ``HAS_G_IDX``, looks groups up per column.

Tiles come from :func:`_gemv_config` / :func:`_config`; ``quant_gemm(..., config=dict(...))``
overrides them (keys in ``CONFIG_KEYS``) so that a benchmark can sweep them on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor, interpreting
from leanlm.kernels._triton import tl, triton

SUPPORTED_BITS = (2, 4, 8)
GEMV_MAX_M = 4
CONFIG_KEYS = ("kernel", "block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "prefetch")


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


@triton.jit
def _load_words(row_ptrs, n_mask, kw, w_hi, rw, EVEN_K: tl.constexpr):
    """Words kw … kw + WORDS − 1 of BLOCK_N rows as int32 (whole tiles when EVEN_K: a scalar mask
    along K keeps the loads vectorized)."""
    if EVEN_K:
        mask = n_mask[:, None] & (kw < w_hi)
    else:
        mask = n_mask[:, None] & (kw + rw < w_hi)[None, :]
    return tl.load(row_ptrs + (kw + rw)[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, N, K, group_size, w_per_split,
                 sx_m, sq_n, ss_n, sz_n, sy_m,
                 BITS: tl.constexpr, PER_WORD: tl.constexpr, GROUPS: tl.constexpr,
                 GROUP_TILE: tl.constexpr, EVEN_K: tl.constexpr,
                 PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # GROUPS: 0 contiguous groups, factorised (GROUP_TILE groups per K-tile); 1 group k // group_size
    # per code; 2 group g_idx[k] per code. A word holds PER_WORD codes; code j of a word becomes an
    # exact fp32 as bits(2^23 | q) − 2^23 (no int → float conversion), one shift of [BLOCK_N, WORDS]
    # per field.
    # The loop runs over word offsets (multiples of 16 words: vector loads); EVEN_K: K % BLOCK_K == 0.
    # PREFETCH loads the next tile's words before the current one is reduced (Triton's pipeliner
    # leaves loops without tl.dot alone), so two tiles per program are in flight.
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    rw = tl.arange(0, WORDS)
    x_row = x_ptr + pid_m.to(tl.int64) * sx_m
    acc = tl.zeros([BLOCK_N], tl.float32)
    w_lo = pid_k * w_per_split
    w_hi = tl.minimum(tl.cdiv(K, PER_WORD), w_lo + w_per_split)
    k_hi = tl.minimum(K, (w_lo + w_per_split) * PER_WORD)
    row_ptrs = qw_ptr + rn64[:, None] * sq_n
    if PREFETCH:
        words = _load_words(row_ptrs, n_mask, w_lo, w_hi, rw, EVEN_K)
    for kw in range(w_lo, w_hi, WORDS):
        k0 = kw * PER_WORD
        if PREFETCH:
            nxt = _load_words(row_ptrs, n_mask, kw + WORDS, w_hi, rw, EVEN_K)
        else:
            words = _load_words(row_ptrs, n_mask, kw, w_hi, rw, EVEN_K)
        part = tl.zeros([BLOCK_N, WORDS], tl.float32)  # Σ_j q_j x_j (dequantized if GROUPS > 0)
        xs = tl.zeros([WORDS], tl.float32)  # Σ_j x_j
        for j in tl.static_range(PER_WORD):
            rk = k0 + rw * PER_WORD + j
            k_mask = rk < k_hi
            x = tl.load(x_row + rk, mask=k_mask, other=0.0).to(tl.float32)
            q = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            if GROUPS == 0:
                part += q * x[None, :]
                xs += x
            else:
                if GROUPS == 2:  # act-order: any column may belong to any group
                    grp = tl.load(g_ptr + rk, mask=k_mask, other=0)
                else:
                    grp = rk // group_size
                e_mask = n_mask[:, None] & k_mask[None, :]
                s = tl.load(s_ptr + rn64[:, None] * ss_n + grp[None, :], mask=e_mask, other=0.0)
                z = tl.load(z_ptr + rn64[:, None] * sz_n + grp[None, :], mask=e_mask, other=0)
                part += (q - z.to(tl.float32)) * s.to(tl.float32) * x[None, :]
        if GROUPS == 0 and GROUP_TILE == 1:  # the tile lies in one group
            grp = k0 // group_size
            s = tl.load(s_ptr + rn64 * ss_n + grp, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn64 * sz_n + grp, mask=n_mask, other=0).to(tl.float32)
            acc += s * (tl.sum(part, axis=1) - z * tl.sum(xs, axis=0))
        elif GROUPS == 0:  # GROUP_TILE whole groups of WORDS // GROUP_TILE words each
            grp = k0 // group_size + tl.arange(0, GROUP_TILE)
            g_mask = n_mask[:, None] & (grp * group_size < k_hi)[None, :]
            s = tl.load(s_ptr + rn64[:, None] * ss_n + grp[None, :], mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn64[:, None] * sz_n + grp[None, :], mask=g_mask, other=0).to(tl.float32)
            qx = tl.sum(tl.reshape(part, [BLOCK_N, GROUP_TILE, WORDS // GROUP_TILE]), axis=2)
            xg = tl.sum(tl.reshape(xs, [GROUP_TILE, WORDS // GROUP_TILE]), axis=1)
            acc += tl.sum(s * (qx - z * xg[None, :]), axis=1)
        else:
            acc += tl.sum(part, axis=1)
        if PREFETCH:
            words = nxt
    if HAS_BIAS and pid_k == 0:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y_off = pid_m.to(tl.int64) * sy_m + rn
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + y_off, acc, mask=n_mask)
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _config(m: int, n: int, k: int, group_size: int, device: torch.device) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) of the dot kernel: GEMV-shaped calls split K until the
    grid has about four programs per SM; BLOCK_K divides the group size."""
    block_k = 64 if group_size == -1 else min(64, group_size)
    if m > 16:
        return 64, 64, block_k, 1
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(4 * _sms(device), tiles), k // (4 * block_k)))
    return 16, block_n, block_k, triton.next_power_of_2(split) if split > 1 else 1


def _gemv_config(m: int, n: int, k: int, group_size: int, device: torch.device,
                 bits: int = 4) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the GEMV kernel.

    A K-tile reads 256 bytes of each row (BLOCK_K = 512 codes at 4 bits) so that the loads in flight
    hide DRAM latency; with contiguous groups BLOCK_K is a multiple or a divisor of the group size.
    BLOCK_N is the largest of 64/32/16 that still gives ≥ 4 programs per SM; K is split (fp32
    atomics) only when M·⌈N/BLOCK_N⌉ is under two programs per SM.
    """
    sms = _sms(device)
    block_k = min(2048 // bits, max(32, triton.next_power_of_2(k)))
    if group_size != -1 and group_size % block_k and block_k % group_size:
        block_k = max(32, min(block_k, group_size & -group_size))  # largest power of 2 dividing it
    block_n = next((bn for bn in (64, 32) if m * triton.cdiv(n, bn) >= 4 * sms), 16)
    tiles = m * triton.cdiv(n, block_n)
    split = 1
    if tiles < 2 * sms:
        split = min(triton.next_power_of_2(triton.cdiv(4 * sms, tiles)), max(1, k // (2 * block_k)))
        split = 1 << (split.bit_length() - 1)  # a power of 2
    return block_n, block_k, split, 4


def _path(m: int, config: dict[str, Any] | None = None) -> str:
    """Which kernel runs x [m, K]: "gemv" for m ≤ GEMV_MAX_M, else "dot" (``config["kernel"]`` forces)."""
    forced = (config or {}).get("kernel")
    check(forced in (None, "gemv", "dot"), f"config kernel must be 'gemv' or 'dot', got {forced!r}")
    return forced or ("gemv" if m <= GEMV_MAX_M else "dot")


def _group_mode(act_order: bool, group_size: int, k: int, block_k: int, per_word: int) -> tuple[int, int]:
    """The GEMV kernel's (GROUPS, GROUP_TILE): (0, t) factorised over t contiguous groups per K-tile,
    (1, 1) group k // group_size per code, (2, 1) g_idx per code."""
    gs = group_size if group_size != -1 else max(k, 1)
    if act_order:
        return 2, 1
    if group_size == -1 or gs % block_k == 0:
        return 0, 1
    if block_k % gs == 0 and gs % per_word == 0:
        return 0, block_k // gs
    return 1, 1


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """qweight as int32 words (32/b codes each) when the reinterpretation is free, else the bytes."""
    if qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0 and qweight.storage_offset() % 4 == 0:
        try:
            return qweight.view(torch.int32)
        except RuntimeError:
            pass
    return qweight


def check_params(x: torch.Tensor, n: int, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """The launch checks both weight-only kernels share: scales and zeros [N, G], bias [N], out [M, N]."""
    m, k = x.shape
    groups = 1 if group_size == -1 else -(-k // group_size)
    check_tensor("scales", scales, 2, FLOATS, x.device)
    check_tensor("zeros", zeros, 2, (torch.uint8,), x.device)
    check(tuple(scales.shape) == (n, groups) and tuple(zeros.shape) == (n, groups),
          f"scales and zeros must be [{n}, {groups}], got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1, FLOATS, x.device)
        check(bias.shape[0] == n, f"bias has {bias.shape[0]} entries for N={n}")
    if out is not None:
        check(tuple(out.shape) == (m, n) and out.dtype == x.dtype and out.stride(-1) == 1,
              f"out must be [{m}, {n}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None, bits: int, group_size: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               split_k: int | None = None, config: dict[str, Any] | None = None) -> torch.Tensor:
    """Launch a kernel: x [M, K] -> y [M, N] in x's dtype.

    ``g_idx`` None means the default ``k // group_size`` (contiguous groups). ``config`` overrides
    the tile heuristic with keys among ``CONFIG_KEYS`` (``kernel``: "gemv" or "dot"; ``block_m`` is
    the dot kernel's); ``split_k`` overrides the K split of either.
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
    check_params(x, n, scales, zeros, group_size, bias, out)
    if g_idx is not None:
        check_tensor("g_idx", g_idx, 1, (torch.int32, torch.int64), dev)
        check(g_idx.shape[0] == k, f"g_idx has {g_idx.shape[0]} entries for K={k}")
    cfg = dict(config or {})
    check(set(cfg) <= set(CONFIG_KEYS), f"config keys must be among {CONFIG_KEYS}, got {sorted(cfg)}")
    path = _path(m, cfg)
    gs = (group_size if group_size != -1 else max(k, 1))
    if path == "gemv":
        block_n, block_k, split, warps = _gemv_config(m, n, k, group_size, dev, bits)
        block_m = 1
    else:
        block_m, block_n, block_k, split = _config(m, n, k, group_size, dev)
        warps = 4
    block_m, block_n, block_k = (cfg.get("block_m", block_m), cfg.get("block_n", block_n),
                                 cfg.get("block_k", block_k))
    split = split_k or cfg.get("split_k") or split
    launch = dict(num_warps=cfg.get("num_warps", warps))
    if "num_stages" in cfg:
        launch["num_stages"] = cfg["num_stages"]
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check(size >= 1 and size & (size - 1) == 0, f"config {name} must be a power of 2, got {size}")
    dot_ok = min(block_m, block_n, block_k) >= 16 and (g_idx is not None or group_size == -1
                                                        or gs % block_k == 0)
    check(path == "gemv" or dot_ok,
          f"the dot kernel needs tiles ≥ 16 and BLOCK_K dividing the group size, got {cfg}")
    y = out if split == 1 and out is not None else (
        torch.zeros(m, n, dtype=torch.float32, device=dev) if split > 1
        else torch.empty(m, n, dtype=x.dtype, device=dev))
    if m and n:
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        common = (scales if bias is None else bias, y)
        if path == "gemv":
            qw = _words(qweight)
            per = (32 if qw.dtype == torch.int32 else 8) // bits
            check(block_k >= per, f"config block_k must hold whole {per}-code words, got {block_k}")
            mode, group_tile = _group_mode(g_idx is not None, group_size, k, block_k, per)
            _gemv_kernel[(m, triton.cdiv(n, block_n), split)](
                x, qw, scales, zeros, qweight if g_idx is None else g_idx, *common, n, k, gs,
                k_per_split // per, x.stride(0), qw.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                BITS=bits, PER_WORD=per, GROUPS=mode, GROUP_TILE=group_tile,
                EVEN_K=k % block_k == 0,
                PREFETCH=bool(cfg.get("prefetch", True)),
                HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k, **launch)
        else:
            _quant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)](
                x, qweight, scales, zeros, qweight if g_idx is None else g_idx, *common, m, n, k, gs,
                k_per_split, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                BITS=bits, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                UPCAST=interpreting() and x.dtype != torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, **launch)
    if split > 1:
        if out is not None:
            return out.copy_(y)
        return y.to(x.dtype)
    return y
