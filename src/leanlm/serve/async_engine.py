"""The asyncio front end: ``async for out in engine.generate(...)`` streams one request's text.

One background task drives ``LLMEngine.step()`` in a worker thread, so the event loop keeps
serving HTTP while the model runs. Requests added or aborted from the event loop are queued and
applied by the stepping thread between steps (the engine itself is single-threaded). Each step's
new tokens are detokenized incrementally; stop strings are matched on the text (the output is cut
before the stop string and the request is aborted in the engine). A consumer that stops iterating
(a client that disconnected) aborts its request, whose blocks are freed by the next step.
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
class _Stream:
    queue: asyncio.Queue
    decoder: IncrementalDecoder
    stop: list[str]
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    tokens: int = 0  # output tokens already decoded (a speculative step may add several)
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
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run())

    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str, lora: str | None = None, client: str = "") -> Request:
        """A validated request (bad input raises LeanLMError before any response starts)."""
        return self.engine.make_request(prompt_token_ids, params, request_id, lora=lora, client=client)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request made by :meth:`make_request`."""
        self._ensure_running()
        request_id = request.request_id
        stream = _Stream(asyncio.Queue(), IncrementalDecoder(self.tokenizer),
                         list(request.sampling_params.stop))
        self.streams[request_id] = stream
        with self._lock:
            self._pending.append(request)
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

    def _step(self) -> list[Request]:
        with self._lock:
            pending, self._pending = self._pending, []
            aborts, self._aborts = self._aborts, []
        for request in pending:
            self.engine.scheduler.add_request(request)
        self.engine.abort(aborts)
        if not self.engine.has_unfinished_requests():
            return []
        return self.engine.step()

    async def _run(self) -> None:
        while True:
            if not (self.engine.has_unfinished_requests() or self._pending or self._aborts):
                self._wake.clear()
                await self._wake.wait()
            try:
                updated = await asyncio.to_thread(self._step)
            except Exception:  # never let one bad step stop the server: fail what was in flight
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all()
                continue
            for request in updated:
                self._emit(request)

    def _fail_all(self) -> None:
        s = self.engine.scheduler
        self.engine.abort([r.request_id for r in s.running + s.waiting])
        for rid, stream in list(self.streams.items()):
            if not stream.done:
                stream.done = True
                stream.queue.put_nowait(RequestOutput(rid, "", [], True, "error"))

    def _emit(self, request: Request) -> None:
        stream = self.streams.get(request.request_id)
        if stream is None or stream.done:
            return
        new = request.output_token_ids[stream.tokens:]
        logprobs = request.output_logprobs[stream.tokens:]
        stream.tokens = len(request.output_token_ids)
        for token in new:
            stream.text += stream.decoder.push(token)
        finished = request.is_finished
        reason = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_ABORTED: "abort"}.get(request.status)
        hit = _first_stop(stream.text, stream.stop, stream.sent)
        if hit >= 0:  # a stop string: cut the text before it and end the request
            stream.text = stream.text[:hit]
            finished, reason = True, "stop"
            self.abort(request.request_id)
        elif finished:
            stream.text += stream.decoder.flush()
        # hold back a tail that could still grow into a stop string
        hold = 0 if finished else max((len(s) - 1 for s in stream.stop), default=0)
        upto = max(stream.sent, len(stream.text) - hold)
        delta = stream.text[stream.sent:upto]
        stream.sent = upto
        stream.done = finished
        stream.queue.put_nowait(RequestOutput(
            request.request_id, delta, list(new), finished, reason, request.num_prompt_tokens,
            len(request.output_token_ids), logprobs))


def _first_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the earliest stop string starts in ``text`` (-1 if none); only text that could
    overlap the unsent part (from ``sent``) is searched."""
    found = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    return min(found, default=-1)
