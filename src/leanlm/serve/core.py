"""The engine core: the one loop that owns an ``LLMEngine`` — requests added and aborted between
steps, a step run, each updated request's new tokens handed on — whether it runs in a thread of
the API server (:class:`~leanlm.serve.async_engine.AsyncLLMEngine` over an in-process engine) or
in a process of its own (:func:`run_engine_core`, vLLM v1's ``EngineCoreProc``).

A failure in a step fails the requests at fault, not everything in flight. A request the
scheduler refuses fails alone. When a step raises, nothing the step did can be trusted (the model
runner may hold half-updated state, blocks filled in the step may not hold their K/V), so the
engine rolls back (``LLMEngine.recover``: every running request goes back to the queue, to be
recomputed, and the prefix cache is dropped), and the requests that had not produced a token yet
are the suspects: one suspect fails alone (HTTP 400 where its input was at fault, a
``LeanLMError``; else 500); several are put on probation, re-added one per step (other new
requests wait meanwhile) until the one that fails again is found; with no suspect (requests that
already produced tokens), the requests of that step fail. A dead worker
(:class:`~leanlm.serve.executor.EngineDeadError`) is not a request's fault: it ends the core.
"""

from __future__ import annotations

import logging
from collections import deque

from leanlm.errors import LeanLMError
from leanlm.serve.engine import LLMEngine
from leanlm.serve.executor import EngineDeadError
from leanlm.serve.messages import RequestUpdate
from leanlm.serve.request import Request, RequestStatus

log = logging.getLogger(__name__)

REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
           RequestStatus.FINISHED_ABORTED: "abort"}


class EngineCore:
    """Not thread-safe: one owner calls ``add``, ``abort`` and ``step`` (see the module docstring)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.pending: list[Request] = []  # added since the last step
        self.aborts: list[str] = []
        self.copied: dict[str, int] = {}  # output tokens already handed on, per request
        self.probation: deque[Request] = deque()  # suspects of a failed step, re-added one at a time
        self.probe: str | None = None  # the suspect being tried
        self.updates: list[RequestUpdate] = []  # of the step in progress

    def add(self, request: Request) -> None:
        self.pending.append(request)

    def abort(self, request_ids: list[str]) -> None:
        self.aborts.extend(request_ids)

    def has_work(self) -> bool:
        return bool(self.pending or self.aborts or self.probation or self.engine.has_unfinished_requests())

    def step(self) -> list[RequestUpdate]:
        """Apply what arrived, run one engine step (if any request is unfinished); the updates.
        Raises EngineDeadError when a worker is gone."""
        self.updates = []
        pending: list[Request] = []
        if not (self.probation or self.probe):  # new requests wait while suspects are tried
            pending, self.pending = self.pending, []
        aborts, self.aborts = self.aborts, []
        for request in pending:
            self._add(request)
        if self.probe is None and self.probation:
            probe = self.probation.popleft()
            self.probe = probe.request_id
            self._add(probe)
        self.engine.abort(aborts)
        for rid in aborts:
            self._forget(rid)
        if not self.engine.has_unfinished_requests():
            return self.updates
        try:
            updated = self.engine.step()
        except EngineDeadError:
            raise
        except Exception as e:  # never let one bad request stop the server (see the docstring)
            self._recover(e)
            return self.updates
        scheduled = self.engine.scheduled
        if self.probe is not None and scheduled is not None and self.probe in scheduled.num_scheduled_tokens:
            self.probe = None  # it ran a step: not the culprit
        self.updates += [self._copy(r) for r in updated]
        return self.updates

    def fail_all(self, message: str) -> list[RequestUpdate]:
        """End every request in flight with a server error (the engine is going down)."""
        s = self.engine.scheduler
        ids = [r.request_id for r in s.running + s.waiting] + [r.request_id for r in self.pending]
        ids += [r.request_id for r in self.probation]
        return [RequestUpdate(rid, [], [], "error", 0, 0, message, 500) for rid in dict.fromkeys(ids)]

    # ---- internals ----------------------------------------------------------------------------
    def _add(self, request: Request) -> None:
        try:
            if request.lora is not None:  # (validated by the front end; loaded here)
                self.engine._ensure_loaded(request.lora)
            self.engine.scheduler.add_request(request)
        except EngineDeadError:
            raise
        except Exception as e:
            log.warning("request %s refused: %s", request.request_id, e)
            self._fail(request.request_id, e)

    def _forget(self, rid: str) -> None:
        self.copied.pop(rid, None)
        if self.probe == rid:
            self.probe = None
        if self.probation:  # a suspect whose client went away is not tried
            self.probation = deque(r for r in self.probation if r.request_id != rid)

    def _fail(self, rid: str, error: Exception) -> None:
        """End one request with an error: 400 if its input was at fault, else 500."""
        self.engine.abort([rid])
        self._forget(rid)
        status = 400 if isinstance(error, LeanLMError) else 500
        message = (str(error) if status == 400
                   else f"the engine failed on this request ({type(error).__name__})")
        self.updates.append(RequestUpdate(rid, [], [], "error", 0, 0, message, status))

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
                self.probation.append(r)
        else:  # requests that had produced tokens before: which one failed cannot be told
            for r in scheduled:
                self._fail(r.request_id, error)
            if out is None:
                for r in list(s.waiting):
                    self._fail(r.request_id, error)

    def _copy(self, request: Request) -> RequestUpdate:
        rid = request.request_id
        start = self.copied.get(rid, 0)
        self.copied[rid] = len(request.output_token_ids)
        if request.is_finished:
            del self.copied[rid]
        scored = None  # the prompt's logprobs, with the first token (the prefill is done then)
        if start == 0 and request.sampling_params.prompt_logprobs is not None:
            scored = request.prompt_logprobs
        return RequestUpdate(rid, request.output_token_ids[start:], request.output_logprobs[start:],
                             REASONS.get(request.status), request.num_prompt_tokens,
                             len(request.output_token_ids), prompt_logprobs=scored)
