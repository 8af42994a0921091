"""Fused rotary + KV store kernel against its reference (Triton interpreter on CPU, fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernel_checks import poisoned

from leanlm.errors import LeanLMError
from leanlm.kernels import kernel_mode, kv_store, rotary, rotary_store

SLOTS, BLOCK = 64, 16  # 4 blocks of 16 slots


def tables(t: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] of random positions, both halves equal (as the model builds them)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 500, (t,), generator=g).float()
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    return emb.cos(), emb.sin()


def step(t: int, h: int, kv: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided views of one fused qkv product [T, (H + 2 Hkv) · D], and cos/sin."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * kv) * d, generator=g)
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    return (q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d), *tables(t, d, g))


def slot_patterns(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return {
        "contiguous": torch.arange(5, 5 + t),  # crosses a block boundary when t > 11
        "scattered": torch.randperm(SLOTS, generator=g)[:t],  # non-contiguous blocks and offsets
        "skipped": torch.where(torch.arange(t) % 3 == 1, -1, torch.randperm(SLOTS, generator=g)[:t]),
        # inside one block, partly filled (or every other slot of the first blocks)
        "partial_block": torch.arange(2 * BLOCK + 3, 2 * BLOCK + 3 + t) if t <= BLOCK - 3
        else torch.arange(t) * 2,
    }


def run_both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, slots: torch.Tensor, cache_dtype: torch.dtype = torch.float32,
             ) -> tuple[Any, ...]:
    """The kernel (into NaN-poisoned q', k' and caches) and the reference (into a NaN-poisoned
    copy of the caches): (y, q', k', q_ref, k_ref, [k_cache, v_cache, ref k_cache, ref v_cache])."""
    kv_heads, d = k.shape[1:]
    caches = [poisoned((SLOTS, kv_heads, d), cache_dtype) for _ in range(4)]
    q_out, k_out = poisoned(q.shape), poisoned(k.shape)
    y = rotary_store.rotary_store(q, k, v, cos, sin, caches[0], caches[1], slots, q_out=q_out,
                                  k_out=k_out)
    q_ref, k_ref = rotary_store.reference(q, k, v, cos, sin, caches[2], caches[3], slots)
    return y, q_out, k_out, q_ref, k_ref, caches


@pytest.mark.parametrize("shape", [(1, 4, 2, 16), (7, 8, 2, 32), (13, 20, 4, 12), (5, 6, 6, 8)])
@pytest.mark.parametrize("pattern", ["contiguous", "scattered", "skipped", "partial_block"])
def test_rotary_store_matches_reference(shape: tuple[int, int, int, int], pattern: str) -> None:
    t, h, kv, d = shape  # GQA (H a multiple of Hkv > 1 heads per group), MHA, > 16 query heads
    q, k, v, cos, sin = step(t, h, kv, d, seed=h)
    slots = slot_patterns(t)[pattern]
    y, q_out, k_out, q_ref, k_ref, (kc, vc, rk, rv) = run_both(q, k, v, cos, sin, slots)
    assert y is q_out
    assert torch.allclose(q_out, q_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(k_out, k_ref, rtol=1e-6, atol=1e-6)
    # the same slots written (NaN elsewhere), with the same rows
    assert torch.equal(kc.isnan(), rk.isnan()) and torch.equal(vc.isnan(), rv.isnan())
    written = slots[slots >= 0]
    assert int(kc.isnan().any(-1).any(-1).sum()) == SLOTS - written.unique().numel()
    assert torch.allclose(kc[written], rk[written], rtol=1e-6, atol=1e-6)
    assert torch.equal(vc[written], rv[written])  # v is copied, not computed


def test_reference_is_the_unfused_references() -> None:
    """Bit for bit what the model's rotary of q and k followed by the KV store give."""
    q, k, v, cos, sin = step(9, 4, 2, 16)
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(3))[:9]
    kc, vc, rk, rv = (torch.zeros(SLOTS, 2, 16) for _ in range(4))
    q_rot, _ = rotary_store.reference(q, k, v, cos, sin, kc, vc, slots)
    as_model = lambda x: x.transpose(0, 1)[None]  # [T, heads, D] -> the model's [1, heads, T, D]
    c, s = cos[None, None], sin[None, None]
    q_want = rotary.reference(as_model(q), c, s)[0].transpose(0, 1)
    k_want = rotary.reference(as_model(k), c, s)[0].transpose(0, 1)
    kv_store.reference(rk, rv, k_want, v, slots)
    assert torch.equal(q_rot, q_want) and torch.equal(kc, rk) and torch.equal(vc, rv)


def test_rotary_store_in_place_and_bf16_cache() -> None:
    q, k, v, cos, sin = step(6, 4, 2, 16, seed=5)
    slots = torch.tensor([40, 3, 17, 18, 63, 0])
    kc, vc = poisoned((SLOTS, 2, 16), torch.bfloat16), poisoned((SLOTS, 2, 16), torch.bfloat16)
    rk, rv = kc.clone(), vc.clone()
    q_ref, _ = rotary_store.reference(q, k, v, cos, sin, rk, rv, slots)
    q_in = q.clone()
    assert rotary_store.rotary_store(q_in, k, v, cos, sin, kc, vc, slots, q_out=q_in) is q_in
    assert torch.allclose(q_in, q_ref, rtol=1e-6, atol=1e-6)
    # to bf16 Triton's interpreter truncates where torch rounds (one ulp apart)
    assert torch.allclose(kc[slots].float(), rk[slots].float(), rtol=1e-2, atol=0)
    assert torch.allclose(vc[slots].float(), rv[slots].float(), rtol=1e-2, atol=0)


def test_dispatch_picks_kernel_reference_or_fallback() -> None:
    q, k, v, cos, sin = step(5, 4, 2, 8, seed=7)
    slots = torch.tensor([9, -1, 30, 2, 31])
    out = {}
    for mode, dtype in (("reference", torch.float32), ("triton", torch.float32),
                        ("triton", torch.float8_e4m3fn), ("reference", torch.float8_e4m3fn)):
        kc, vc = torch.zeros(SLOTS, 2, 8, dtype=dtype), torch.zeros(SLOTS, 2, 8, dtype=dtype)
        with kernel_mode(mode):
            out[mode, dtype] = (rotary_store.apply(q, k, v, cos, sin, kc, vc, slots), kc.float(), vc.float())
    for a, b in ((("reference", torch.float32), ("triton", torch.float32)),
                 (("reference", torch.float8_e4m3fn), ("triton", torch.float8_e4m3fn))):
        assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-6) for x, y in zip(out[a], out[b], strict=True))


def test_rotary_store_rejects_bad_inputs() -> None:
    q, k, v, cos, sin = step(3, 4, 2, 8)
    cache = torch.zeros(16, 2, 8)
    slots = torch.arange(3)
    call = rotary_store.rotary_store
    with pytest.raises(LeanLMError, match="holds \\[4, 8\\] per slot, new K/V are \\[2, 8\\]"):
        call(q, k, v, cos, sin, torch.zeros(16, 4, 8), torch.zeros(16, 4, 8), slots)
    with pytest.raises(LeanLMError, match="slot_mapping has 2 entries for 3 tokens"):
        call(q, k, v, cos, sin, cache, cache.clone(), slots[:2])
    with pytest.raises(LeanLMError, match="cos must be \\[3, 8\\]"):
        call(q, k, v, cos[:2], sin, cache, cache.clone(), slots)
    with pytest.raises(LeanLMError, match="not a multiple of 3 K/V heads"):
        call(q, torch.zeros(3, 3, 8), torch.zeros(3, 3, 8), cos, sin, cache, cache.clone(), slots)
    with pytest.raises(LeanLMError, match="even head dimension"):
        call(q[..., :7], k[..., :7], v[..., :7], cos[:, :7], sin[:, :7], cache, cache, slots)
    with pytest.raises(LeanLMError, match="k_cache must be one of"):
        call(q, k, v, cos, sin, cache.to(torch.float8_e4m3fn), cache, slots)
    with pytest.raises(LeanLMError, match="slot_mapping must be one of"):
        call(q, k, v, cos, sin, cache, cache.clone(), slots.float())
    with pytest.raises(LeanLMError, match="q_out must be"):
        call(q, k, v, cos, sin, cache, cache.clone(), slots, q_out=torch.zeros(3, 4, 8).half())
