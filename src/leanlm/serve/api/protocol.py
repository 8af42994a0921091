"""Request bodies of the OpenAI API (the subset leanlm serves), validated by pydantic."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from leanlm.errors import LeanLMError
from leanlm.serve.request import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    user: str | None = None

    def num_logprobs(self) -> int | None:
        return None

    def num_prompt_logprobs(self) -> int | None:
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=(default_max_tokens if self.requested_max_tokens() is None
                        else self.requested_max_tokens()),
            min_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, n=self.n,
            logprobs=self.num_logprobs(), prompt_logprobs=self.num_prompt_logprobs(),
            logit_bias=self.token_bias())

    def token_bias(self) -> dict[int, float]:
        try:
            return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise LeanLMError("logit_bias keys must be token ids") from None


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="text, or token ids")
    logprobs: int | None = None  # top-k logprobs per token (0: only the sampled token's)
    echo: bool = False

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """Legacy completions: ``echo`` with ``logprobs`` scores the prompt's tokens too."""
        return self.logprobs if self.echo else None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
