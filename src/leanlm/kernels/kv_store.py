"""Writing a step's new K/V into their slots of the paged cache (vLLM's ``reshape_and_cache``).

The cache of one layer is [num_blocks · block_size, kv_heads, head_dim]; token t of the step goes
to slot ``slot_mapping[t] = block · block_size + offset`` (a negative slot means "not cached",
e.g. a padding token, and is skipped). One program copies one token's K and V rows for every
head, casting to the cache dtype on the way.
"""

from __future__ import annotations

import torch

from leanlm.kernels import FLOATS, check, check_runnable, check_tensor
from leanlm.kernels._triton import tl, triton


def reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """k/v [T, Hkv, D] -> k_cache/v_cache[slot_mapping] (rows with a negative slot skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    write_rows(k_cache, slots, k[keep])
    write_rows(v_cache, slots, v[keep])


def write_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slots] = rows in the cache's dtype; an FP8 cache through its bytes (CPU torch has no
    FP8 ``index_copy_``; a cast and a byte copy are the same store)."""
    rows = rows.to(cache.dtype)
    if cache.dtype == torch.float8_e4m3fn:
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.index_copy_(0, slots, rows)


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads, head_dim,
                     ks_t, ks_h, vs_t, vs_h, cs_slot, cs_h,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < n_heads) & (d[None, :] < head_dim)
        src = h[:, None] * ks_h + d[None, :]
        dst = slot * cs_slot + h[:, None] * cs_h + d[None, :]
        k = tl.load(k_ptr + t * ks_t + src, mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        src = h[:, None] * vs_h + d[None, :]
        v = tl.load(v_ptr + t * vs_t + src, mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def check_caches(k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """The caches [slots, Hkv, D] (contiguous, float) and ``slot_mapping`` [T] that new K/V rows
    k [T, Hkv, D] are stored through (here and by :mod:`leanlm.kernels.rotary_store`)."""
    dev = k.device
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, 3, FLOATS, dev)
        check(c.is_contiguous(), f"{name} must be contiguous")
        check(tuple(c.shape[1:]) == tuple(k.shape[1:]),
              f"{name} holds [{c.shape[1]}, {c.shape[2]}] per slot, new K/V are "
              f"[{k.shape[1]}, {k.shape[2]}]")
    check(k_cache.shape == v_cache.shape, "k_cache and v_cache differ in shape")
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64), dev)
    check(slot_mapping.shape[0] == k.shape[0],
          f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")


def kv_store(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Launch the kernel: k/v [T, Hkv, D] (unit stride on D), caches [slots, Hkv, D] contiguous."""
    dev = k.device
    check_runnable(dev)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, 3, FLOATS, dev)
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    check_caches(k, k_cache, v_cache, slot_mapping)
    if k.shape[0]:
        _kv_store_kernel[(k.shape[0],)](
            k, v, k_cache, v_cache, slot_mapping, k.shape[1], k.shape[2], k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
            BLOCK_H=triton.next_power_of_2(k.shape[1]), BLOCK_D=triton.next_power_of_2(k.shape[2]))
