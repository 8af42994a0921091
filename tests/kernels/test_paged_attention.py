"""Paged attention kernels (split-KV decode, varlen prefill) against the fp64 reference.

Caches are poisoned: every slot no request owns holds NaN, block tables point at blocks in a
random order and their unused entries at a NaN block, so a read through a wrong slot shows up
as NaN in the output.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import paged_attention as pa


def paged_batch(query_lens: list[int], seq_lens: list[int], heads: int, kv_heads: int, d: int,
                block_size: int, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=g)
    hole = int(ids[-1])  # a block no request owns, full of NaN, where padding entries point
    width = max(need) + 2
    tables = torch.full((len(seq_lens), width), hole, dtype=torch.int32)
    k_cache = poisoned((num_blocks * block_size, kv_heads, d), dtype)
    v_cache = poisoned((num_blocks * block_size, kv_heads, d), dtype)
    at = 0
    for r, (n, b) in enumerate(zip(seq_lens, need, strict=True)):
        tables[r, :b] = ids[at:at + b]
        at += b
        slots = (tables[r, :b, None].long() * block_size + torch.arange(block_size)).flatten()[:n]
        k_cache[slots] = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        v_cache[slots] = torch.randn(n, kv_heads, d, generator=g).to(dtype)
    starts = [0]
    for m in query_lens:
        starts.append(starts[-1] + m)
    q = torch.randn(starts[-1], heads, d, generator=g).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start=torch.tensor(starts, dtype=torch.int32), block_size=block_size,
                scale=d**-0.5, max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def reference(b: dict, window: int | None) -> torch.Tensor:
    return pa.reference(b["q"].double(), b["k_cache"].double(), b["v_cache"].double(),
                        b["block_tables"], b["seq_lens"].tolist(), b["query_start"].tolist(),
                        b["block_size"], b["scale"], window)


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads,d,block_size", [(4, 2, 16, 4), (8, 1, 24, 16), (3, 3, 64, 8)])
def test_decode_matches_fp64_reference(splits: int | None, window: int | None, heads: int,
                                       kv_heads: int, d: int, block_size: int) -> None:
    seq_lens = [1, 5, 17, 40, 100]
    b = paged_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, d, block_size, seed=heads + d)
    out = pa.paged_attention(**b, window=window, num_splits=splits, out=poisoned(b["q"].shape))
    assert rel_err(out, reference(b, window)) < 1e-3


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads,d,block_size", [(4, 2, 16, 4), (2, 1, 32, 16)])
def test_prefill_with_cached_prefixes_matches_fp64_reference(window: int | None, heads: int,
                                                             kv_heads: int, d: int,
                                                             block_size: int) -> None:
    # ragged chunks: a fresh prompt, a chunk after a cached prefix, a decode row, a long prompt
    query_lens, seq_lens = [7, 20, 1, 70], [7, 33, 12, 70]
    b = paged_batch(query_lens, seq_lens, heads, kv_heads, d, block_size, seed=d)
    out = pa.paged_attention(**b, window=window, out=poisoned(b["q"].shape))
    assert rel_err(out, reference(b, window)) < 1e-3


def test_bf16_cache_and_queries() -> None:
    b = paged_batch([1, 1], [9, 30], 4, 2, 16, 4, seed=3, dtype=torch.bfloat16)
    out = pa.paged_attention(**b, num_splits=2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), reference(b, None)) < 3e-2  # bf16 inputs; interpreter truncates


def test_launcher_rejects_bad_arguments() -> None:
    b = paged_batch([1, 1], [9, 30], 4, 2, 16, 4, seed=0)
    with pytest.raises(LeanLMError, match="not a multiple of 2 K/V heads"):
        pa.paged_attention(**{**b, "q": torch.randn(2, 3, 16)})
    with pytest.raises(LeanLMError, match="fewer than max_seq_len"):
        pa.paged_attention(**{**b, "max_seq_len": 10_000})
    with pytest.raises(LeanLMError, match="must describe 2 requests"):
        pa.paged_attention(**{**b, "query_start": torch.tensor([0, 1], dtype=torch.int32)})
    with pytest.raises(LeanLMError, match="block_tables must be one of"):
        pa.paged_attention(**{**b, "block_tables": b["block_tables"].float()})
