"""What the model runner hands back to the engine: the one message from runner to engine core, as
:class:`~leanlm.serve.scheduler.SchedulerOutput` is the one from engine core to runner (vLLM v1's
``ModelRunnerOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field

# a token's log-probability and the top-k alternatives [(token, logprob)]
Logprob = tuple[float, list[tuple[int, float]]]


@dataclass
class ModelRunnerOutput:
    # per request that sampled this step: one token, or after drafts the accepted ones and one more
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # per request that asked (``logprobs``): of its sampled token, from the model's distribution
    logprobs: dict[str, Logprob] = field(default_factory=dict)
    # per request that asked (``prompt_logprobs``): [(prompt position, logprob, top-k)] computed
    # this step (a prefill may take several steps)
    prompt_logprobs: dict[str, list[tuple[int, float, list[tuple[int, float]]]]] = field(default_factory=dict)
