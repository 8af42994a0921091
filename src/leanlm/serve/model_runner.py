"""The model runner: owns the paged K/V tensors and turns a ``SchedulerOutput`` into one forward.

Each step's scheduled tokens of all requests are flattened into a single row of T tokens (no
padding); ``PagedMetadata`` carries, per request, its query range, its total length after the
step and its block table, plus the slot each new token's K/V are written to. Logits are computed
only at the last scheduled token of requests that have caught up with their tokens (a prefill
chunk that is not the last samples nothing). The batched sampler (``sampling.py``) then draws
every sampling request's token in one pass.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from leanlm.allocator import keep_freed_memory
from leanlm.attention import DecodeMetadata, PagedKVCache, PagedMetadata
from leanlm.model import Transformer
from leanlm.peft.api import routed
from leanlm.sampling import Row, SamplingParams, sample
from leanlm.serve.sampling import verify_drafts
from leanlm.serve.scheduler import SchedulerOutput


@dataclass
class _State:
    token_ids: list[int]
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # seeded requests only
    num_prompt_tokens: int
    lora: str | None = None


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block over all layers (int8: plus an fp16 scale per token and head)."""
    c = model.config
    per_head = c.head_dim * dtype.itemsize + (2 if dtype == torch.int8 else 0)
    return 2 * c.num_layers * block_size * c.num_kv_heads * per_head


def bucket(n: int) -> int:
    """The padded size of a compiled decode step's dimension: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class CompiledDecode:
    """A model's decode-shaped forward (one query token per row) with static shapes, one graph per
    (rows, length) bucket: rows and block-table width are padded to powers of two, and padding
    rows write to the cache's last block, a scratch block past the engine's blocks (the K/V cache
    is allocated one block larger).

    On CUDA each bucket is a captured CUDA graph of the eager forward — the Triton kernels and
    cuBLAS GEMMs — replayed with the step's inputs copied into its static buffers, as vLLM does:
    a decode step of a small model is otherwise bound by the CPU launching ~15 kernels per layer.
    Elsewhere each bucket is a ``torch.compile`` graph; its fused kernels round bf16/fp16
    intermediates where eager does, so outputs stay the eager ones."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.scratch = cache.k[0].shape[0] // cache.block_size - 1
        self.device = model.embed_tokens.weight.device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        # one graph per bucket, and the target and a draft model share this code object: dynamo's
        # default of 8 graphs per code object would silently send later buckets to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        # the compiled step (not called where CUDA graphs run); None once anything failed: eager serves
        self.fn = torch.compile(self._forward, dynamic=False, options={"emulate_precision_casts": True})

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
        pb, width = bucket(b), bucket(-(-max(seq_lens) // bs))
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
                logits = self.fn(as_long(tokens)[None], as_long(positions)[None], meta)
        except Exception as e:  # no compiler, an unsupported op, a failed capture ...: eager serves
            warnings.warn(f"compiled decode unavailable, running eagerly: {type(e).__name__}: {e}",
                          stacklevel=3)
            self.fn = None
            return None
        return logits[:b]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None = None, compile: bool = False) -> None:
        c = model.config
        self.model = model
        device = model.embed_tokens.weight.device
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()  # else each step may page-fault on its freed temporaries again
        # compiled decode: padding rows write to one scratch block past the engine's blocks
        self.cache = PagedKVCache.allocate(c.num_layers, num_blocks + compile, block_size, c.num_kv_heads,
                                           c.head_dim, kv_dtype or model.embed_tokens.weight.dtype, device)
        # decode-shaped steps (decodes and draft verification): CUDA graphs, or torch.compile
        self.compiled = CompiledDecode(model, self.cache) if compile else None
        self.requests: dict[str, _State] = {}
        # the last step's (logprob of the sampled token, [(token, logprob)] top-k) per request
        self.logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = {}
        # ... and of prompt tokens, for requests that asked: [(position, logprob, top-k)]
        self.prompt_logprobs: dict[str, list[tuple[int, float, list[tuple[int, float]]]]] = {}

    def _add(self, rid: str, token_ids: list[int], block_ids: list[int], params: SamplingParams,
             num_prompt_tokens: int, lora: str | None) -> None:
        generator = None
        if not params.greedy and params.seed is not None:
            generator = torch.Generator(self.device)
            generator.manual_seed(params.seed)
        self.requests[rid] = _State(list(token_ids), list(block_ids), params, generator,
                                    num_prompt_tokens, lora)

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows: list[tuple[str, int, int]]) -> None:
        """Log-probabilities of the prompt tokens (the one at position p + 1 given the first p + 1)."""
        self.prompt_logprobs = {}
        if not prompt_rows:
            return
        lps = logits.log_softmax(-1)
        for i, (rid, p, _) in enumerate(prompt_rows):
            state = self.requests[rid]
            nxt, k = state.token_ids[p + 1], state.params.prompt_logprobs or 0
            best = lps[i].topk(k) if k else None
            top = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            self.prompt_logprobs.setdefault(rid, []).append((p + 1, float(lps[i, nxt]), top))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """Run the scheduled tokens; returns the tokens of each request that samples — one, or
        after draft tokens the accepted ones and one more — and leaves the logprobs of requests
        that asked for them in ``self.logprobs``."""
        self.logprobs = {}
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self._add(new.request_id, new.token_ids, new.block_ids, new.sampling_params,
                      new.num_prompt_tokens, new.lora)
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            known = len(state.token_ids)
            # the last sampled token reaches the runner here, as the first token to compute
            state.token_ids.extend(cached.new_token_ids[known - cached.num_computed_tokens:])
            state.block_ids.extend(cached.new_block_ids)
        if not out.num_scheduled_tokens:
            return {}
        computed = {n.request_id: n.num_computed_tokens for n in out.new_requests}
        computed.update({c.request_id: c.num_computed_tokens for c in out.cached_requests})
        bs = self.cache.block_size
        tokens, positions, slots, starts, seq_lens, tables, rows, samplers = [], [], [], [0], [], [], [], []
        adapters: list[str | None] = []  # per token: the request's LoRA adapter
        prompt_rows: list[tuple[str, int, int]] = []  # (request, prompt position, batch row)
        verify: dict[str, tuple[int, list[int]]] = {}  # request -> (first row, its draft tokens)
        for rid, n in out.num_scheduled_tokens.items():
            state, start = self.requests[rid], computed[rid]
            drafts = out.spec_token_ids.get(rid, [])
            real = n - len(drafts)
            pos = list(range(start, start + n))
            tokens += state.token_ids[start:start + real] + drafts
            adapters += [state.lora] * n
            positions += pos
            slots += [state.block_ids[p // bs] * bs + p % bs for p in pos]
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
            tables.append(state.block_ids)
            if drafts:  # the last real token and every draft: k + 1 rows to verify
                verify[rid] = (len(rows), drafts)
                rows += list(range(starts[-2] + real - 1, starts[-1]))
            elif start + real == len(state.token_ids):
                rows.append(starts[-1] - 1)
                samplers.append(rid)
            if state.params.prompt_logprobs is not None:  # prompt positions that predict a prompt token
                for p in range(start, min(start + n, state.num_prompt_tokens - 1)):
                    prompt_rows.append((rid, p, starts[-2] + p - start))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)[None]
        # logits only where a request samples (none in a step of unfinished prefill chunks)
        # a batch that uses adapters routes each token through its request's (multi-LoRA)
        route = routed(adapters, self.device) if any(adapters) else contextlib.nullcontext()
        logits = None
        if self.compiled is not None and len(rows) == len(tokens) and not prompt_rows and not any(adapters):
            # every token is a row (decodes, and drafts to verify)
            owner = [i for i in range(len(tables)) for _ in range(starts[i + 1] - starts[i])]
            logits = self.compiled(tokens, positions, slots, [tables[i] for i in owner])
        if logits is None:
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            meta = PagedMetadata(self.cache, torch.tensor(slots, device=self.device), starts, seq_lens,
                                 table.to(self.device), self.model.config.sliding_window)
            with route:
                logits = self.model(as_tensor(tokens), positions=as_tensor(positions), attn=meta,
                                    rows=as_tensor(rows + [r for _, _, r in prompt_rows])[0])[0]
        logits = logits.float()
        self._prompt_logprobs(logits[len(rows):], prompt_rows)
        logits = logits[:len(rows)]
        sampled: dict[str, list[int]] = {}
        for rid, (first, drafts) in verify.items():
            st = self.requests[rid]
            got = verify_drafts(logits[first:first + len(drafts) + 1],
                                Row(st.params, st.token_ids, st.num_prompt_tokens, st.generator), drafts)
            st.token_ids.extend(got[:-1])  # accepted drafts: their K/V are already in the cache
            sampled[rid] = got
        verified = {f + j for f, d in verify.values() for j in range(len(d) + 1)}
        if verified:  # (an index list is a host-to-device copy: skipped when nothing was verified)
            logits = logits[[i for i in range(len(rows)) if i not in verified]]
        states = [self.requests[rid] for rid in samplers]
        tokens = sample(logits, [Row(st.params, st.token_ids, st.num_prompt_tokens, st.generator)
                                 for st in states]).tolist() if samplers else []
        sampled.update({rid: [t] for rid, t in zip(samplers, tokens, strict=True)})
        for i, (rid, state) in enumerate(zip(samplers, states, strict=True)):
            k = state.params.logprobs
            if k is not None:  # of the model's own distribution, before any processing
                lp = logits[i].log_softmax(-1)
                top = lp.topk(k) if k else None
                self.logprobs[rid] = (float(lp[sampled[rid][0]]), [] if top is None else
                                      list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        return sampled
