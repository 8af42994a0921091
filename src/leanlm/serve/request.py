"""A serving request (its sampling parameters are :class:`leanlm.sampling.SamplingParams`).

A request's state is its prompt, its generated tokens and ``num_computed_tokens``: how many of
its tokens already have their K/V in the cache. The scheduler only ever moves that number
forward (or back to 0 on preemption); prefill and decode are not separate phases, a request
simply has ``num_tokens - num_computed_tokens`` tokens left to compute.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from leanlm.errors import LeanLMError
from leanlm.sampling import SamplingParams, stops

__all__ = ["Request", "RequestStatus", "SamplingParams"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # an eos / stop token (or, in the engine, a stop string)
    FINISHED_LENGTH = "length"  # max_tokens
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: Sequence[int] = ()
    lora: str | None = None
    priority: int = 0  # lower runs first under the priority policy
    client: str = ""  # who sent it (API key or `user`): the fairness policy's unit
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens proposed for the next step
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # per generated token, when sampling_params.logprobs is set: (logprob, [(token, logprob)] top-k)
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # per prompt token, when sampling_params.prompt_logprobs is set (None for the first token)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise LeanLMError(f"request {self.request_id!r}: the prompt is empty")
        self._all = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self._all

    @property
    def num_tokens(self) -> int:
        return len(self._all)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def cache_key(self) -> tuple:
        """Extra prefix-cache hash keys: K/V computed under another adapter are not shareable."""
        return (self.lora,) if self.lora else ()

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output(self, token: int) -> RequestStatus:
        """Add a generated token; returns (and sets) the status it leaves the request in."""
        self.output_token_ids.append(token)
        self._all.append(token)
        reason = stops(self.sampling_params, len(self.output_token_ids), token, self.eos_token_ids)
        if reason is not None:
            self.status = RequestStatus(reason)
        return self.status


def check_request(prompt: Sequence[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                  num_blocks: int, block_size: int, lookahead: int = 0) -> None:
    """Refuse (LeanLMError) a request no engine of this shape could serve: token ids outside the
    vocabulary, more tokens than the context, more KV blocks than the cache has."""
    if any(not 0 <= t < vocab_size for t in prompt):
        raise LeanLMError(f"prompt has a token id outside the vocabulary [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in params.logit_bias):
        raise LeanLMError(f"logit_bias names a token id outside the vocabulary [0, {vocab_size})")
    if len(prompt) + params.max_tokens > max_model_len:
        raise LeanLMError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) is "
                          f"past the model's context of {max_model_len}")
    need = -(-(len(prompt) + params.max_tokens + lookahead) // block_size)
    if need > num_blocks:
        raise LeanLMError(f"the request needs {need} KV blocks; the cache has {num_blocks}")
