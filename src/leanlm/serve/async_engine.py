"""The asyncio front end: ``async for out in engine.generate(...)`` streams one request's text.

A dedicated engine thread runs ``LLMEngine.step()`` back to back while there is work, so the
event loop keeps serving HTTP — and turning the last step's tokens into SSE chunks — while the
next step computes (torch releases the GIL inside its kernels). Requests added or aborted from
the event loop are queued and applied by the engine thread between steps (the engine itself is
single-threaded). After each step the engine thread snapshots every updated request's new tokens
and hands them to the event loop the request came from; there they are detokenized
incrementally and stop strings are matched on the text (the output is cut before the stop string
and the request is aborted in the engine). A consumer that stops iterating (a client that
disconnected) aborts its request, whose blocks are freed by the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from leanlm.serve.engine import LLMEngine
from leanlm.serve.request import Request, RequestStatus, SamplingParams
from leanlm.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass
class RequestOutput:
    request_id: str
    text: str  # the new text of this step
    token_ids: list[int]  # the new tokens of this step
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class _Update:
    """What one step did to a request, copied by the engine thread for the event loop."""

    request_id: str
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


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


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.streams: dict[str, _Stream] = {}
        self._pending: list[Request] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._copied: dict[str, int] = {}  # engine thread: output tokens already handed over

    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str, lora: str | None = None, client: str = "") -> Request:
        """A validated request (bad input raises LeanLMError before any response starts)."""
        return self.engine.make_request(prompt_token_ids, params, request_id, lora=lora, client=client)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request made by :meth:`make_request`."""
        request_id = request.request_id
        stream = _Stream(asyncio.Queue(), IncrementalDecoder(self.tokenizer),
                         list(request.sampling_params.stop), asyncio.get_running_loop())
        self.streams[request_id] = stream
        with self._lock:
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
                self._thread.start()
        self._wake.set()
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
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
                if not (pending or aborts or self.engine.has_unfinished_requests()):
                    self._wake.clear()  # nothing to do until generate() or abort() sets it
                    continue
            try:
                for request in pending:
                    self.engine.scheduler.add_request(request)
                self.engine.abort(aborts)
                for rid in aborts:
                    self._copied.pop(rid, None)
                updated = self.engine.step() if self.engine.has_unfinished_requests() else []
                updates = [self._copy(r) for r in updated]
            except Exception:  # never let one bad step stop the server: fail what was in flight
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all()
                continue
            for update in updates:
                stream = self.streams.get(update.request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(self._emit, update)

    def _copy(self, request: Request) -> _Update:
        rid = request.request_id
        start = self._copied.get(rid, 0)
        self._copied[rid] = len(request.output_token_ids)
        if request.is_finished:
            del self._copied[rid]
        return _Update(rid, request.output_token_ids[start:], request.output_logprobs[start:],
                       _REASONS.get(request.status), request.num_prompt_tokens,
                       len(request.output_token_ids))

    def _fail_all(self) -> None:
        s = self.engine.scheduler
        self.engine.abort([r.request_id for r in s.running + s.waiting])
        self._copied.clear()
        for rid, stream in list(self.streams.items()):
            stream.loop.call_soon_threadsafe(self._emit, _Update(rid, [], [], "error", 0, 0))

    # ---- the event loop -------------------------------------------------------------------------
    def _emit(self, update: _Update) -> None:
        stream = self.streams.get(update.request_id)
        if stream is None or stream.done:
            return
        for token in update.tokens:
            stream.text += stream.decoder.push(token)
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
            update.request_id, delta, update.tokens, finished, reason, update.num_prompt_tokens,
            update.num_output_tokens, update.logprobs))


def _first_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the earliest stop string starts in ``text`` (-1 if none); only text that could
    overlap the unsent part (from ``sent``) is searched."""
    found = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    return min(found, default=-1)
