"""The model runner: owns the paged K/V tensors and turns a ``SchedulerOutput`` into one forward and
a ``ModelRunnerOutput`` (vLLM v1's worker-side model runner).

``execute`` is four stages:

1. state update: requests the scheduler finished or preempted are dropped, new ones added (with
   a generator when they sample with a seed), continuing ones get their new tokens and blocks;
2. input preparation: each request's scheduled tokens go into one flattened
   :class:`~leanlm.serve.batch.PagedBatch`; a request wants logits at its last token when it has
   caught up with its tokens (a prefill chunk that is not the last samples nothing), at its last
   real token and every draft when drafts are to be verified, and at its prompt positions when it
   asked for prompt logprobs;
3. the forward: compiled (``--compile``) when every token is a decode row and no adapter or prompt
   logprob is involved, else eager on the paged backend, adapters routed per token;
4. sampling: drafts verified (``speculative.verify_drafts``), every other sampling request drawn in
   one batched pass (:func:`leanlm.sampling.sample`), logprobs of the model's own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.model import Transformer
from leanlm.sampling import Row, SamplingParams, sample
from leanlm.serve.batch import PagedBatch
from leanlm.serve.compiled import CompiledDecode
from leanlm.serve.outputs import Logprob, ModelRunnerOutput
from leanlm.serve.paged import PagedKVCache
from leanlm.serve.scheduler import SchedulerOutput
from leanlm.serve.speculative import verify_drafts


@dataclass
class _State:
    token_ids: list[int]
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # seeded requests only
    num_prompt_tokens: int
    lora: str | None = None

    def row(self) -> Row:
        return Row(self.params, self.token_ids, self.num_prompt_tokens, self.generator)


@dataclass
class _Plan:
    """Which logits rows belong to whom (input preparation -> sampling)."""

    samplers: list[str] = field(default_factory=list)  # requests drawing one token, in row order
    verify: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # request -> (first row, drafts)
    prompt_rows: list[tuple[str, int]] = field(default_factory=list)  # (request, prompt position)
    adapters: list[str | None] = field(default_factory=list)  # per token


def _top(logprobs: torch.Tensor, token: int, k: int) -> Logprob:
    best = logprobs.topk(k) if k else None
    top = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return float(logprobs[token]), top


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None = None, compile: bool = False) -> None:
        c = model.config
        self.model = model
        self.device = model.embed_tokens.weight.device
        # compiled decode: padding rows write to one scratch block past the engine's blocks
        dtype = kv_dtype or model.embed_tokens.weight.dtype
        kv_heads = model.layers[0].self_attn.num_kv_heads  # this rank's share under tensor parallelism
        self.cache = PagedKVCache.allocate(c.num_layers, num_blocks + compile, block_size, kv_heads,
                                           c.head_dim, dtype, self.device)
        # decode-shaped steps (decodes and draft verification): CUDA graphs, or torch.compile
        self.compiled = CompiledDecode(model, self.cache) if compile else None
        self.requests: dict[str, _State] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run the scheduled tokens of one step; returns what each request sampled (and logprobs)."""
        self._update_states(out)
        if not out.num_scheduled_tokens:
            return ModelRunnerOutput()
        batch, plan = self._prepare_inputs(out)
        compiled = self.compiled
        if len(batch.rows) != len(batch.tokens) or plan.prompt_rows or any(plan.adapters) or \
                min(batch.slots, default=0) < 0:
            compiled = None  # not every token a decode row storing its K/V: the eager paged forward
        logits = batch.logits(self.model, self.cache, compiled, plan.adapters).float()
        return self._sample(logits, plan)

    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self.requests[new.request_id] = _State(
                list(new.token_ids), list(new.block_ids), new.sampling_params,
                new.sampling_params.generator(self.device), new.num_prompt_tokens, new.lora)
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            known = len(state.token_ids)
            # the last sampled token reaches the runner here, as the first token to compute
            state.token_ids.extend(cached.new_token_ids[known - cached.num_computed_tokens:])
            state.block_ids.extend(cached.new_block_ids)

    def _prepare_inputs(self, out: SchedulerOutput) -> tuple[PagedBatch, _Plan]:
        computed = {n.request_id: n.num_computed_tokens for n in out.new_requests}
        computed.update({c.request_id: c.num_computed_tokens for c in out.cached_requests})
        stored = {n.request_id: n.num_computed_tokens + 1 for n in out.new_requests if n.last_token_cached}
        batch, plan = PagedBatch(self.cache.block_size), _Plan()
        prompt_rows: list[int] = []
        for rid, n in out.num_scheduled_tokens.items():
            state, start = self.requests[rid], computed[rid]
            drafts = out.spec_token_ids.get(rid, [])
            real = n - len(drafts)
            first = batch.add(state.token_ids[start:start + real] + drafts, start, state.block_ids,
                              stored.get(rid, 0))
            plan.adapters += [state.lora] * n
            if drafts:  # the last real token and every draft: k + 1 rows to verify
                plan.verify[rid] = (len(batch.rows), drafts)
                batch.rows += range(first + real - 1, first + n)
            elif start + real == len(state.token_ids):
                batch.rows.append(first + n - 1)
                plan.samplers.append(rid)
            if state.params.prompt_logprobs is not None:  # prompt positions that predict a prompt token
                for p in range(start, min(start + n, state.num_prompt_tokens - 1)):
                    plan.prompt_rows.append((rid, p))
                    prompt_rows.append(first + p - start)
        batch.rows += prompt_rows  # after the sampling rows
        return batch, plan

    def _sample(self, logits: torch.Tensor, plan: _Plan) -> ModelRunnerOutput:
        result = ModelRunnerOutput()
        num_rows = len(logits) - len(plan.prompt_rows)
        if plan.prompt_rows:
            lps = logits[num_rows:].log_softmax(-1)
            for i, (rid, p) in enumerate(plan.prompt_rows):
                state = self.requests[rid]
                lp, top = _top(lps[i], state.token_ids[p + 1], state.params.prompt_logprobs or 0)
                result.prompt_logprobs.setdefault(rid, []).append((p + 1, lp, top))
        logits = logits[:num_rows]
        for rid, (first, drafts) in plan.verify.items():
            state = self.requests[rid]
            got = verify_drafts(logits[first:first + len(drafts) + 1], state.row(), drafts)
            state.token_ids.extend(got[:-1])  # accepted drafts: their K/V are already in the cache
            result.sampled_token_ids[rid] = got
        verified = {f + j for f, d in plan.verify.values() for j in range(len(d) + 1)}
        if verified:  # (an index list is a host-to-device copy: skipped when nothing was verified)
            logits = logits[[i for i in range(num_rows) if i not in verified]]
        states = [self.requests[rid] for rid in plan.samplers]
        tokens = sample(logits, [st.row() for st in states]).tolist() if states else []
        for i, (rid, state, token) in enumerate(zip(plan.samplers, states, tokens, strict=True)):
            result.sampled_token_ids[rid] = [token]
            if state.params.logprobs is not None:  # of the model's own distribution, before any processing
                result.logprobs[rid] = _top(logits[i].log_softmax(-1), token, state.params.logprobs)
        return result
