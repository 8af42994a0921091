"""The asyncio front end: ``async for out in engine.generate(...)`` streams one request's text.

The engine core (:class:`~leanlm.serve.core.EngineCore`) runs either in a thread of this process
(``AsyncLLMEngine(engine, tokenizer)``: the loop runs ``LLMEngine.step()`` back to back while
there is work; torch releases the GIL in its kernels) or in processes of their own
(``AsyncLLMEngine(None, tokenizer, client=CoreClient(...))``, :mod:`leanlm.serve.core_client`:
one or several data-parallel engine cores behind ZeroMQ, vLLM v1's split, so the HTTP server,
the detokenizer and the engine loop no longer share one GIL). Either way the engine hands over
each step's :class:`~leanlm.serve.messages.RequestUpdate` s (new token ids), and here, on the
event loop, they are detokenized incrementally and stop strings are matched on the text (the
output is cut before the stop string and the request is aborted in the engine). A consumer that
stops iterating (a client that disconnected) aborts its request, whose blocks are freed by the
next step. Requests are validated here before they reach an engine (bad input raises
``LeanLMError`` before any response starts).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from leanlm.errors import LeanLMError
from leanlm.sampling import SamplingParams
from leanlm.serve.core import EngineCore
from leanlm.serve.core_client import CoreClient
from leanlm.serve.engine import LLMEngine
from leanlm.serve.executor import EngineDeadError
from leanlm.serve.messages import EngineInfo, EngineStats, RequestUpdate
from leanlm.serve.request import Request, check_request
from leanlm.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    text: str  # the new text of this step
    token_ids: list[int]  # the new tokens of this step
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what failed
    error_status: int = 500  # the HTTP status it maps to (400: the request's input was at fault)
    prompt_logprobs: list | None = None  # with the first token, if asked: (logprob, top) per prompt token


@dataclass
class _Stream:
    queue: asyncio.Queue
    decoder: IncrementalDecoder
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    done: bool = False
    arrival: float = field(default_factory=time.monotonic)


class _ThreadCore:
    """An engine core in a thread of this process."""

    def __init__(self, engine: LLMEngine, deliver: Callable[[list[RequestUpdate]], None]) -> None:
        self.engine, self.core = engine, EngineCore(engine)
        self.deliver = deliver  # called in the engine thread with each step's updates
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.new: list[Request] = []
        self.aborts: list[str] = []
        self.thread: threading.Thread | None = None
        self.dead: str | None = None

    def submit(self, request: Request) -> None:
        with self.lock:
            self.new.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
                self.thread.start()
        self.wake.set()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborts.append(request_id)
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            with self.lock:
                new, self.new = self.new, []
                aborts, self.aborts = self.aborts, []
                for request in new:
                    self.core.add(request)
                self.core.abort(aborts)
                if not self.core.has_work():
                    self.wake.clear()  # nothing to do until submit() or abort() sets it
                    continue
            try:
                updates = self.core.step()
            except EngineDeadError as e:
                self.dead = str(e)
                self.deliver(self.core.fail_all(f"the engine died: {e}"))
                return
            if updates:
                self.deliver(updates)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | None, tokenizer: Tokenizer,
                 client: CoreClient | None = None) -> None:
        if (engine is None) == (client is None):
            raise LeanLMError("AsyncLLMEngine takes an in-process engine or a client of engine cores")
        self.engine, self.client, self.tokenizer = engine, client, tokenizer
        self.streams: dict[str, _Stream] = {}
        self.thread = _ThreadCore(engine, self._from_thread) if engine is not None else None
        if client is not None:
            client.deliver = self._deliver

    # ---- what the server asks of the engine(s) -------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self.engine.info() if self.engine is not None else self.client.info

    @property
    def loras(self) -> list[str]:
        return sorted(self.engine.loras) if self.engine is not None else self.client.info.loras

    @property
    def dead(self) -> str | None:
        """Why no engine core can serve any more (None while one can)."""
        return self.thread.dead if self.thread is not None else self.client.dead

    def stats(self) -> dict[int, EngineStats]:
        """Each live engine core's latest figures, by data-parallel index."""
        return {0: self.engine.stats()} if self.engine is not None else dict(self.client.stats)

    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str, lora: str | None = None, client: str = "",
                     priority: int = 0) -> Request:
        """A validated request (bad input raises LeanLMError before any response starts)."""
        if self.engine is not None:
            return self.engine.make_request(prompt_token_ids, params, request_id, priority, lora, client)
        info, prompt = self.client.info, list(prompt_token_ids)
        if lora is not None and lora not in info.loras:
            raise LeanLMError(f"unknown LoRA adapter {lora!r}: registered ones are {info.loras}")
        check_request(prompt, params, vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                      num_blocks=info.num_blocks, block_size=info.block_size, lookahead=info.lookahead)
        return Request(request_id, prompt, params, eos_token_ids=tuple(info.eos_token_ids), lora=lora,
                       priority=priority, client=client)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request made by :meth:`make_request`."""
        request_id = request.request_id
        if request_id in self.streams:  # its outputs and aborts would go to the other stream
            raise LeanLMError(f"request id {request_id!r} is already in use")
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        stream = _Stream(asyncio.Queue(), IncrementalDecoder(self.tokenizer),
                         list(request.sampling_params.stop), asyncio.get_running_loop())
        self.streams[request_id] = stream
        if self.thread is not None:
            self.thread.submit(request)
        else:
            self.client.submit(request)
        try:
            while True:
                out: RequestOutput = await stream.queue.get()
                yield out
                if out.finished:
                    break
        finally:
            self.streams.pop(request_id, None)
            if not stream.done:  # the consumer went away: free the request's blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self.thread is not None:
            self.thread.abort(request_id)
        else:
            self.client.abort(request_id)

    # ---- the event loop ---------------------------------------------------------------------------
    def _deliver(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            self._emit(update)

    def _from_thread(self, updates: list[RequestUpdate]) -> None:
        for update in updates:  # each to the event loop its stream lives on
            stream = self.streams.get(update.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(self._emit, update)

    def _emit(self, update: RequestUpdate) -> None:
        stream = self.streams.get(update.request_id)
        if stream is None or stream.done:
            return
        for token in update.new_token_ids:
            stream.text += stream.decoder.push(token)
        if update.error is not None:
            stream.done = True
            stream.queue.put_nowait(RequestOutput(update.request_id, "", [], True, "error",
                                                  error=update.error, error_status=update.error_status))
            return
        finished, reason = update.finish_reason is not None, update.finish_reason
        hit = _first_stop(stream.text, stream.stop, stream.sent)
        if hit >= 0:  # a stop string: cut the text before it and end the request
            stream.text = stream.text[:hit]
            finished, reason = True, "stop"
            self.abort(update.request_id)
        elif finished:
            stream.text += stream.decoder.flush()
        # hold back a tail that could still grow into a stop string
        hold = 0 if finished else max((len(s) - 1 for s in stream.stop), default=0)
        upto = max(stream.sent, len(stream.text) - hold)
        delta = stream.text[stream.sent:upto]
        stream.sent = upto
        stream.done = finished
        stream.queue.put_nowait(RequestOutput(
            update.request_id, delta, update.new_token_ids, finished, reason, update.num_prompt_tokens,
            update.num_output_tokens, update.logprobs, prompt_logprobs=update.prompt_logprobs))


def _first_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the earliest stop string starts in ``text`` (-1 if none); only text that could
    overlap the unsent part (from ``sent``) is searched."""
    found = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    return min(found, default=-1)
