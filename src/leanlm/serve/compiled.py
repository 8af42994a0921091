"""The serving engine's decode-shaped steps as one graph: CUDA graphs on CUDA, ``torch.compile``
elsewhere (``leanlm serve --compile``).

A decode step of a small model is bound by per-op overhead: on a GPU by the CPU launching ~15
kernels per layer, on a CPU by Python and dispatch. On CUDA, padding every step to a bucket of
fixed shapes lets one captured graph serve it. On the CPU one compiled graph with symbolic shapes
serves every step: leanlm's C++ ops (:mod:`leanlm.kernels.cpu_ops`: attention, RMSNorm, the GEMMs)
inside it, called from a C++ wrapper, with the glue between them fused. See :class:`CompiledDecode`.
"""

from __future__ import annotations

import warnings

import torch

from leanlm.kernels import cpu_linear
from leanlm.model import Transformer
from leanlm.serve.paged import DecodeMetadata, PagedKVCache

# bf16/fp16 rounded where eager rounds; the wrapper that calls the kernels in C++ (~4% of a small
# model's CPU decode step against a Python wrapper)
INDUCTOR_OPTIONS = {"emulate_precision_casts": True, "cpp_wrapper": True}
RECOMPILE_LIMIT = 128  # graphs per code object while a compiled step runs (target and draft share it)


def packs(compile: bool) -> bool:
    """Whether the serving engine loads CPU weights packed: always for eager steps; with
    ``compile`` where they pack into leanlm's 64-row bf16 blocks, which the compiled step traces
    as the C++ GEMM that reads them (oneDNN's layout is opaque to the compiler, which would
    unpack it on first use)."""
    return not compile or cpu_linear.blocked()


def bucket(n: int) -> int:
    """The padded size of a compiled decode step's dimension: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class CompiledDecode:
    """A model's decode-shaped forward (one query token per row) as one graph.

    On CUDA each (rows, length) bucket is a captured CUDA graph of the eager forward — the Triton
    kernels and cuBLAS GEMMs — replayed with the step's inputs copied into its static buffers, as
    vLLM does: a decode step of a small model is otherwise bound by the CPU launching ~15 kernels
    per layer. Rows and block-table width are padded to powers of two, and padding rows write to
    the cache's last block, a scratch block past the engine's blocks (the K/V cache is allocated
    one block larger).

    Elsewhere it is a ``torch.compile`` graph with symbolic shapes (the table's width still
    padded to a power of two); the C++ CPU ops are calls in it, and its fused kernels round
    bf16/fp16 intermediates where eager does, so outputs stay the eager ones."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.scratch = cache.k[0].shape[0] // cache.block_size - 1
        self.device = model.embed_tokens.weight.device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        # the compiled step (not called where CUDA graphs run); None once anything failed: eager
        # serves. Shapes are symbolic, so one graph serves every batch (dynamo specialises a size
        # of 1: a graph for one row, one for a one-block table)
        self.fn = torch.compile(self._forward, dynamic=True, options=INDUCTOR_OPTIONS)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: DecodeMetadata) -> torch.Tensor:
        return self.model(tokens, positions=positions, attn=meta)[0]

    def _replay(self, rows: int, width: int, inputs: list[int]) -> torch.Tensor:
        """The bucket's CUDA graph (captured on first use) run on ``inputs``: tokens, positions,
        slots, key counts and table rows, flat, copied into its static buffer in one transfer."""
        if (rows, width) not in self.graphs:
            self.graphs[rows, width] = self._capture(rows, width)
        graph, flat, logits = self.graphs[rows, width]
        flat.copy_(torch.tensor(inputs, dtype=torch.long))
        graph.replay()
        return logits.clone()

    def _capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        bs = self.cache.block_size
        # static inputs, every row a padding row until the first replay fills them
        flat = torch.cat([torch.zeros(2 * rows, dtype=torch.long), torch.full((rows,), self.scratch * bs),
                          torch.ones(rows, dtype=torch.long), torch.full((rows * width,), self.scratch)]
                         ).to(self.device)
        tokens, positions, slots, lens, table = flat.split([rows, rows, rows, rows, rows * width])
        meta = DecodeMetadata(self.cache, slots, table.view(rows, width), lens, width * bs,
                              self.model.config.sliding_window)
        run = lambda: self._forward(tokens[None], positions[None], meta)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            run(), run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        return graph, flat, logits

    def warm_up(self) -> None:
        """Compile (or capture) now what a server's first steps would: one row and several, each
        with a one-block table and a longer one (the shapes dynamo specialises), run on the
        scratch block. ``leanlm serve --compile`` does this before it takes requests: on 2 CPU
        cores each graph takes ~10–15 s, which would otherwise stall the requests of each shape."""
        bs, s = self.cache.block_size, self.scratch
        with torch.inference_mode():
            if self.pool is None and self.fn is not None:
                # one eager step first, as a server's first prefill would run: the layers prepare
                # their kernels (quantized ones pick the op for a batch of 8 rows), so that the
                # graphs trace straight to those ops, and no later eager step changes what they see
                compiled, self.fn = self.fn, self._forward
                try:
                    self([0] * 8, [bs - 1] * 8, [s * bs + bs - 1] * 8, [[s]] * 8)
                finally:
                    self.fn = compiled
            for rows in (1, 2):
                for blocks in (1, 2):
                    last = blocks * bs - 1  # the row's position: its table spans `blocks` blocks
                    self([0] * rows, [last] * rows, [s * bs + last % bs] * rows, [[s] * blocks] * rows)

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int],
                 tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [B, V] of B rows, row i the token at ``positions[i]`` (its K/V written to
        ``slots[i]`` before attending) seeing the keys up to its own position through
        ``tables[i]``: decodes, and the rows of several tokens of one request (drafts to verify, a
        draft model's catch-up). None, and eager from then on, if compiling fails."""
        if self.fn is None:
            return None
        b, bs = len(tokens), self.cache.block_size
        seq_lens = [p + 1 for p in positions]
        # rows padded for a CUDA graph only (a compiled graph takes any count); the table's width
        # to a power of two, so that the references' masks see few distinct lengths
        pb, width = bucket(b) if self.pool is not None else b, bucket(-(-max(seq_lens) // bs))
        pad = pb - b
        table = [t[:width] + [self.scratch] * (width - len(t)) for t in tables]
        table += [[self.scratch] * width] * pad
        tokens, positions = tokens + [0] * pad, positions + [0] * pad
        slots, seq_lens = slots + [self.scratch * bs] * pad, seq_lens + [1] * pad
        try:
            if self.pool is not None:
                flat = [*tokens, *positions, *slots, *seq_lens, *(i for row in table for i in row)]
                logits = self._replay(pb, width, flat)
            else:
                as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
                meta = DecodeMetadata(self.cache, as_long(slots), torch.tensor(table, dtype=torch.int32,
                                      device=self.device), as_long(seq_lens), width * bs,
                                      self.model.config.sliding_window)
                # one graph per bucket, and the target and a draft model share this code object:
                # dynamo's default of 8 graphs per code object would send later buckets to eager
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    logits = self.fn(as_long(tokens)[None], as_long(positions)[None], meta)
        except Exception as e:  # no compiler, an unsupported op, a failed capture ...: eager serves
            warnings.warn(f"compiled decode unavailable, running eagerly: {type(e).__name__}: {e}",
                          stacklevel=3)
            self.fn = None
            return None
        return logits[:b]
