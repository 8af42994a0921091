"""A serving request and its sampling parameters (the OpenAI / vLLM ``SamplingParams`` fields).

A request's state is its prompt, its generated tokens and ``num_computed_tokens``: how many of
its tokens already have their K/V in the cache. The scheduler only ever moves that number
forward (or back to 0 on preemption); prefill and decode are not separate phases, a request
simply has ``num_tokens - num_computed_tokens`` tokens left to compute.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from leanlm.errors import LeanLMError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    # seeds torch's generators take (a negative seed is its value modulo 2**64)
    SEED_RANGE: ClassVar[tuple[int, int]] = (-2**63, 2**64 - 1)

    def __post_init__(self) -> None:
        # checked here, before a request reaches the engine thread (where a failure to seed
        # would surface only once its step ran)
        lo, hi = self.SEED_RANGE
        if self.seed is not None and not lo <= self.seed <= hi:
            raise LeanLMError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if any(not s for s in self.stop):
            raise LeanLMError("stop strings must not be empty")
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (1 <= self.n <= 128, f"n must be in [1, 128], got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
        ]
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LeanLMError(f"{name} must be a finite number, got {getattr(self, name)}")
        for ok, message in checks:
            if not ok:
                raise LeanLMError(message)
        bad = [v for v in self.logit_bias.values() if not (math.isfinite(v) and -100 <= v <= 100)]
        if bad:
            raise LeanLMError(f"logit_bias values must be in [-100, 100], got {bad[0]}")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 sample greedily (as vLLM): dividing by them overflows."""
        return self.temperature < 1e-5


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
        p, n = self.sampling_params, len(self.output_token_ids)
        if n >= p.min_tokens and ((not p.ignore_eos and token in self.eos_token_ids)
                                  or token in p.stop_token_ids):
            self.status = RequestStatus.FINISHED_STOPPED
        elif n >= p.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        return self.status
