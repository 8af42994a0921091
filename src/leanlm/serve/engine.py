"""``LLMEngine.step()`` = schedule -> execute -> update (vLLM v1's engine core), and ``LLM``
for offline batches: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.sampling import SamplingParams
from leanlm.serve.executor import Executor, UniProcExecutor
from leanlm.serve.kv_cache import KVCacheManager
from leanlm.serve.messages import EngineInfo, EngineStats
from leanlm.serve.model_runner import ModelRunner
from leanlm.serve.paged import kv_bytes_per_block, kv_cache_dtype
from leanlm.serve.request import Request, check_request
from leanlm.serve.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from leanlm.serve.speculative import AcceptanceTracker, DraftModelProposer, best_length, ngram_drafts
from leanlm.serve.worker import Worker, WorkerSpec

SPECULATIVE = (None, "ngram", "draft")


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: from kv_cache_memory
    kv_cache_memory: int = 256 * 2**20  # bytes of K/V when num_blocks is 0
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig | None = None
    max_loras: int = 8  # adapters resident at once (least recently used ones are unloaded)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 (per-token, per-head scales) | fp8
    speculative: str | None = None  # "ngram": prompt lookup | "draft": a draft model's guesses
    num_spec_tokens: int = 4  # most draft tokens per step and request
    spec_adaptive: bool = True  # per-request draft length from its acceptance rate and the draft's cost
    spec_disable_batch_size: int = 0  # no drafts while more requests than this run (0: never off)
    # decode-shaped steps (decode, verify, draft) as one graph: CUDA graphs on CUDA, else torch.compile
    compile: bool = False


def num_kv_blocks(model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype, tp: int = 1,
                  draft_model: Transformer | None = None) -> int:
    """Blocks of the paged cache: ``num_blocks``, or as many as ``kv_cache_memory`` bytes hold on
    one rank (with the draft model's K/V, whose cache has as many blocks)."""
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype)
    per_block = kv_bytes_per_block(model_config, config.block_size, kv_dtype, tp)
    if draft_model is not None:  # the draft's K/V take a share of the same budget
        per_block += kv_bytes_per_block(draft_model.config, config.block_size,
                                        draft_model.embed_tokens.weight.dtype)
    num_blocks = config.num_blocks or config.kv_cache_memory // per_block
    if num_blocks < 1:
        raise LeanLMError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of "
                          f"{config.block_size} tokens for this model")
    return num_blocks


class LLMEngine:
    """Schedule -> execute -> update over an :class:`~leanlm.serve.executor.Executor`: in process
    (``LLMEngine(model, ...)``, the model in this process) or over workers
    (:meth:`with_executor`: tensor-parallel ranks in processes or Ray actors)."""

    def __init__(self, model: Transformer, config: EngineConfig | None = None,
                 draft_model: Transformer | None = None) -> None:
        config = config or EngineConfig()
        self.model: Transformer | None = model.eval()
        if draft_model is not None:  # the draft proposes where the target runs
            draft_model = draft_model.to(model.embed_tokens.weight.device)
        self._setup(model.config, config, model.embed_tokens.weight.dtype, 1, draft_model,
                    lambda spec: UniProcExecutor(Worker(model, spec)))

    @classmethod
    def with_executor(cls, model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype,
                      tensor_parallel_size: int, make_executor: Callable[[WorkerSpec], Executor],
                      draft_model: Transformer | None = None) -> LLMEngine:
        """An engine whose model lives in workers: ``make_executor(spec)`` starts them, each with
        a paged cache of ``spec.num_blocks`` blocks of its share of the K/V heads."""
        engine = cls.__new__(cls)
        engine.model = None
        engine._setup(model_config, config, dtype, tensor_parallel_size, draft_model, make_executor)
        return engine

    def _setup(self, model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype, tp: int,
               draft_model: Transformer | None, make_executor: Callable[[WorkerSpec], Executor]) -> None:
        self.config, self.model_config = config, model_config
        kv_cache_dtype(config.kv_cache_dtype, torch.float32)  # a bad name fails before any work
        if config.speculative not in SPECULATIVE:
            raise LeanLMError(f"speculative {config.speculative!r}: expected one of {SPECULATIVE}")
        if (config.speculative == "draft") != (draft_model is not None):
            raise LeanLMError("speculative='draft' needs a draft model, and a draft model needs "
                              "speculative='draft'")
        if config.speculative and config.num_spec_tokens < 1:
            raise LeanLMError(f"num_spec_tokens must be >= 1, got {config.num_spec_tokens}")
        num_blocks = num_kv_blocks(model_config, config, dtype, tp, draft_model)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # a draft model writes its k - 1 fed-back guesses past the request's tokens: k slots ahead
        lookahead = config.num_spec_tokens if draft_model is not None else 0
        self.scheduler = Scheduler(config.scheduler or SchedulerConfig(), self.kv, lookahead)
        self.executor = make_executor(WorkerSpec(num_blocks, config.block_size, config.kv_cache_dtype,
                                                 config.compile, config.max_loras))
        self._ids = itertools.count()
        self.proposer = (DraftModelProposer(draft_model, model_config, num_blocks, config.block_size,
                                            config.compile) if draft_model is not None else None)
        self.acceptance = AcceptanceTracker()
        # a draft step's cost in target steps (measured; prompt lookup is free)
        self.draft_cost = 0.0 if draft_model is None else 0.1
        self.spec_proposed = self.spec_accepted = 0  # draft tokens, for the acceptance rate
        self.loras: dict[str, str] = {}  # registered adapters (the workers hold the loaded ones)
        self.scheduled: SchedulerOutput | None = None  # the last step's schedule (None: none yet)

    @property
    def runner(self) -> ModelRunner:
        """The in-process model runner (tests and benchmarks look inside it)."""
        assert isinstance(self.executor, UniProcExecutor), "the model runs in worker processes"
        return self.executor.worker.runner

    @property
    def resident_loras(self) -> list[str]:
        """The adapters loaded into the model, least recently used first."""
        return self.executor.collective_rpc("resident_loras")[0]

    def add_lora(self, name: str, path: str | os.PathLike[str], load: bool = False) -> None:
        """Register a peft adapter that requests can name (``lora=name``). It is loaded when a
        request first uses it (or now, with ``load``); at most ``max_loras`` stay resident, the
        least recently used idle one being unloaded to make room."""
        if name in self.loras:
            raise LeanLMError(f"an adapter named {name!r} is already registered")
        self.executor.collective_rpc("register_lora", name, str(path))
        self.loras[name] = str(path)
        if load:
            self._ensure_loaded(name)

    def _ensure_loaded(self, name: str) -> None:
        if name not in self.loras:
            raise LeanLMError(f"unknown LoRA adapter {name!r}: registered ones are {sorted(self.loras)}")
        busy = sorted({r.lora for r in self.scheduler.requests.values() if r.lora and not r.is_finished})
        try:
            self.executor.collective_rpc("ensure_lora", name, busy)
        except LeanLMError:
            if name not in self.executor.collective_rpc("registered_loras")[0]:
                del self.loras[name]  # refused for good (an adapter on lm_head)
            raise

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, lora: str | None = None,
                    client: str = "") -> Request:
        request = self.make_request(prompt_token_ids, params, request_id, priority, lora, client)
        self.scheduler.add_request(request)
        return request

    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0, lora: str | None = None,
                     client: str = "") -> Request:
        """A validated request (bad input raises LeanLMError), not yet scheduled."""
        c = self.model_config
        if lora is not None:
            self._ensure_loaded(lora)
        prompt = list(prompt_token_ids)
        params = params or SamplingParams()
        check_request(prompt, params, vocab_size=c.vocab_size, max_model_len=c.max_position_embeddings,
                      num_blocks=len(self.kv.pool.blocks), block_size=self.kv.block_size,
                      lookahead=self.scheduler.lookahead)
        return Request(request_id or f"req-{next(self._ids)}", prompt, params,
                       eos_token_ids=tuple(c.eos_token_ids), lora=lora, priority=priority, client=client)

    def abort(self, request_ids: Sequence[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def info(self, engine_index: int = 0) -> EngineInfo:
        """What a front end must know to validate requests for this engine itself."""
        c = self.model_config
        return EngineInfo(engine_index, c.vocab_size, c.max_position_embeddings, list(c.eos_token_ids),
                          len(self.kv.pool.blocks), self.kv.block_size, self.scheduler.lookahead,
                          sorted(self.loras), os.getpid())

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(len(s.running), len(s.waiting), kv.pool.usage, kv.stats.queries, kv.stats.hits,
                           self.spec_proposed, self.spec_accepted)

    def recover(self) -> None:
        """Undo what a step that raised may have left behind: the model runner's per-request
        state is unknown, so every running request goes back to the queue to be recomputed (its
        tokens so far kept; the runner drops its state when the next step lists it as
        preempted), and the prefix cache is dropped (blocks registered during the failed step may
        not hold their K/V)."""
        self.scheduler.preempt_all()
        self.kv.pool.reset_prefix_cache()

    def step(self) -> list[Request]:
        self.scheduled = None
        out = self.scheduler.schedule()
        self.scheduled = out
        for new in out.new_requests:  # (re)admitted requests: their adapter must be resident
            if new.lora is not None:
                self._ensure_loaded(new.lora)
        t0 = time.perf_counter()
        result = self.executor.execute(out)
        step_time = time.perf_counter() - t0
        for rid, entries in result.prompt_logprobs.items():
            request = self.scheduler.requests.get(rid)
            if request is not None:  # position p: set once (a recomputed prefill repeats them)
                if not request.prompt_logprobs:
                    request.prompt_logprobs = [None] * request.num_prompt_tokens
                for p, lp, top in entries:
                    request.prompt_logprobs[p] = (lp, top)
        for rid, drafts in out.spec_token_ids.items():
            accepted = max(0, len(result.sampled_token_ids.get(rid, ())) - 1)
            self.spec_proposed += len(drafts)
            self.spec_accepted += accepted
            self.acceptance.record(rid, len(drafts), accepted)
        updated = self.scheduler.update_from_output(out, result.sampled_token_ids)
        if self.config.speculative:
            gone = (out.preempted_req_ids | out.finished_req_ids
                    | {r.request_id for r in updated if r.is_finished})
            self.acceptance.forget(gone)
            if self.proposer is not None:
                self.proposer.forget(gone)
            self._propose(step_time)
        for request in updated:
            if request.request_id in result.logprobs:
                request.output_logprobs.append(result.logprobs[request.request_id])
        return updated

    def _propose(self, step_time: float) -> None:
        """Drafts for every decoding request that allows them (see ``speculative.py``)."""
        c = self.config
        running = self.scheduler.running
        if c.spec_disable_batch_size and len(running) > c.spec_disable_batch_size:
            return  # a batch this large is compute-bound: verifying guesses costs real work
        context = self.model_config.max_position_embeddings
        requests, ks = [], []
        for r in running:
            p = r.sampling_params
            if (r.num_computed_tokens != r.num_tokens - 1 or p.logprobs is not None or p.logit_bias
                    or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
                continue  # speculation needs sequential penalties and logprobs: not these
            k = (best_length(self.acceptance.alpha(r.request_id), self.draft_cost, c.num_spec_tokens)
                 if c.spec_adaptive else c.num_spec_tokens)
            k = min(k, p.max_tokens - len(r.output_token_ids) - 1, context - r.num_tokens - 1)
            if k > 0:
                requests.append(r)
                ks.append(k)
        if self.proposer is None:
            for r, k in zip(requests, ks, strict=True):
                r.spec_token_ids = ngram_drafts(r.all_token_ids, k)
            return
        t0 = time.perf_counter()
        drafts = self.proposer.propose(requests, ks, self.kv.block_ids)
        if requests and step_time > 0:  # running estimate of one draft step's cost in target steps
            ratio = (time.perf_counter() - t0) / max(ks) / step_time
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * ratio
        for r, d in zip(requests, drafts, strict=True):
            r.spec_token_ids = d

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()


class LLM:
    """Offline batch generation through the engine (continuous batching, paged KV cache)."""

    def __init__(self, model: Transformer, config: EngineConfig | None = None,
                 draft_model: Transformer | None = None) -> None:
        self.engine = LLMEngine(model, config, draft_model)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[list[int]]:
        """Greedy/sampled outputs of ``prompts``; ``lora`` names each one's adapter (or all's)."""
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        requests = [self.engine.add_request(p, params, lora=a) for p, a in zip(prompts, loras, strict=True)]
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return [r.output_token_ids for r in requests]
