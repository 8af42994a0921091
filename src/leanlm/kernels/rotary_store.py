"""Rotary embedding of a step's q and k fused with the store of k and v into the paged KV cache.

For T tokens with q [T, H, D], k/v [T, Hkv, D] and the rotary tables cos/sin [T, D] of their
positions (both halves equal, as the model builds them), one program per token computes, in the
"rotate_half" layout of :mod:`leanlm.kernels.rotary` (element i < d/2 paired with i + d/2):

    q'_i       = q_i · cos θ_i − q_{i+d/2} · sin θ_i,    q'_{i+d/2} = q_{i+d/2} · cos θ_i + q_i · sin θ_i
    k'         = the same rotation of k
    k_cache[slot_t] = k'_t,    v_cache[slot_t] = v_t      (slot_t < 0: not cached, skipped)

with ``slot = block · block_size + offset`` as in :mod:`leanlm.kernels.kv_store` (vLLM's
``reshape_and_cache``). Unfused, a paged layer launches rotary for q, rotary for k and the KV
store: three kernels, with the rotated k written to memory and read back. Fused, q, k and v are
read once, q' written once and k' go straight to their cache slots (k' itself is written only
when asked for). Products are formed in fp32 and rounded once, as the rotary kernel does.

The kernel stores to float caches (fp32/fp16/bf16). :func:`apply` is the dispatcher: the fused
kernel where :func:`~leanlm.kernels.use_triton` says so and the cache is a float one; for another
cache dtype (FP8) the rotary kernel and the KV store reference; elsewhere the :func:`reference`,
which is the rotary reference followed by the KV store reference, so the reference path gives
exactly what the unfused ops give.
"""

from __future__ import annotations

import torch

from leanlm import kernels
from leanlm.kernels import FLOATS, check, check_runnable, check_tensor, kv_store, rotary
from leanlm.kernels._triton import tl, triton


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k/v [T, Hkv, D], cos/sin [T, D] -> (q', k'), with k' and v written to their
    cache slots: :func:`rotary.reference` of q and k, then :func:`kv_store.reference`."""
    c, s = cos[:, None], sin[:, None]  # [T, 1, D]: broadcast over the heads
    q_rot, k_rot = rotary.reference(q, c, s), rotary.reference(k, c, s)
    kv_store.reference(k_cache, v_cache, k_rot, v, slot_mapping)
    return q_rot, k_rot


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr,
                         slot_ptr, n_heads, n_kv_heads, half,
                         qs_t, qs_h, ks_t, ks_h, vs_t, vs_h, cs_t, qos_t, qos_h, kos_t, kos_h,
                         cs_slot, cs_h, HAS_K_OUT: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    cos = tl.load(cos_ptr + t * cs_t + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * cs_t + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # q: every head, BLOCK_H at a time
    q_ty = qo_ptr.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (h[:, None] < n_heads) & dmask[None, :]
        src = q_ptr + t * qs_t + h[:, None] * qs_h + d[None, :]
        q1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        q2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        dst = qo_ptr + t * qos_t + h[:, None] * qos_h + d[None, :]
        tl.store(dst, (q1 * cos - q2 * sin).to(q_ty), mask=mask)
        tl.store(dst + half, (q2 * cos + q1 * sin).to(q_ty), mask=mask)
    # k: rotated in registers, then to k' (if asked) and to its cache slot, with v
    kh = tl.arange(0, BLOCK_KH).to(tl.int64)
    kmask = (kh[:, None] < n_kv_heads) & dmask[None, :]
    src = k_ptr + t * ks_t + kh[:, None] * ks_h + d[None, :]
    k1 = tl.load(src, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(src + half, mask=kmask, other=0.0).to(tl.float32)
    r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)  # k' in k's dtype, as unfused
    r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
    if HAS_K_OUT:
        dst = ko_ptr + t * kos_t + kh[:, None] * kos_h + d[None, :]
        tl.store(dst, r1, mask=kmask)
        tl.store(dst + half, r2, mask=kmask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = slot * cs_slot + kh[:, None] * cs_h + d[None, :]
        kc_ty = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + dst, r1.to(kc_ty), mask=kmask)
        tl.store(kc_ptr + dst + half, r2.to(kc_ty), mask=kmask)
        src = v_ptr + t * vs_t + kh[:, None] * vs_h + d[None, :]
        v1 = tl.load(src, mask=kmask, other=0.0)
        v2 = tl.load(src + half, mask=kmask, other=0.0)
        vc_ty = vc_ptr.dtype.element_ty
        tl.store(vc_ptr + dst, v1.to(vc_ty), mask=kmask)
        tl.store(vc_ptr + dst + half, v2.to(vc_ty), mask=kmask)


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None,
                 k_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel: q [T, H, D], k/v [T, Hkv, D] (any strides but unit stride on D),
    cos/sin [T, D], caches [slots, Hkv, D] contiguous, slot_mapping [T]. Returns q' (into
    ``q_out`` when given; ``q_out=q`` rotates in place); k' goes to ``k_out`` only when given."""
    dev = q.device
    check_runnable(dev)
    check_tensor("q", q, 3, FLOATS, dev)
    t, h, d = q.shape
    check(d % 2 == 0, f"rotary needs an even head dimension, got {d}")
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, 3, FLOATS, dev)
        check(x.shape[0] == t and x.shape[2] == d,
              f"{name} must be [{t}, heads, {d}] like q, got {tuple(x.shape)}")
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    check(h % k.shape[1] == 0, f"{h} query heads are not a multiple of {k.shape[1]} K/V heads")
    for name, x in (("cos", cos), ("sin", sin)):
        check_tensor(name, x, 2, FLOATS, dev)
        check(tuple(x.shape) == (t, d), f"{name} must be [{t}, {d}], got {tuple(x.shape)}")
    check(cos.stride() == sin.stride(), "cos and sin must have the same strides")
    kv_store.check_caches(k, k_cache, v_cache, slot_mapping)
    y = torch.empty_like(q) if q_out is None else q_out
    for name, out, like in (("q_out", y, q), ("k_out", k_out, k)):
        if out is not None:
            check(out.shape == like.shape and out.dtype == like.dtype and out.device == dev
                  and out.stride(-1) == 1, f"{name} must be {tuple(like.shape)} {like.dtype} with "
                  f"unit stride on D, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if t:
        ko = k if k_out is None else k_out  # an unused pointer when k' is not asked for
        _rotary_store_kernel[(t,)](
            q, k, v, cos, sin, y, ko, k_cache, v_cache, slot_mapping, h, k.shape[1], d // 2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), y.stride(0), y.stride(1), ko.stride(0), ko.stride(1),
            k_cache.stride(0), k_cache.stride(1), HAS_K_OUT=k_out is not None,
            BLOCK_H=min(triton.next_power_of_2(h), 16), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(d // 2))
    return y


def apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The dispatcher (shapes as :func:`rotary_store`): returns q', with k' and v stored. The
    fused kernel where kernels run and the cache is a float one; for another cache dtype the
    rotary kernel and the KV store reference; elsewhere the :func:`reference`."""
    if not kernels.use_triton(q, k, v):
        return reference(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)[0]
    if k_cache.dtype in FLOATS and v_cache.dtype in FLOATS:
        return rotary_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    c, s = cos[None, None], sin[None, None]  # [1, 1, T, D]; q/k as [1, heads, T, D] views
    q_rot = rotary.rotary(q.transpose(0, 1)[None], c, s)[0].transpose(0, 1)
    k_rot = rotary.rotary(k.transpose(0, 1)[None], c, s)[0].transpose(0, 1)
    kv_store.reference(k_cache, v_cache, k_rot, v, slot_mapping)
    return q_rot
