"""The OpenAI-compatible server: ``/v1/completions``, ``/v1/chat/completions`` (both with SSE
streaming), ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/health`` and Prometheus
``/metrics``.

One client must not hurt another:

- every failure is an OpenAI-shaped ``{"error": {...}}`` body: 400 for a bad request (the
  OpenAPI schema says 400 where FastAPI would say 422), 401 for a missing or wrong key, 413 for
  a body past the limit, 500 (logged) for a bug;
- with an API key, every endpoint but ``/health`` needs it (``/metrics`` too, unless
  ``metrics_without_key``; the docs and the schema too, or they are off with ``docs=False``);
- a request is checked in full before it reaches the engine (``protocol.py``, then the limits
  of ``limits.py``, then ``LLMEngine.make_request``), and a failure in the engine thread fails
  only the request at fault (``async_engine.py``);
- tokenization and chat templates run in worker threads (``tokenizers`` releases the GIL for a
  long text), so ``/health`` and running streams keep flowing while a long prompt is processed;
- a client that disconnects has its requests aborted, streaming or not;
- fair sharing: the server runs the ``vtc`` policy by default (``leanlm serve --policy``). Its
  unit is the client: the OpenAI ``user`` field, else the request itself, so the ``n`` copies of
  one request share one client's counter and a large ``n`` cannot hold every slot while another
  request waits (see ``scheduler.py`` for why VTC rather than a per-request slot cap).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanlm.errors import LeanLMError
from leanlm.serve.api.limits import BodyTooLarge, Guard, ServerLimits, publish_limits
from leanlm.serve.api.metrics import Metrics
from leanlm.serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    error_body,
)
from leanlm.serve.async_engine import AsyncLLMEngine, RequestOutput
from leanlm.serve.request import SamplingParams

log = logging.getLogger(__name__)
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                   "description": "The completion, or with `stream` its server-sent events"}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Body larger than the server's limit"},
    500: {"model": ErrorResponse, "description": "The server failed"},
    503: {"model": ErrorResponse, "description": "Shutting down, or the engine is down"},
}


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status
        self.kind = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def longest_token_chars(tok: Any) -> int:
    """Characters of the vocabulary's longest token (special tokens included: text can spell them)."""
    return max((len(tok.decode([i], skip_special_tokens=False)) for i in range(tok.vocab_size)), default=1)


def create_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 16, limits: ServerLimits | None = None,
               metrics_without_key: bool = False, docs: bool = True) -> FastAPI:
    tok = engine.tokenizer
    info = engine.info
    context = info.max_model_len
    limits = (limits or ServerLimits()).resolved(context, info.num_blocks * info.block_size,
                                                 longest_token_chars(tok))
    app = FastAPI(title="leanlm", version="0.1.0", docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.engine, app.state.limits = engine, limits
    app.state.draining = False  # set on SIGTERM: in-flight requests finish, new ones get 503
    open_paths = frozenset({"/health"} | ({"/metrics"} if metrics_without_key else set()))
    app.add_middleware(Guard, api_key=api_key, open_paths=open_paths, max_body_bytes=limits.max_body_bytes)
    metrics = Metrics()
    threads = anyio.CapacityLimiter(limits.tokenizer_threads)

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(_BadRequest)
    async def _bad(_: Request, e: _BadRequest) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(LeanLMError)
    async def _lean(_: Request, e: LeanLMError) -> JSONResponse:
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def _large(_: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse(error_body(str(e), code="request_too_large"), status_code=413,
                            headers={"connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # loc holds the character position, not a field
            reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
            return JSONResponse(error_body(f"the body is not valid JSON: {reason}"), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else \
            f"invalid request body: {first.get('msg', 'expected a JSON object')}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:  # 404, 405, body parsing
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=e)
        return JSONResponse(error_body(f"internal server error ({type(e).__name__})", "server_error"),
                            status_code=500)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, saying what the server does: 400 (not 422) for invalid bodies, and
        the bearer key on every operation but /health."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    op["responses"].pop("422", None)
                    if path in open_paths:
                        op["responses"].pop("401", None)
                        op["security"] = []
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}] if api_key else []
            publish_limits(schema, limits, [model_name, *engine.loras], context,
                           info.vocab_size, SamplingParams.SEED_RANGE)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # ---- helpers --------------------------------------------------------------------------------
    async def off_loop(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in a worker thread (at most ``tokenizer_threads`` at once)."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=threads)

    def unavailable() -> str | None:
        """Why the server takes no new requests (None: it does)."""
        if app.state.draining:
            return "the server is shutting down"
        return None if engine.dead is None else f"the engine is down: {engine.dead}"

    def check_model(name: str) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 503 while the
        server takes no new requests."""
        down = unavailable()
        if down is not None:
            raise _BadRequest(down, code="service_unavailable", status=503)
        if name == model_name:
            return None
        if name in engine.loras:
            return name
        served = [model_name, *engine.loras]
        raise _BadRequest(f"model {name!r} does not exist; this server serves {served}",
                          "model", "model_not_found")

    def check_limits(body: CompletionRequest | ChatCompletionRequest) -> None:
        """The limits a body can be checked against before it is tokenized."""
        if body.n > limits.max_n:
            raise _BadRequest(f"n is {body.n}; this server allows at most {limits.max_n} (--max-n)", "n")
        stops = body.stop_strings()
        if len(stops) > limits.max_stop:
            raise _BadRequest(f"{len(stops)} stop strings; at most {limits.max_stop} (--max-stop)", "stop")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise _BadRequest(f"a stop string is longer than {limits.max_stop_chars} characters "
                              f"(--max-stop-chars)", "stop")
        if body.prompt_chars() > limits.max_prompt_chars:
            raise _BadRequest(f"the prompt has {body.prompt_chars()} characters; at most "
                              f"{limits.max_prompt_chars} (--max-prompt-chars)",
                              "messages" if isinstance(body, ChatCompletionRequest) else "prompt")

    def make_requests(prompt_ids: list[int], body: Any, kind: str, lora: str | None) -> tuple[list, str]:
        params = body.sampling_params(default_max_tokens)
        rid = f"{kind}-{uuid.uuid4().hex}"
        client = body.user or f"request:{rid}"  # the fairness unit: n copies count as one client
        requests = []
        for i in range(params.n):  # copy i samples with seed + i (wrapped into torch's range)
            p = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % 2**64)
            requests.append(engine.make_request(prompt_ids, p, f"{rid}-{i}", lora, client))
        reserve = params.n * (len(prompt_ids) + params.max_tokens)
        if reserve > limits.max_request_tokens:
            raise _BadRequest(f"n x (prompt + max_tokens) = {params.n} x ({len(prompt_ids)} + "
                              f"{params.max_tokens}) = {reserve} tokens; a request may reserve at most "
                              f"{limits.max_request_tokens} (--max-request-tokens)", "max_tokens")
        metrics.prompt_tokens.inc(len(prompt_ids) * len(requests))
        return requests, rid

    async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
        """Await ``work``, cancelling it (which aborts its requests) if the client goes away."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            return Response(status_code=499)  # nobody reads it
        return task.result()

    def failed(out: RequestOutput) -> _BadRequest:
        """The error of a request the engine failed (400: its input was at fault)."""
        return _BadRequest(out.error or "the engine failed", status=out.error_status)

    async def collect(requests: list) -> list[dict]:
        start = time.monotonic()

        async def one(req: Any) -> dict:
            text, reason, n_out, ids, lps, scored = "", None, 0, [], [], []
            async for out in metrics.timed(engine.generate(req), start):
                if out.error is not None:
                    raise failed(out)
                text += out.text
                reason, n_out = out.finish_reason, out.num_output_tokens
                ids += out.token_ids
                lps += out.logprobs
                scored = out.prompt_logprobs or scored
            return {"text": text, "finish_reason": reason, "tokens": n_out, "ids": ids, "logprobs": lps,
                    "prompt_logprobs": scored}

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one copy failed, or the client went away: the others are aborted
                t.cancel()

    def usage(prompt: int, outs: list[dict]) -> dict:
        completion = sum(o["tokens"] for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(requests: list, rid: str, chunk: Any, body: Any, obj: str,
                  num_prompt: int) -> AsyncIterator[str]:
        """The chunks of every choice as they come, then (``stream_options.include_usage``) one
        chunk with the usage and no choices, then [DONE]; an engine failure is an error event."""
        start = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: Any) -> None:
            async for out in metrics.timed(engine.generate(req), start):
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
                if out.error is not None:  # the status line is sent: an error event, as OpenAI's
                    yield f"data: {json.dumps(failed(out).body())}\n\n"
                    break
                payload = chunk(rid, i, out, first[i])
                first[i] = False
                tokens[i] = out.num_output_tokens
                yield f"data: {json.dumps(payload)}\n\n"
            else:
                if body.stream_options and body.stream_options.include_usage:
                    last = {"id": rid, "object": obj, "created": created(), "model": body.model,
                            "choices": [], "usage": usage(num_prompt, [{"tokens": n} for n in tokens])}
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

    # ---- endpoints ------------------------------------------------------------------------------
    @app.post("/v1/completions", responses={**STREAMED, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        lora = check_model(body.model)
        check_limits(body)
        if isinstance(body.prompt, str):
            prompt_ids = await off_loop(tok.encode, body.prompt, release_gil=True)
        else:
            prompt_ids = list(body.prompt)
        requests, rid = make_requests(prompt_ids, body, "cmpl", lora)

        def chunk(rid: str, i: int, out: RequestOutput, _: bool) -> dict:
            return {"id": rid, "object": "text_completion", "created": created(), "model": body.model,
                    "choices": [{"index": i, "text": out.text,
                                 "logprobs": completion_logprobs(out.token_ids, out.logprobs),
                                 "finish_reason": out.finish_reason if out.finished else None}]}

        if body.stream:
            events = sse(requests, rid, chunk, body, "text_completion", len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream")
        outs = await cancel_on_disconnect(request, collect(requests))
        if isinstance(outs, Response):
            return outs
        prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        if body.echo and body.logprobs is not None:  # the prompt's tokens lead the logprobs
            for o in outs:
                scored = [entry or (None, []) for entry in o["prompt_logprobs"]]
                o["ids"], o["logprobs"] = prompt_ids + o["ids"], scored + o["logprobs"]
        return {"id": rid, "object": "text_completion", "created": created(), "model": body.model,
                "choices": [{"index": i, "text": prefix + o["text"],
                             "logprobs": completion_logprobs(o["ids"], o["logprobs"]),
                             "finish_reason": o["finish_reason"]} for i, o in enumerate(outs)],
                "usage": usage(len(prompt_ids), outs)}

    def render_chat(messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = tok.apply_chat_template(messages)
        except jinja2.TemplateError as e:  # the template cannot render these messages
            raise LeanLMError(f"chat template: {e}") from None
        return tok.encode(text, add_special_tokens=False, release_gil=True)  # the template wrote them

    @app.post("/v1/chat/completions", responses={**STREAMED, **ERRORS})
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        lora = check_model(body.model)
        check_limits(body)
        prompt_ids = await off_loop(render_chat, [m.model_dump() for m in body.messages])
        requests, rid = make_requests(prompt_ids, body, "chatcmpl", lora)

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
        outs = await cancel_on_disconnect(request, collect(requests))
        if isinstance(outs, Response):
            return outs
        return {"id": rid, "object": "chat.completion", "created": created(), "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                             "logprobs": chat_logprobs(o["ids"], o["logprobs"]),
                             "finish_reason": o["finish_reason"]}
                            for i, o in enumerate(outs)],
                "usage": usage(len(prompt_ids), outs)}

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models() -> dict:
        base = [{"id": model_name, "object": "model", "created": created(), "owned_by": "leanlm"}]
        return {"object": "list", "data": base + [
            {"id": n, "object": "model", "created": created(), "owned_by": "leanlm", "parent": model_name}
            for n in engine.loras]}

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        if len(body.prompt) > limits.max_prompt_chars:
            raise _BadRequest(f"the prompt has {len(body.prompt)} characters; at most "
                              f"{limits.max_prompt_chars} (--max-prompt-chars)", "prompt")
        ids = await off_loop(tok.encode, body.prompt, release_gil=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict:
        vocab = info.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise _BadRequest(f"token ids must lie in [0, {vocab})", "tokens")
        return {"prompt": await off_loop(tok.decode, body.tokens)}

    @app.get("/health", responses={503: ERRORS[503]})
    async def health() -> Any:
        down = unavailable()
        if down is not None:
            return JSONResponse(error_body(down, "server_error", code="service_unavailable"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"},
                                    401: ERRORS[401]})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.scrape(engine.stats()), media_type="text/plain; version=0.0.4")

    return app
