"""Attention over a paged K/V cache: split-KV decode (Flash-Decoding) and varlen prefill.

Layout (the serving engine's, :class:`~leanlm.serve.paged.PagedKVCache`): one layer's keys are
[num_blocks · block_size, kv_heads, D]; request r owns blocks ``block_tables[r, :]`` (padded
with anything past its length — entries beyond ⌈seq_lens[r] / block_size⌉ are never read) and
has ``seq_lens[r]`` keys after this step. Its queries are rows ``query_start[r]:query_start[r+1]``
of q [T, H, D], at positions ``seq_lens[r] - q_len .. seq_lens[r] - 1``. Query at position p sees
key j iff j ≤ p and, with a sliding window W, p − j < W. Query head h reads K/V head
h // (H / kv_heads) (grouped-query attention).

Both kernels are FlashAttention's online softmax (Dao et al. 2022): over key tiles,

    m' = max(m, max_j s_j),   ℓ' = ℓ·e^{m−m'} + Σ_j e^{s_j−m'},   o' = o·e^{m−m'} + Σ_j e^{s_j−m'} v_j

so no score matrix is ever written to memory. Keys are gathered through the block table one
tile at a time (slot = table[j // block_size] · block_size + j % block_size).

Decode (one query per request) is memory-bound and has little parallelism per request, so it
uses Flash-Decoding's split-KV scheme (Dao et al. 2023, "Flash-Decoding for long-context
inference"): the keys of a request are cut into ``num_splits`` partitions processed by separate
programs, each writing a partial output o_s and its log-sum-exp L_s = m_s + log ℓ_s; a second
kernel combines them: o = Σ_s e^{L_s − L} o_s with L = log Σ_s e^{L_s}. A decode program serves
all query heads of one K/V head, so each key is read once per group. Prefill tiles BLOCK_M
queries of one head against the request's keys up to the tile's last position.
"""

from __future__ import annotations

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor, interpreting
from leanlm.kernels._triton import tl, triton

INDEX = (torch.int32, torch.int64)


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, seq_lens: list[int], query_start: list[int],
              block_size: int, scale: float, window: int | None = None,
              kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]: each request's queries against its keys (int8 caches are
    dequantized with ``kv_scales`` [slots, kv_heads] as they are read).

    Precision follows the model's own SDPA backend (the reference generator): one query is
    scored in fp32, several in q's dtype (fp64 stays fp64). A batch of decode queries only (the
    serving engine's steady state) is computed for all requests at once."""
    if q.shape[0] == len(seq_lens):  # one query per request
        lens = torch.tensor(seq_lens, device=q.device)
        return decode_reference(q, k_cache, v_cache, block_tables, lens, max(seq_lens), block_size, scale,
                                window, kv_scales)
    out = torch.empty_like(q)
    offsets = torch.arange(block_size, device=q.device)
    for r, n in enumerate(seq_lens):
        qs, qe = query_start[r], query_start[r + 1]
        acc = q.dtype if q.dtype == torch.float64 or qe - qs > 1 else torch.float32
        blocks = block_tables[r, :-(-n // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets).flatten()[:n]
        kr, vr = _gather(k_cache, v_cache, slots, acc, kv_scales)
        kr, vr = kr.transpose(0, 1), vr.transpose(0, 1)
        qp = torch.arange(n - (qe - qs), n, device=q.device)[:, None]
        kp = torch.arange(n, device=q.device)[None, :]
        mask = kp <= qp
        if window is not None:
            mask &= (qp - kp) < window
        qr = q[qs:qe].transpose(0, 1).to(acc)
        o = torch.nn.functional.scaled_dot_product_attention(
            qr[None], kr[None], vr[None], attn_mask=mask, scale=scale,
            enable_gqa=q.shape[1] != k_cache.shape[1])
        out[qs:qe] = o[0].transpose(0, 1).to(q.dtype)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype,
            kv_scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows of ``slots`` in ``dtype`` (dequantized when the cache is int8)."""
    flat = slots.reshape(-1)
    pick = lambda t: t.index_select(0, flat).view(*slots.shape, *t.shape[1:]).to(dtype)
    k, v = pick(k_cache), pick(v_cache)
    if kv_scales is not None:
        k = k * pick(kv_scales[0])[..., None]
        v = v * pick(kv_scales[1])[..., None]
    return k, v


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, lens: torch.Tensor, max_len: int, block_size: int,
                     scale: float, window: int | None,
                     kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One query per request, batched: K/V gathered into [R, max_len, kv_heads, D] (``lens``
    [R] keys each, max_len ≥ all of them). Every shape depends on R and max_len only, so
    ``torch.compile`` traces it with symbolic shapes."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    r, h, d = q.shape
    kv_heads = k_cache.shape[1]
    j = torch.arange(max_len, device=q.device)
    valid = j[None, :] < lens[:, None]  # [R, L]
    if window is not None:
        valid &= j[None, :] >= lens[:, None] - window
    slots = block_tables[:, j // block_size].long() * block_size + j % block_size
    slots = torch.where(valid, slots, 0).reshape(-1)  # padding reads slot 0 and is masked out
    scales = kv_scales or (None, None)
    # gathered [R, L, kv_heads, D], laid out for the two batched products in the copy that
    # converts them: keys [R, kv_heads, D, L], values [R, kv_heads, L, D]
    k = _gather_as(k_cache, scales[0], slots, (r, max_len, kv_heads, d), (0, 2, 3, 1), acc)
    v = _gather_as(v_cache, scales[1], slots, (r, max_len, kv_heads, d), (0, 2, 1, 3), acc)
    qg = q.to(acc).view(r, kv_heads, h // kv_heads, d)
    scores = (qg @ k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).reshape(r, h, d).to(q.dtype)


def _gather_as(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor,
               shape: tuple[int, ...], order: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rows ``slots`` of ``cache`` viewed as ``shape``, permuted to ``order``, contiguous in
    ``dtype`` (one copy; dequantized with the [slots, kv_heads] ``scales`` of an int8 cache)."""
    rows = cache.index_select(0, slots).view(shape).permute(order)
    if scales is None:
        return rows.to(dtype, memory_format=torch.contiguous_format)
    s = scales.index_select(0, slots).view(*shape[:-1], 1).permute(order).to(dtype)
    return (rows.to(dtype) * s).contiguous()


@triton.jit
def _softmax_step(q, k, v, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """One key tile of the online softmax: q [M, D], k/v [N, D], valid [M, N] -> (m, ℓ, o)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays empty
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _load_kv(kc_ptr, vc_ptr, tables_ptr, r_table, n, n_mask, kvh, d, d_mask, block_size,
             cs_slot, cs_h, UPCAST: tl.constexpr):
    """K and V rows [N, D] of token indices ``n`` of one request, through its block table
    (in fp32 with ``UPCAST``: Triton's interpreter gets bf16 dot products wrong)."""
    blk = tl.load(tables_ptr + r_table + n // block_size, mask=n_mask, other=0).to(tl.int64)
    slot = blk * block_size + n % block_size
    off = slot[:, None] * cs_slot + kvh * cs_h + d[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(kc_ptr + off, mask=mask, other=0.0)
    v = tl.load(vc_ptr + off, mask=mask, other=0.0)
    if UPCAST:
        return k.to(tl.float32), v.to(tl.float32)
    return k, v


@triton.jit
def _attend_keys(q, q_pos, row_mask, lo, hi, window, kc_ptr, vc_ptr, tables_ptr, r_table, kvh, d,
                 d_mask, block_size, cs_slot, cs_h, scale, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of ``ROWS`` queries (at positions ``q_pos``) over one request's keys
    lo..hi-1, causal and windowed; returns (m, ℓ, unnormalised o)."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, v = _load_kv(kc_ptr, vc_ptr, tables_ptr, r_table, n, n_mask, kvh, d, d_mask,
                        block_size, cs_slot, cs_h, UPCAST)
        valid = row_mask[:, None] & n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        if window > 0:
            valid = valid & (q_pos[:, None] - n[None, :] < window)
        m_i, l_i, acc = _softmax_step(q.to(k.dtype), k, v, valid, m_i, l_i, acc, scale, IEEE)
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_l_ptr,
                   scale, window, group, head_dim, block_size, partition, num_splits,
                   qs_t, qs_h, cs_slot, cs_h, tbl_stride, os_t, os_h,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    lo = split * partition
    hi = tl.minimum(lo + partition, seq_len)
    lo = tl.where(window > 0, tl.maximum(lo, seq_len - window), lo)  # one type on both branches
    g = tl.arange(0, BLOCK_G)
    heads = kvh * group + g
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(q_ptr + r * qs_t + heads[:, None] * qs_h + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + seq_len - 1  # every head of the group: the last token
    m_i, l_i, acc = _attend_keys(q, q_pos, g_mask, lo, hi, window, kc_ptr, vc_ptr, tables_ptr,
                                 r * tbl_stride, kvh, d, d_mask, block_size, cs_slot, cs_h, scale,
                                 BLOCK_G, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:  # partial result and its log-sum-exp, combined by _combine_kernel
        row = (r * (group * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * head_dim + d[None, :], o,
                 mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_l_ptr + row, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")), mask=g_mask)
    else:
        tl.store(out_ptr + r * os_t + heads[:, None] * os_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(part_o_ptr, part_l_ptr, out_ptr, num_heads, num_splits, head_dim, os_t, os_h,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    row = (r * num_heads + h) * num_splits + s
    lse = tl.load(part_l_ptr + row, mask=s_mask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + row[:, None] * head_dim + d[None, :],
                mask=s_mask[:, None] & (d[None, :] < head_dim), other=0.0)
    o = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + r * os_t + h * os_h + d, o.to(out_ptr.dtype.element_ty), mask=d < head_dim)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
                    scale, window, group, head_dim, block_size,
                    qs_t, qs_h, cs_slot, cs_h, tbl_stride, os_t, os_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_M
    q_start = tl.load(query_start_ptr + r).to(tl.int64)
    q_len = tl.load(query_start_ptr + r + 1) - q_start
    if first < q_len:
        seq_len = tl.load(seq_lens_ptr + r)
        kvh = h // group
        i = first + tl.arange(0, BLOCK_M)
        i_mask = i < q_len
        q_pos = seq_len - q_len + i
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        q_rows = q_start + i
        q = tl.load(q_ptr + q_rows[:, None] * qs_t + h * qs_h + d[None, :],
                    mask=i_mask[:, None] & d_mask[None, :], other=0.0)
        hi = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_M)  # past the tile's last query
        lo = tl.where(window > 0, tl.maximum(0, seq_len - q_len + first - window + 1), 0)
        _, l_i, acc = _attend_keys(q, q_pos, i_mask, lo, hi, window, kc_ptr, vc_ptr, tables_ptr,
                                   r * tbl_stride, kvh, d, d_mask, block_size, cs_slot, cs_h, scale,
                                   BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * os_t + h * os_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & d_mask[None, :])


def decode_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Flash-Decoding's split count: enough programs to fill the GPU (≈4 per SM), no split
    shorter than 256 keys."""
    if device.type != "cuda":
        return max(1, min(4, -(-max_seq_len // 256)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_seq_len // 256)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                    block_size: int, scale: float, max_query_len: int, max_seq_len: int,
                    window: int | None = None, num_splits: int | None = None,
                    out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Launch decode (every request has one query) or prefill; q [T, H, D] -> [T, H, D].

    ``max_query_len``/``max_seq_len`` size the grid (host ints, so the launch needs no sync);
    ``num_splits`` overrides the decode split count, ``config`` the tile (``block_n``, prefill's
    ``block_m``, and the launch's ``num_warps`` / ``num_stages``) — for a benchmark's sweep.
    """
    dev = q.device
    check_runnable(dev)
    check_tensor("q", q, 3, FLOATS, dev)
    t, h, d = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, 3, FLOATS, dev)
        check(c.is_contiguous() and c.shape[2] == d and c.shape[0] % block_size == 0,
              f"{name} must be a contiguous [blocks*{block_size}, kv_heads, {d}] tensor, got "
              f"{tuple(c.shape)}")
    check(k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
          "k_cache and v_cache differ in shape or dtype")
    kv_heads = k_cache.shape[1]
    check(h % kv_heads == 0, f"{h} query heads are not a multiple of {kv_heads} K/V heads")
    r = seq_lens.shape[0]
    check_tensor("block_tables", block_tables, 2, INDEX, dev)
    check_tensor("seq_lens", seq_lens, 1, INDEX, dev)
    check_tensor("query_start", query_start, 1, INDEX, dev)
    check(block_tables.shape[0] == r and query_start.shape[0] == r + 1,
          f"block_tables ({block_tables.shape[0]} rows) and query_start ({query_start.shape[0]}) "
          f"must describe {r} requests (query_start has one entry more)")
    check(block_tables.shape[1] * block_size >= max_seq_len,
          f"block_tables has {block_tables.shape[1]} blocks per request, fewer than "
          f"max_seq_len {max_seq_len} needs")
    o = torch.empty_like(q) if out is None else out
    check(o.shape == q.shape and o.dtype == q.dtype and o.stride(-1) == 1,
          f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(o.shape)} {o.dtype}")
    if r == 0 or t == 0:
        return o
    group = h // kv_heads
    upcast = interpreting() and q.dtype != torch.float32
    ieee = q.dtype == torch.float32 or upcast
    win = window or 0
    block_d = triton.next_power_of_2(d)
    common = (scale, win, group, d, block_size)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
               block_tables.stride(0), o.stride(0), o.stride(1))
    min_tile = 16  # tl.dot's smallest tile on a GPU
    launch = {k: v for k, v in (config or {}).items() if k in ("num_warps", "num_stages")}
    if max_query_len == 1:
        check(t == r, f"decode has one query per request: {t} queries for {r} requests")
        splits = num_splits or decode_splits(r, kv_heads, max_seq_len, dev)
        partition = -(-max_seq_len // splits)
        block_n = (config or {}).get("block_n") or max(min_tile, min(64, triton.next_power_of_2(partition)))
        partition = -(-partition // block_n) * block_n
        part_o = part_l = o  # unused when not split
        if splits > 1:
            part_o = torch.empty(r, h, splits, d, dtype=torch.float32, device=dev)
            part_l = torch.empty(r, h, splits, dtype=torch.float32, device=dev)
        _decode_kernel[(r, kv_heads, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, o, part_o, part_l, *common, partition, splits,
            *strides, BLOCK_G=max(min_tile, triton.next_power_of_2(group)), BLOCK_N=block_n,
            BLOCK_D=block_d, SPLIT=splits > 1, IEEE=ieee, UPCAST=upcast, **launch)
        if splits > 1:
            _combine_kernel[(r, h)](part_o, part_l, o, h, splits, d, o.stride(0), o.stride(1),
                                    BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
        return o
    block_m = (config or {}).get("block_m") or max(min_tile, min(64, triton.next_power_of_2(max_query_len)))
    block_n = (config or {}).get("block_n") or (64 if d <= 64 else 32)
    _prefill_kernel[(r, h, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, o, *common, *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee, UPCAST=upcast, **launch)
    return o
