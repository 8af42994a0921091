"""Paged KV cache bookkeeping with prefix caching (Kwon et al., "Efficient Memory Management for
Large Language Model Serving with PagedAttention", SOSP 2023; vLLM v1's ``BlockPool`` and
``KVCacheManager``). Pure Python over block ids: no tensors here.

The KV cache is ``num_blocks`` fixed-size blocks of ``block_size`` token slots. A request owns
an ordered list of blocks (its block table); token ``t`` lives in slot ``t % block_size`` of
block ``t // block_size``. Memory is wasted only in each request's last, partly filled block.

Prefix caching: a *full* block is identified by a hash chained over everything before it,

    h_i = H(h_{i-1}, tokens of block i, extra keys)      (extra keys: e.g. the LoRA adapter),

so equal hashes mean equal KV contents. Blocks are reference-counted; a block whose count drops
to 0 goes to the tail of the free queue but keeps its hash, so a later request with the same
prefix can take it back (a cache hit) as long as it has not been reused. New blocks are taken
from the head of the free queue — the least recently freed — which evicts cached contents in
LRU order. A request's blocks are freed last-block-first, so the tail of a sequence (shared by
fewer requests) is evicted before its prefix. The free queue is a doubly linked list so a hit
can unlink a block from the middle in O(1).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from leanlm.errors import LeanLMError

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int], extra: tuple = ()) -> BlockHash:
    """The chained hash of one full block (SHA-256: stable across processes, no collisions in
    practice, unlike Python's salted ``hash``)."""
    h = hashlib.sha256(parent or b"\0")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if extra:
        h.update(repr(extra).encode())
    return h.digest()


def block_hashes(tokens: Sequence[int], block_size: int, extra: tuple = ()) -> list[BlockHash]:
    """Hashes of every full block of ``tokens``."""
    out: list[BlockHash] = []
    parent = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start:start + block_size], extra)
        out.append(parent)
    return out


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev: KVCacheBlock | None = field(default=None, repr=False)
    next: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, append at the tail, remove anywhere."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self.head: KVCacheBlock | None = None
        self.tail: KVCacheBlock | None = None
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVCacheBlock) -> None:
        block.prev, block.next = self.tail, None
        if self.tail is None:
            self.head = block
        else:
            self.tail.next = block
        self.tail = block
        self.size += 1

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev is None:
            self.head = block.next
        else:
            block.prev.next = block.next
        if block.next is None:
            self.tail = block.prev
        else:
            block.next.prev = block.prev
        block.prev = block.next = None
        self.size -= 1

    def popleft(self) -> KVCacheBlock:
        if self.head is None:
            raise LeanLMError("no free KV-cache blocks")
        block = self.head
        self.remove(block)
        return block

    def ids(self) -> list[int]:
        out, b = [], self.head
        while b is not None:
            out.append(b.block_id)
            b = b.next
        return out


class BlockPool:
    """All blocks, their ref counts, the free queue and the hash -> cached block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise LeanLMError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.size

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / len(self.blocks)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """``n`` blocks from the head of the free queue (evicting their cached contents)."""
        if n > self.num_free_blocks:
            raise LeanLMError(f"asked for {n} KV-cache blocks, {self.num_free_blocks} are free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference to cached blocks (a prefix hit), unlinking free ones from the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue in order."""
        for block in ordered:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget what every block holds (after a failed step; no block may be in use)."""
        if self.num_free_blocks != len(self.blocks):
            raise AssertionError("the prefix cache can only be reset while no block is in use")
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], hashes: Sequence[BlockHash],
                          start: int, end: int) -> None:
        """Record blocks[start:end] (now full) under their hashes."""
        if not self.enable_caching:
            return
        for block, h in zip(blocks[start:end], hashes[start:end], strict=True):
            if block.block_hash is None:
                block.block_hash = h
                self.cached.setdefault(h, block)


class CacheableRequest(Protocol):
    """What the KV-cache manager needs to know about a request."""

    request_id: str
    num_computed_tokens: int

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def cache_key(self) -> tuple: ...  # extra hash keys, e.g. the LoRA adapter's name


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Block tables of the running requests: prefix lookup, slot allocation, freeing."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise LeanLMError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached: dict[str, int] = {}  # leading blocks of the request already in the map
        self.stats = PrefixCacheStats()

    def _hashes(self, request: CacheableRequest) -> list[BlockHash]:
        tokens = request.all_token_ids
        known = self.req_hashes.setdefault(request.request_id, [])
        full = len(tokens) // self.block_size
        if len(known) < full:  # extend the chain with the blocks filled since the last call
            parent = known[-1] if known else None
            for i in range(len(known), full):
                parent = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size],
                                    request.cache_key)
                known.append(parent)
        return known

    def get_computed_blocks(self, request: CacheableRequest) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks that prefixes the request, and the tokens it
        leaves computed.

        At least one token is always left to compute (its logits are needed). A request whose
        tokens are all cached keeps every block and recomputes only its last token, whose K/V the
        last block already holds (the step does not store them again: the block is shared). vLLM
        v1 recomputes the whole last block here, which a burst of repeated prompts pays for in
        time to first token.
        """
        if not self.pool.enable_caching:
            return [], 0
        hashes = self._hashes(request)
        hits: list[KVCacheBlock] = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        n = len(request.all_token_ids)
        self.stats.queries += n
        self.stats.hits += len(hits) * self.block_size
        return hits, min(len(hits) * self.block_size, n - 1)

    def allocate_slots(self, request: CacheableRequest, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       lookahead: int = 0) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens after the request's computed ones
        (and after ``new_computed_blocks``, a prefix hit from :meth:`get_computed_blocks`), plus
        ``lookahead`` slots past them (a draft model's guesses). Returns the newly allocated
        blocks, or None — changing nothing — if too few are free."""
        blocks = self.req_blocks.setdefault(request.request_id, [])
        computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        needed = -(-(computed + num_new_tokens + lookahead) // self.block_size)
        num_new = max(0, needed - len(blocks) - len(new_computed_blocks))
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)  # free but cached
        if num_new > self.pool.num_free_blocks - reclaimed:
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new = self.pool.get_new_blocks(num_new)
        blocks.extend(new)
        if self.pool.enable_caching:
            # blocks that these tokens fill up can be shared from now on (their KV is written in
            # this step, before any other request could be scheduled to read it)
            full = (computed + num_new_tokens) // self.block_size
            hashes = self._hashes(request)[:full]
            done = self.num_cached.get(request.request_id, 0)
            self.pool.cache_full_blocks(blocks, hashes, done, min(full, len(hashes)))
            self.num_cached[request.request_id] = max(done, min(full, len(hashes)))
        return new

    def free(self, request: CacheableRequest) -> None:
        """Release the request's blocks, tail first (so its prefix stays cached longest)."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free_blocks(reversed(blocks))
        self.num_cached.pop(request.request_id, None)
        self.req_hashes.pop(request.request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]
