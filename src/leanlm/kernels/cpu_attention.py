"""Paged decode attention on the CPU: a C++ kernel that reads K/V through the block table in place.

The torch reference (:func:`leanlm.kernels.paged_attention.decode_reference`) gathers every
request's keys and values into a fresh fp32 copy laid out for two batched products; on a small
model serving 32 requests that copy is most of a decode step (a py-spy profile of ``leanlm
serve`` put the paged decode attention at ~60% of the engine core). The kernel here
(``csrc/paged_decode.cpp``) computes the same thing without the copy: one request per work item
on ATen's thread pool, each slot's row (all K/V heads side by side, ``block_size`` slots
contiguous per block) read once, widened to fp32 in registers (AVX-512 where the CPU has it),

    s_j = (q · k_j)·scale,   p_j = e^{s_j − max s} / Σ_j e^{s_j − max s},   o = Σ_j p_j v_j,

in fp32 as the reference does for one query per request, so the two agree to fp32 rounding
(they differ in summation order, and e^x is Cephes' polynomial, within 2 ulp of expf).

:func:`rotary_decode` is the same kernel for a step of one query per request given its q/k/v
unrotated: each request's work item first rotates its k and q (the roundings of
:mod:`leanlm.kernels.rotary`) and writes its k and v to its slot, as the serving engine's CPU
decode step would with a rotary op for q, one for k, two K/V row stores and the decode kernel:
one op instead of five per layer. :func:`rotary_decode_qkv` takes the fused q/k/v projection's
output as it is, so a layer's attention between its two projections is one op.

It is one of the C++ CPU ops of :mod:`leanlm.kernels.cpu_ops` (built on first use; where and
when they run is said there), here for a float cache whose dtype is q's (:func:`runs`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from leanlm.kernels import check, check_tensor, cpu_ops, paged_attention
from leanlm.kernels.cpu_ops import DTYPES, ops


def runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`attention` serves this batch (else the torch reference does)."""
    return k_cache.dtype == q.dtype and cpu_ops.runs(q)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """One query per request: q [R, H, D] against ``seq_lens[r]`` keys of request r through row
    r of ``block_tables`` -> [R, H, D] (layout: :mod:`leanlm.kernels.paged_attention`)."""
    dev = q.device
    check_tensor("q", q, 3, DTYPES, dev)
    check_tensor("k_cache", k_cache, 3, (q.dtype,), dev)
    check_tensor("v_cache", v_cache, 3, (q.dtype,), dev)
    check_tensor("block_tables", block_tables, 2, paged_attention.INDEX, dev)
    r, heads, d = q.shape
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == d,
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
          f"[slots, kv_heads, {d}]")
    check(heads % k_cache.shape[1] == 0,
          f"{heads} query heads are not a multiple of {k_cache.shape[1]} K/V heads")
    check(seq_lens.shape == (r,) and block_tables.shape[0] == r,
          f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} must "
          f"describe {r} requests")
    lens = seq_lens.to(torch.int64).contiguous()
    if r:
        low, high = int(lens.min()), int(lens.max())
        check(low >= 1, f"every request needs at least one key, got seq_lens min {low}")
        check(high <= block_tables.shape[1] * block_size,
              f"seq_lens max {high} exceeds the {block_tables.shape[1]} blocks of {block_size} "
              "slots a block_tables row holds")
    native = ops()
    check(native is not None, "the C++ CPU attention kernel could not be built (see the log)")
    return native.paged_decode(q, k_cache, v_cache, block_tables.to(torch.int32).contiguous(), lens,
                               block_size, scale, window or -1)


@dataclass(frozen=True)
class Split:
    """A varlen paged batch (the arguments of :func:`paged_attention.reference`) cut once per
    step, for every layer: its one-query requests, which the kernel serves in one call, and the
    others (prefill chunks, draft verification), which the reference serves."""

    single_rows: torch.Tensor | None  # the one-query requests' rows of q (None: every request)
    single_tables: torch.Tensor  # [S, W] int32
    single_lens: torch.Tensor  # [S] int64
    many_rows: torch.Tensor | None  # the other requests' rows of q (None: no such request)
    many_tables: torch.Tensor
    many_lens: list[int]
    many_starts: list[int]  # offsets of their queries in q[many_rows]

    @classmethod
    def of(cls, block_tables: torch.Tensor, seq_lens: list[int], query_start: list[int],
           block_size: int) -> Split:
        counts = [b - a for a, b in itertools.pairwise(query_start)]
        single = [r for r, m in enumerate(counts) if m == 1]
        many = [r for r, m in enumerate(counts) if m > 1]
        lens = [seq_lens[r] for r in single]
        check(all(1 <= n <= block_tables.shape[1] * block_size for n in lens),
              f"seq_lens {lens} must be ≥ 1 and fit {block_tables.shape[1]} blocks of {block_size}")
        everyone = len(single) == len(seq_lens)
        starts = [0]
        for r in many:
            starts.append(starts[-1] + counts[r])
        return cls(
            single_rows=None if everyone else torch.tensor([query_start[r] for r in single]),
            single_tables=(block_tables if everyone else block_tables[single]).to(torch.int32).contiguous(),
            single_lens=torch.tensor(lens, dtype=torch.int64),
            many_rows=torch.cat([torch.arange(query_start[r], query_start[r + 1]) for r in many])
            if many else None,
            many_tables=block_tables[many], many_lens=[seq_lens[r] for r in many], many_starts=starts)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: Split,
              block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, H, D] of a varlen paged batch cut by ``split`` -> [T, H, D], where :func:`runs`:
    the one-query requests through the kernel in one call (q, caches and tables checked by the
    engine that made them), the others through the reference, which scores several queries in
    q's dtype as the model's own SDPA does."""
    native, window = ops(), window or -1
    if split.single_rows is None:
        return native.paged_decode(q, k_cache, v_cache, split.single_tables, split.single_lens,
                                   block_size, scale, window)
    out = torch.empty_like(q)
    if split.single_lens.numel():
        out[split.single_rows] = native.paged_decode(q[split.single_rows], k_cache, v_cache,
                                                     split.single_tables, split.single_lens, block_size,
                                                     scale, window)
    if split.many_rows is not None:
        out[split.many_rows] = paged_attention.reference(
            q[split.many_rows], k_cache, v_cache, split.many_tables, split.many_lens, split.many_starts,
            block_size, scale, None if window < 0 else window)
    return out


def rotary_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, split: Split,
                  block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """:func:`attention` of a step of one query per request (``split`` has no other), where
    :func:`runs`, from unrotated q [R, H, D] and k/v [R, Hkv, D]: q and k rotated by cos/sin
    [R, D], k and v written to the caches at ``slots`` [R] (int64, every one a real slot) first."""
    return ops().rotary_decode(q, k, v, cos, sin, k_cache, v_cache, slots,
                               *_decode_step(split, block_size, scale, window))


def rotary_decode_qkv(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, split: Split,
                      block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """:func:`rotary_decode` of the fused q/k/v projection's output qkv [R, (H + 2 Hkv) D] (q, k, v
    side by side; cos/sin hold one [D] row per request) -> [R, H D], the o projection's input."""
    return ops().rotary_decode_qkv(qkv, heads, cos, sin, k_cache, v_cache, slots,
                                   *_decode_step(split, block_size, scale, window))


def _decode_step(split: Split, block_size: int, scale: float, window: int | None) -> tuple:
    """The rotary_decode ops' trailing arguments, for a step of one query per request only."""
    check(split.single_rows is None and split.many_rows is None,
          "rotary_decode takes a step of one query per request")
    return split.single_tables, split.single_lens, block_size, scale, -1 if window is None else window
