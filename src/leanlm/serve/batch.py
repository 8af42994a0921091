"""One step's batch for the paged backend, built the same way by the model runner and the draft
model's proposer.

Every scheduled token of every request is laid end to end in one row of T tokens (no padding):
request r owns tokens ``starts[r]:starts[r+1]`` at positions ``start_r, start_r + 1, ...`` and,
after the step, has ``seq_lens[r]`` keys; token t's K/V go to slot
``table[p // block_size] * block_size + p % block_size`` of its request's block table. ``rows``
are the tokens whose logits are wanted (the last token of a request that samples, a draft to
verify, a prompt token whose logprob was asked for), in the order the caller reads them.

:meth:`PagedBatch.logits` runs the model once over the batch: through the compiled decode step
(:class:`~leanlm.serve.compiled.CompiledDecode`) when the caller passes one — every token is then
a decode-shaped row — or eagerly on a :class:`~leanlm.serve.paged.PagedMetadata`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from leanlm.model import Transformer
from leanlm.peft.api import routed
from leanlm.serve.paged import PagedKVCache, PagedMetadata

if TYPE_CHECKING:
    from leanlm.serve.compiled import CompiledDecode


@dataclass
class PagedBatch:
    block_size: int
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # per token: the index of its request
    starts: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def add(self, token_ids: Sequence[int], start: int, table: list[int], stored: int = 0) -> int:
        """Append a request's ``token_ids`` at positions ``start, start + 1, ...``; returns the
        index of its first token in the batch. Positions below ``stored`` already have their K/V
        in the cache: they are computed but not stored (slot -1)."""
        first, bs, owner = len(self.tokens), self.block_size, len(self.tables)
        positions = range(start, start + len(token_ids))
        self.tokens += token_ids
        self.positions += positions
        self.slots += [table[p // bs] * bs + p % bs if p >= stored else -1 for p in positions]
        self.owners += [owner] * len(token_ids)
        self.starts.append(len(self.tokens))
        self.seq_lens.append(start + len(token_ids))
        self.tables.append(table)
        return first

    @property
    def max_tokens_per_request(self) -> int:
        return max(b - a for a, b in zip(self.starts, self.starts[1:], strict=False))

    def logits(self, model: Transformer, cache: PagedKVCache, compiled: CompiledDecode | None = None,
               adapters: Sequence[str | None] | None = None) -> torch.Tensor:
        """Logits [len(rows), V] of one forward over the batch (``adapters``: the multi-LoRA
        adapter of each token, routed through :func:`leanlm.peft.api.routed`)."""
        device = cache.k[0].device
        if compiled is not None:
            every = compiled(self.tokens, self.positions, self.slots, [self.tables[i] for i in self.owners])
            if every is not None:  # (None: compiling failed, eager serves from now on)
                return every if self.rows == list(range(len(self.tokens))) else every[self.rows]
        width = max(len(t) for t in self.tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        meta = PagedMetadata(cache, torch.tensor(self.slots, device=device), self.starts, self.seq_lens,
                             table.to(device), model.config.sliding_window)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
        route = contextlib.nullcontext()
        if adapters is not None and any(adapters):
            route = routed(adapters, device)
        with route:
            return model(as_tensor(self.tokens)[None], positions=as_tensor(self.positions)[None],
                         attn=meta, rows=as_tensor(self.rows))[0]
