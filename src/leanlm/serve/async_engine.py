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

A failure in the engine thread fails the requests at fault, not everything in flight. A request
the scheduler refuses fails alone. When a step raises, nothing the step did can be trusted (the
model runner may hold half-updated state, blocks filled in the step may not hold their K/V), so
the engine rolls back (``LLMEngine.recover``: every running request goes back to the queue, to be
recomputed, and the prefix cache is dropped), and the requests that had not produced a token yet
are the suspects: one suspect fails alone (HTTP 400 where its input was at fault, a
``LeanLMError``; else 500); several are put on probation, re-added one per step (other new
requests wait meanwhile) until the one that fails again is found; with no suspect (requests that
already produced tokens), the requests of that step fail.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from leanlm.errors import LeanLMError
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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what failed
    error_status: int = 500  # the HTTP status it maps to (400: the request's input was at fault)


@dataclass
class _Update:
    """What one step did to a request, copied by the engine thread for the event loop."""

    request_id: str
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    error_status: int = 500


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
        # engine thread: suspects of a failed step, re-added one at a time (see the module docstring)
        self._probation: deque[Request] = deque()
        self._probe: str | None = None  # the suspect being tried

    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str, lora: str | None = None, client: str = "") -> Request:
        """A validated request (bad input raises LeanLMError before any response starts)."""
        return self.engine.make_request(prompt_token_ids, params, request_id, lora=lora, client=client)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request made by :meth:`make_request`."""
        request_id = request.request_id
        if request_id in self.streams:  # its outputs and aborts would go to the other stream
            raise LeanLMError(f"request id {request_id!r} is already in use")
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
                aborts, self._aborts = self._aborts, []
                pending: list[Request] = []
                if not (self._probation or self._probe):  # new requests wait while suspects are tried
                    pending, self._pending = self._pending, []
                if not (pending or aborts or self._probation or self.engine.has_unfinished_requests()):
                    self._wake.clear()  # nothing to do until generate() or abort() sets it
                    continue
            for request in pending:
                self._add(request)
            if self._probe is None and self._probation:
                probe = self._probation.popleft()
                self._probe = probe.request_id
                self._add(probe)
            self.engine.abort(aborts)
            for rid in aborts:
                self._forget(rid)
            try:
                updated = self.engine.step() if self.engine.has_unfinished_requests() else []
                updates = [self._copy(r) for r in updated]
            except Exception as e:  # never let one bad request stop the server (see the docstring)
                self._recover(e)
                continue
            if self._probe is not None and self._probe in self.engine.scheduled.num_scheduled_tokens:
                self._probe = None  # it ran a step: not the culprit
            for update in updates:
                self._send(update)

    def _add(self, request: Request) -> None:
        try:
            self.engine.scheduler.add_request(request)
        except Exception as e:
            log.warning("request %s refused by the scheduler: %s", request.request_id, e)
            self._fail(request.request_id, e)

    def _forget(self, rid: str) -> None:
        self._copied.pop(rid, None)
        if self._probe == rid:
            self._probe = None
        if self._probation:  # a suspect whose client went away is not tried
            self._probation = deque(r for r in self._probation if r.request_id != rid)

    def _send(self, update: _Update) -> None:
        stream = self.streams.get(update.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(self._emit, update)

    def _fail(self, rid: str, error: Exception) -> None:
        """End one request with an error: 400 if its input was at fault, else 500."""
        self.engine.abort([rid])
        self._forget(rid)
        status = 400 if isinstance(error, LeanLMError) else 500
        message = (str(error) if status == 400
                   else f"the engine failed on this request ({type(error).__name__})")
        self._send(_Update(rid, [], [], "error", 0, 0, message, status))

    def _recover(self, error: Exception) -> None:
        out = self.engine.scheduled
        s = self.engine.scheduler
        ids = list(out.num_scheduled_tokens) if out is not None else [r.request_id for r in s.running]
        scheduled = [s.requests[rid] for rid in ids if rid in s.requests]
        suspects = [r for r in scheduled if not r.output_token_ids]
        log.log(logging.WARNING if isinstance(error, LeanLMError) else logging.ERROR,
                "engine step failed (%d requests in it, %d of them new): %s: %s", len(scheduled),
                len(suspects), type(error).__name__, error,
                exc_info=None if isinstance(error, LeanLMError) else error)  # a bug: its traceback
        self.engine.recover()
        if len(suspects) == 1:
            self._fail(suspects[0].request_id, error)
        elif suspects:
            for r in suspects:  # out of the engine, then back one at a time
                self.engine.abort([r.request_id])
                self._forget(r.request_id)
                r.prompt_logprobs, r.spec_token_ids = [], []
                self._probation.append(r)
        else:  # requests that had produced tokens before: which one failed cannot be told
            for r in scheduled:
                self._fail(r.request_id, error)
            if out is None:
                for r in list(s.waiting):
                    self._fail(r.request_id, error)

    def _copy(self, request: Request) -> _Update:
        rid = request.request_id
        start = self._copied.get(rid, 0)
        self._copied[rid] = len(request.output_token_ids)
        if request.is_finished:
            del self._copied[rid]
        return _Update(rid, request.output_token_ids[start:], request.output_logprobs[start:],
                       _REASONS.get(request.status), request.num_prompt_tokens,
                       len(request.output_token_ids))

    # ---- the event loop -------------------------------------------------------------------------
    def _emit(self, update: _Update) -> None:
        stream = self.streams.get(update.request_id)
        if stream is None or stream.done:
            return
        for token in update.tokens:
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
            update.request_id, delta, update.tokens, finished, reason, update.num_prompt_tokens,
            update.num_output_tokens, update.logprobs))


def _first_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the earliest stop string starts in ``text`` (-1 if none); only text that could
    overlap the unsent part (from ``sent``) is searched."""
    found = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    return min(found, default=-1)
