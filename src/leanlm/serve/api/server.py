"""The OpenAI-compatible server: ``/v1/completions``, ``/v1/chat/completions`` (both with SSE
streaming), ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/health`` and Prometheus
``/metrics``. Bad requests get HTTP 400 with an OpenAI-style ``{"error": {...}}`` body; a wrong
or missing API key (when one is set) gets 401. Streams of clients that disconnect are aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leanlm.errors import LeanLMError
from leanlm.serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from leanlm.serve.async_engine import AsyncLLMEngine, RequestOutput


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("leanlm_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("leanlm_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("leanlm_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.hit_rate = Gauge("leanlm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                              registry=r)
        self.prompt_tokens = Counter("leanlm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("leanlm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("leanlm_requests_finished", "Finished requests", ["reason"], registry=r)
        self.drafts = Counter("leanlm_spec_decode_num_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted = Counter("leanlm_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                registry=r)
        self.spec_seen = (0, 0)  # the engine's (drafts, accepted) totals at the last scrape
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("leanlm_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r)
        self.itl = Histogram("leanlm_inter_token_latency_seconds", "ITL", buckets=buckets, registry=r)
        self.e2e = Histogram("leanlm_e2e_request_latency_seconds", "E2E latency", buckets=buckets,
                             registry=r)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def create_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 16) -> FastAPI:
    app = FastAPI(title="leanlm", version="0.1.0")
    metrics = _Metrics()
    tok = engine.tokenizer

    @app.exception_handler(_BadRequest)
    async def _bad(_: Request, e: _BadRequest) -> JSONResponse:
        return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=400)

    @app.exception_handler(LeanLMError)
    async def _lean(_: Request, e: LeanLMError) -> JSONResponse:
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid JSON body"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if (api_key and request.url.path.startswith("/v1")
                and request.headers.get("authorization") != f"Bearer {api_key}"):
            return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                           code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def check_model(name: str) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model)."""
        if name == model_name:
            return None
        if name in engine.engine.loras:
            return name
        served = [model_name, *sorted(engine.engine.loras)]
        raise _BadRequest(f"model {name!r} does not exist; this server serves {served}",
                          "model", "model_not_found")

    async def run(prompt_ids: list[int], body: Any, kind: str) -> tuple[list, str]:
        lora = check_model(body.model)
        params = body.sampling_params(default_max_tokens)
        rid = f"{kind}-{uuid.uuid4().hex}"
        client = body.user or f"request:{rid}"  # the fairness unit: n copies count as one client
        requests = []
        for i in range(params.n):
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            requests.append(engine.make_request(prompt_ids, p, f"{rid}-{i}", lora, client))
        metrics.prompt_tokens.inc(len(prompt_ids) * len(requests))
        return requests, rid

    async def timed(stream: AsyncIterator[RequestOutput], start: float) -> AsyncIterator[RequestOutput]:
        last = None
        async for out in stream:
            now = time.monotonic()
            if last is None:
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe(now - last)
            last = now
            metrics.generation_tokens.inc(len(out.token_ids))
            if out.finished:
                metrics.e2e.observe(now - start)
                metrics.requests.labels(out.finish_reason or "stop").inc()
            yield out

    async def collect(requests: list) -> list[dict]:
        start = time.monotonic()

        async def one(req: Any) -> dict:
            text, reason, n_out, ids, lps = "", None, 0, [], []
            async for out in timed(engine.generate(req), start):
                text += out.text
                reason, n_out = out.finish_reason, out.num_output_tokens
                ids += out.token_ids
                lps += out.logprobs
            return {"text": text, "finish_reason": reason, "tokens": n_out, "ids": ids, "logprobs": lps}

        return await asyncio.gather(*(one(r) for r in requests))

    def usage(prompt: int, outs: list[dict]) -> dict:
        completion = sum(o["tokens"] for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(requests: list, rid: str, chunk: Any, body: Any, obj: str,
                  num_prompt: int) -> AsyncIterator[str]:
        """The chunks of every choice as they come, then (``stream_options.include_usage``) one
        chunk with the usage and no choices, then [DONE]."""
        start = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: Any) -> None:
            async for out in timed(engine.generate(req), start):
                await queue.put((i, out))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            first = [True] * len(requests)
            tokens = [0] * len(requests)
            remaining = len(requests)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                    continue
                payload = chunk(rid, i, out, first[i])
                first[i] = False
                tokens[i] = out.num_output_tokens
                yield f"data: {json.dumps(payload)}\n\n"
            if body.stream_options and body.stream_options.include_usage:
                last = {"id": rid, "object": obj, "created": created(), "model": body.model, "choices": [],
                        "usage": usage(num_prompt, [{"tokens": n} for n in tokens])}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:  # a client that went away: cancelling the pumps aborts the requests
                t.cancel()

    def created() -> int:
        return int(time.time())

    def piece(token: int) -> str:
        return tok.decode([token], skip_special_tokens=False)

    def completion_logprobs(ids: list[int], lps: list) -> dict | None:
        if not lps:
            return None
        offsets, at = [], 0
        for t in ids:
            offsets.append(at)
            at += len(piece(t))
        return {"tokens": [piece(t) for t in ids], "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{piece(t): v for t, v in top} for _, top in lps], "text_offset": offsets}

    def chat_logprobs(ids: list[int], lps: list) -> dict | None:
        if not lps:
            return None

        def entry(t: int, v: float) -> dict:
            return {"token": piece(t), "logprob": v, "bytes": list(piece(t).encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, w) for u, w in top]}
                            for t, (lp, top) in zip(ids, lps, strict=True)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompt_ids = tok.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        requests, rid = await run(prompt_ids, body, "cmpl")

        def chunk(rid: str, i: int, out: RequestOutput, _: bool) -> dict:
            return {"id": rid, "object": "text_completion", "created": created(), "model": body.model,
                    "choices": [{"index": i, "text": out.text,
                                 "logprobs": completion_logprobs(out.token_ids, out.logprobs),
                                 "finish_reason": out.finish_reason if out.finished else None}]}

        if body.stream:
            events = sse(requests, rid, chunk, body, "text_completion", len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream")
        outs = await collect(requests)
        prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        if body.echo and body.logprobs is not None:  # the prompt's tokens lead the logprobs
            for o, req in zip(outs, requests, strict=True):
                scored = [entry or (None, []) for entry in req.prompt_logprobs]
                o["ids"], o["logprobs"] = prompt_ids + o["ids"], scored + o["logprobs"]
        return {"id": rid, "object": "text_completion", "created": created(), "model": body.model,
                "choices": [{"index": i, "text": prefix + o["text"],
                             "logprobs": completion_logprobs(o["ids"], o["logprobs"]),
                             "finish_reason": o["finish_reason"]} for i, o in enumerate(outs)],
                "usage": usage(len(prompt_ids), outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        prompt_ids = tok.encode_chat([m.model_dump() for m in body.messages])
        requests, rid = await run(prompt_ids, body, "chatcmpl")

        def chunk(rid: str, i: int, out: RequestOutput, first: bool) -> dict:
            delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
            return {"id": rid, "object": "chat.completion.chunk", "created": created(),
                    "model": body.model, "choices": [{
                        "index": i, "delta": delta,
                        "logprobs": chat_logprobs(out.token_ids, out.logprobs),
                        "finish_reason": out.finish_reason if out.finished else None}]}

        if body.stream:
            events = sse(requests, rid, chunk, body, "chat.completion.chunk", len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream")
        outs = await collect(requests)
        return {"id": rid, "object": "chat.completion", "created": created(), "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                             "logprobs": chat_logprobs(o["ids"], o["logprobs"]),
                             "finish_reason": o["finish_reason"]}
                            for i, o in enumerate(outs)],
                "usage": usage(len(prompt_ids), outs)}

    @app.get("/v1/models")
    async def models() -> dict:
        base = [{"id": model_name, "object": "model", "created": created(), "owned_by": "leanlm"}]
        return {"object": "list", "data": base + [
            {"id": n, "object": "model", "created": created(), "owned_by": "leanlm", "parent": model_name}
            for n in sorted(engine.engine.loras)]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        ids = tok.encode(body.prompt)
        context = engine.engine.model.config.max_position_embeddings
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        vocab = engine.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise _BadRequest(f"token ids must lie in [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        s = engine.engine.scheduler
        metrics.running.set(len(s.running))
        metrics.waiting.set(len(s.waiting))
        metrics.kv_usage.set(engine.engine.kv.pool.usage)
        metrics.hit_rate.set(engine.engine.kv.stats.hit_rate)
        # the engine keeps totals: the counters catch up with them at each scrape
        totals = (engine.engine.spec_proposed, engine.engine.spec_accepted)
        metrics.drafts.inc(totals[0] - metrics.spec_seen[0])
        metrics.accepted.inc(totals[1] - metrics.spec_seen[1])
        metrics.spec_seen = totals
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    return app
