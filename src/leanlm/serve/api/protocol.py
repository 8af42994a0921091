"""Request bodies of the OpenAI API (the subset leanlm serves), validated by pydantic.

What a body can be checked for by itself is checked here, so that a bad request gets a 400
before it reaches the tokenizer or the engine: text fields must be encodable as UTF-8 (a lone
surrogate such as ``"\\ud800"`` is valid JSON but not text any tokenizer can take), a chat needs
at least one message and known roles, stop strings must not be empty, numbers must lie in the
ranges the sampler accepts (the seed in the 64-bit range torch seeds with). Types are strict, as
the published JSON schema says: ``"5"`` is not an integer, ``1`` not a boolean (``1.0`` is an
integer, as JSON Schema has it). Limits that depend on the server's configuration (``n``, stop
strings, prompt characters, tokens a request may reserve) are checked by the server
(``limits.py``), which also writes them into its OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from leanlm.errors import LeanLMError
from leanlm.serve.request import SamplingParams


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate at position {e.start}") from None
    return text


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
Text = Annotated[str, AfterValidator(_utf8)]
StopString = Annotated[Text, Field(min_length=1)]
ROLES = ("system", "developer", "user", "assistant")


class _Body(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Sampling(_Body):
    model: Text
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    n: Int = Field(1, ge=1)
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = Field(None, ge=SamplingParams.SEED_RANGE[0], le=SamplingParams.SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    min_tokens: Int = Field(0, ge=0)
    # token id (as a string, as OpenAI sends it) -> bias
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: Text | None = None

    def num_logprobs(self) -> int | None:
        return None

    def num_prompt_logprobs(self) -> int | None:
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        requested = self.requested_max_tokens()
        return SamplingParams(
            max_tokens=default_max_tokens if requested is None else requested,
            min_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=self.stop_strings(), ignore_eos=self.ignore_eos, n=self.n,
            logprobs=self.num_logprobs(), prompt_logprobs=self.num_prompt_logprobs(),
            logit_bias=self.token_bias())

    def token_bias(self) -> dict[int, float]:
        try:
            return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise LeanLMError("logit_bias keys must be token ids") from None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Int], Field(min_length=1)] = Field(description="text, or token ids")
    logprobs: Int | None = Field(None, ge=0, le=20)  # top-k logprobs per token (0: only the sampled token's)
    echo: bool = False

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """Legacy completions: ``echo`` with ``logprobs`` scores the prompt's tokens too."""
        return self.logprobs if self.echo else None

    def prompt_chars(self) -> int:
        return len(self.prompt) if isinstance(self.prompt, str) else 0


class ChatMessage(_Body):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    max_completion_tokens: Int | None = Field(None, ge=1)

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class TokenizeRequest(_Body):
    model: Text | None = None
    prompt: Text


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[Int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers with (OpenAI's shape)."""

    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
