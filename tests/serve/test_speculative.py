"""Speculative decoding in the engine (prompt-lookup drafts): greedy outputs unchanged, sampled
outputs distributed as the target model's."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model
from leanlm.generate import GenerationConfig, generate
from leanlm.serve.engine import LLM, EngineConfig, ngram_drafts
from leanlm.serve.request import SamplingParams
from leanlm.serve.sampling import Row, probabilities, verify_drafts
from leanlm.serve.scheduler import SchedulerConfig


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        motif = [rng.randrange(2, 300) for _ in range(rng.randrange(3, 7))]
        out.append(motif * rng.randrange(2, 5) + [rng.randrange(2, 300) for _ in range(rng.randrange(0, 4))])
    return out


def test_ngram_drafts() -> None:
    assert ngram_drafts([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]
    assert ngram_drafts([5, 6, 7], 2) == []
    assert ngram_drafts([1, 9, 1], 4) == [9, 1]  # n = 1: after the earlier 1


@pytest.mark.parametrize(("family", "config"), [
    ("llama", EngineConfig(block_size=4, num_blocks=256)),
    ("llama", EngineConfig(block_size=4, num_blocks=18)),  # preemption
    ("llama", EngineConfig(block_size=4, num_blocks=256, enable_prefix_caching=False,
                           scheduler=SchedulerConfig(max_num_batched_tokens=16,
                                                     long_prefill_token_threshold=5))),
    ("mistral", EngineConfig(block_size=4, num_blocks=256)),  # sliding window 8
])
def test_greedy_outputs_are_unchanged(family: str, config: EngineConfig) -> None:
    model = random_model(family)
    ps = repetitive_prompts(16)
    want = [generate(model, [p], GenerationConfig(max_new_tokens=12, ignore_eos=True))[0] for p in ps]
    config.speculative, config.num_spec_tokens = "ngram", 3
    llm = LLM(model, config)
    got = llm.generate(ps, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert got == want
    assert llm.engine.spec_accepted > 0  # drafts were really proposed and accepted
    kv = llm.engine.kv
    assert kv.pool.num_free_blocks == len(kv.pool.blocks)


def test_verification_samples_the_target_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g) * 1.5
    row = Row(SamplingParams(temperature=1.0), [0], 1, torch.Generator().manual_seed(1))
    _, probs = probabilities(logits, [row] * 3)
    counts = torch.zeros(6)
    second = torch.zeros(6)
    n = 20_000
    for _ in range(n):
        out = verify_drafts(logits, row, [2, 4])
        counts[out[0]] += 1
        if out[0] == 2:  # the second token, given the first draft was kept
            second[out[1]] += 1
    torch.testing.assert_close(counts / n, probs[0], atol=0.012, rtol=0)
    torch.testing.assert_close(second / second.sum(), probs[1], atol=0.02, rtol=0)


def test_engine_samples_match_without_speculation() -> None:
    model = random_model("llama")
    prompt = repetitive_prompts(1, seed=3)[0]
    params = [SamplingParams(max_tokens=8, temperature=0.8, top_k=4, seed=s, ignore_eos=True)
              for s in range(1500)]

    def second_tokens(speculative: str | None) -> torch.Tensor:
        llm = LLM(model, EngineConfig(block_size=4, num_blocks=2048, speculative=speculative))
        reqs = [llm.engine.add_request(prompt, p) for p in params]
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        if speculative:
            assert llm.engine.spec_accepted > 100  # many tokens came from verified drafts
        return torch.bincount(torch.tensor([r.output_token_ids[6] for r in reqs]), minlength=320).float()

    a, b = second_tokens(None), second_tokens("ngram")
    tv = 0.5 * (a / a.sum() - b / b.sum()).abs().sum()
    assert tv < 0.1  # the same distribution, up to sampling noise (1,500 draws each)
