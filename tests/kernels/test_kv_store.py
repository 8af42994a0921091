"""KV-cache store kernel against its reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned

from leanlm.errors import LeanLMError
from leanlm.kernels import kv_store


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_kv_store_writes_given_slots_only(cache_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    slots, heads, d, t = 64, 3, 24, 9
    k = torch.randn(t, heads, 2 * d, generator=g)[..., :d]  # strided rows
    v = torch.randn(t, heads, d, generator=g)
    mapping = torch.randperm(slots, generator=g)[:t]
    mapping[4] = -1  # not cached
    kc, vc = poisoned((slots, heads, d), cache_dtype), poisoned((slots, heads, d), cache_dtype)
    rk, rv = kc.clone(), vc.clone()
    kv_store.kv_store(kc, vc, k, v, mapping)
    kv_store.reference(rk, rv, k, v, mapping)
    assert torch.equal(kc.isnan(), rk.isnan()) and torch.equal(vc.isnan(), rv.isnan())
    written = mapping[mapping >= 0]
    # exact in fp32; to bf16 Triton's interpreter truncates where torch rounds (one ulp apart)
    tol = 0 if cache_dtype == torch.float32 else 1e-2
    assert torch.allclose(kc[written].float(), rk[written].float(), rtol=tol, atol=0)
    assert torch.allclose(vc[written].float(), rv[written].float(), rtol=tol, atol=0)
    assert int(kc.isnan().any(-1).any(-1).sum()) == slots - (t - 1)


def test_kv_store_rejects_mismatched_heads() -> None:
    cache = torch.zeros(16, 2, 8)
    with pytest.raises(LeanLMError, match="holds \\[2, 8\\] per slot"):
        kv_store.kv_store(cache, cache.clone(), torch.randn(3, 4, 8), torch.randn(3, 4, 8),
                          torch.arange(3))
    with pytest.raises(LeanLMError, match="slot_mapping has 2 entries for 3 tokens"):
        kv_store.kv_store(cache, cache.clone(), torch.randn(3, 2, 8), torch.randn(3, 2, 8),
                          torch.arange(2))
