"""The block pool and KV-cache manager: exact block ids, ref counts, prefix hits, eviction order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from leanlm.errors import LeanLMError
from leanlm.serve.kv_cache import BlockPool, KVCacheManager, block_hashes, hash_block


@dataclass
class Req:
    request_id: str
    tokens: list[int]
    num_computed_tokens: int = 0
    lora: str | None = None
    extra: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens

    @property
    def cache_key(self) -> tuple:
        return (self.lora,) if self.lora else ()


def schedule(m: KVCacheManager, req: Req) -> list[int] | None:
    """Admit a waiting request the way the scheduler will: prefix lookup, then allocation."""
    hits, n = m.get_computed_blocks(req)
    new = m.allocate_slots(req, len(req.tokens) - n, hits)
    if new is None:
        return None
    req.num_computed_tokens = len(req.tokens)
    return [b.block_id for b in hits + new]


def refs(m: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in m.pool.blocks]


def test_hashes_chain_over_the_prefix_and_extra_keys() -> None:
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2 and a[1] == hash_block(a[0], [4, 5, 6, 7])
    assert block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != a[1]  # same block, other prefix
    assert block_hashes(list(range(8)), 4, ("lora-a",))[0] != a[0]


def test_prefix_sharing_ref_counts_and_free_order() -> None:
    m = KVCacheManager(num_blocks=10, block_size=4)
    a = Req("a", list(range(10)))  # blocks: [0..3] [4..7] [8 9 _ _]
    assert schedule(m, a) == [0, 1, 2]
    assert refs(m)[:4] == [1, 1, 1, 0] and m.pool.free_queue.ids() == [3, 4, 5, 6, 7, 8, 9]
    b = Req("b", [*list(range(8)), 100, 101, 102])  # shares a's two full blocks
    assert schedule(m, b) == [0, 1, 3]
    assert refs(m)[:4] == [2, 2, 1, 1]
    assert m.stats.hits == 8 and m.stats.queries == 21
    m.free(a)  # tail first: 2 -> free; 1 and 0 still held by b
    assert refs(m)[:4] == [1, 1, 0, 1] and m.pool.free_queue.ids() == [4, 5, 6, 7, 8, 9, 2]
    m.free(b)
    assert m.pool.free_queue.ids() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    # a new request with the prefix takes the cached (free) blocks back out of the queue
    c = Req("c", [*list(range(8)), 7])
    assert schedule(m, c) == [0, 1, 4]
    assert m.pool.free_queue.ids() == [5, 6, 7, 8, 9, 2, 3]
    assert m.pool.usage == pytest.approx(0.3)


def test_eviction_is_lru_and_forgets_the_hash() -> None:
    m = KVCacheManager(num_blocks=4, block_size=2)
    a = Req("a", [1, 2, 3, 4, 5])  # 2 full blocks + 1
    assert schedule(m, a) == [0, 1, 2]
    m.free(a)
    assert m.pool.free_queue.ids() == [3, 2, 1, 0]
    b = Req("b", [9, 9, 9, 9, 9, 9, 9])  # needs 4 blocks: evicts 2 (no hash), 1 and 0 (cached)
    assert schedule(m, b) == [3, 2, 1, 0]
    assert m.pool.num_free_blocks == 0
    m.free(b)
    again = Req("again", [1, 2, 3, 4, 5])
    hits, n = m.get_computed_blocks(again)
    assert hits == [] and n == 0  # a's blocks were reused: their hashes are gone


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    """Every block is shared; only the last token is computed again (for its logits), not the
    whole last block as in vLLM v1; the next position gets a block of its own."""
    m = KVCacheManager(num_blocks=8, block_size=4)
    schedule(m, Req("a", list(range(8))))
    b = Req("b", list(range(8)))
    hits, n = m.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 7
    new = m.allocate_slots(b, 1, hits)
    assert new is not None and len(new) == 1 and new[0].block_id not in (0, 1)
    assert refs(m)[:2] == [2, 2]


def test_allocation_failure_changes_nothing() -> None:
    m = KVCacheManager(num_blocks=3, block_size=4)
    schedule(m, Req("a", list(range(8))))  # blocks 0, 1
    before = (refs(m), m.pool.free_queue.ids(), dict(m.pool.cached))
    big = Req("big", list(range(8)) + list(range(100, 108)))  # hits 0, 1; needs 2 more, 1 free
    hits, n = m.get_computed_blocks(big)
    assert n == 8
    assert m.allocate_slots(big, 8, hits) is None
    assert (refs(m), m.pool.free_queue.ids(), dict(m.pool.cached)) == before
    # a free cached block being reclaimed does not count as free room for the same request
    m.free(Req("a", []))
    c = Req("c", [*list(range(8)), 1, 2, 3, 4, 5])  # hits 0 and 1 (both free now), needs 2 more
    hits, n = m.get_computed_blocks(c)
    assert len(hits) == 2 and m.allocate_slots(c, 5, hits) is None


def test_decode_grows_the_table_and_caches_blocks_as_they_fill() -> None:
    m = KVCacheManager(num_blocks=6, block_size=4)
    r = Req("r", [1, 2, 3])
    assert schedule(m, r) == [0]
    for t in range(4, 10):  # one generated token per step
        r.tokens.append(t)
        new = m.allocate_slots(r, 1)
        r.num_computed_tokens += 1
        assert [b.block_id for b in new] == ([1] if t == 5 else [2] if t == 9 else [])
    assert m.block_ids("r") == [0, 1, 2]
    full = block_hashes(r.tokens, 4)
    assert [m.pool.cached[h].block_id for h in full] == [0, 1]
    other = Req("o", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert m.get_computed_blocks(other)[1] == 8  # generated tokens are shareable too


def test_adapters_and_disabled_caching_do_not_share() -> None:
    m = KVCacheManager(num_blocks=8, block_size=2)
    schedule(m, Req("a", [1, 2, 3, 4, 5], lora="x"))
    assert m.get_computed_blocks(Req("b", [1, 2, 3, 4, 5], lora="y"))[1] == 0
    assert m.get_computed_blocks(Req("c", [1, 2, 3, 4, 5], lora="x"))[1] == 4
    off = KVCacheManager(num_blocks=8, block_size=2, enable_caching=False)
    schedule(off, Req("a", [1, 2, 3, 4, 5]))
    assert off.get_computed_blocks(Req("b", [1, 2, 3, 4, 5])) == ([], 0) and not off.pool.cached


def test_bad_sizes() -> None:
    with pytest.raises(LeanLMError, match="at least one block"):
        BlockPool(0)
    with pytest.raises(LeanLMError, match="block_size"):
        KVCacheManager(4, 0)
    with pytest.raises(LeanLMError, match="asked for 5"):
        BlockPool(4).get_new_blocks(5)
