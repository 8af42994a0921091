"""The messages between the serving processes, as typed ``msgspec`` structs (MessagePack on the
wire; nothing is pickled): API server(s) ↔ engine core ↔ workers (vLLM v1's process layout).

- front end → engine core: :class:`AddRequest`, :class:`Abort`, :class:`Call` (a utility call,
  e.g. registering an adapter), tagged so one decoder reads them all (:data:`CoreInput`);
- engine core → front end: :class:`CoreOutputs`, one per step with every updated request
  (:class:`RequestUpdate`: its new tokens, logprobs, and why it finished), the engine's
  :class:`EngineStats`, and the answers to calls; :class:`EngineInfo` once, at the handshake;
- engine core → workers: :class:`Execute` (a ``SchedulerOutput``), :class:`WorkerCall`,
  :class:`Stop`; workers → engine core: :class:`WorkerReply` (rank 0 carries the
  ``ModelRunnerOutput`` of an ``Execute``).

``SchedulerOutput``, ``ModelRunnerOutput`` and ``SamplingParams`` are dataclasses, which msgspec
encodes and decodes field by field (``__post_init__`` checks run again on decoding).
"""

from __future__ import annotations

from typing import Any

import msgspec

from leanlm.sampling import SamplingParams
from leanlm.serve.outputs import Logprob, ModelRunnerOutput
from leanlm.serve.scheduler import SchedulerOutput


class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora: str | None = None
    priority: int = 0
    client: str = ""
    front_end: int = 0  # which API server the outputs go to


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Call(msgspec.Struct, tag="call"):
    call_id: int
    method: str
    args: list[Any] = []
    front_end: int = 0


CoreInput = AddRequest | Abort | Call


class RequestUpdate(msgspec.Struct, array_like=True):
    """What one step did to a request."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[Logprob]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # finish_reason "error": what failed
    error_status: int = 500  # the HTTP status it maps to (400: the request's input was at fault)
    prompt_logprobs: list[Logprob | None] | None = None  # with its first token, if it asked for them


class EngineStats(msgspec.Struct):
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, over the engine's life
    prefix_hits: int = 0  # ... and found there
    spec_proposed: int = 0  # draft tokens verified, over the engine's life
    spec_accepted: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class CallResult(msgspec.Struct):
    call_id: int
    result: Any = None
    error: str | None = None  # a LeanLMError's message (the call's input was at fault)


class CoreOutputs(msgspec.Struct):
    engine_index: int
    updates: list[RequestUpdate] = []
    stats: EngineStats | None = None
    results: list[CallResult] = []
    dead: str | None = None  # the engine core is going down: why (its in-flight requests failed)


class EngineInfo(msgspec.Struct):
    """What a front end needs to know of an engine core to validate requests itself."""

    engine_index: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_blocks: int
    block_size: int
    lookahead: int
    loras: list[str]
    pid: int


class Execute(msgspec.Struct, tag="execute"):
    scheduler_output: SchedulerOutput


class WorkerCall(msgspec.Struct, tag="call"):
    method: str
    args: list[Any] = []


class Stop(msgspec.Struct, tag="stop"):
    pass


WorkerInput = Execute | WorkerCall | Stop


class WorkerReply(msgspec.Struct):
    rank: int
    output: ModelRunnerOutput | None = None  # rank 0's, for an Execute
    result: Any = None  # a WorkerCall's
    error: str | None = None  # the call (or a single rank's step) failed: "Type: message"
    bad_input: bool = False  # ... with a LeanLMError: its input was at fault
    crash: str | None = None  # the worker is going down: why


core_input = msgspec.msgpack.Decoder(CoreInput)
core_outputs = msgspec.msgpack.Decoder(CoreOutputs)
engine_info = msgspec.msgpack.Decoder(EngineInfo)
worker_input = msgspec.msgpack.Decoder(WorkerInput)
worker_reply = msgspec.msgpack.Decoder(WorkerReply)
encode = msgspec.msgpack.Encoder().encode
