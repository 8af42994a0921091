"""Speculative decoding in the engine (prompt-lookup and draft-model proposers): greedy outputs
unchanged, sampled outputs distributed as the target model's, the draft length adapts."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from conftest import random_model
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.sampling import Row, SamplingParams, probabilities
from leanlm.serve.engine import LLM, EngineConfig
from leanlm.serve.scheduler import SchedulerConfig
from leanlm.serve.speculative import best_length, ngram_drafts, verify_drafts


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


def perturbed(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with relative Gaussian noise on every weight: a draft that agrees
    with the target on some tokens and not others."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.abs().mean())
    return draft


CONFIGS = [
    ("llama", EngineConfig(block_size=4, num_blocks=256)),
    ("llama", EngineConfig(block_size=4, num_blocks=22)),  # preemption
    ("llama", EngineConfig(block_size=4, num_blocks=256, enable_prefix_caching=False,
                           scheduler=SchedulerConfig(max_num_batched_tokens=16,
                                                     long_prefill_token_threshold=5))),
    ("mistral", EngineConfig(block_size=4, num_blocks=256)),  # sliding window 8
    ("llama", EngineConfig(block_size=4, num_blocks=256, compile=True)),  # compiled verify and draft steps
]


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
@pytest.mark.parametrize(("family", "config"), CONFIGS)
def test_greedy_outputs_are_unchanged(family: str, config: EngineConfig, proposer: str) -> None:
    model = random_model(family)
    ps = repetitive_prompts(16)
    want = [generate(model, [p],
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0] for p in ps]
    config = dataclasses.replace(config, speculative=proposer, num_spec_tokens=3)
    llm = LLM(model, config, perturbed(model, 0.5) if proposer == "draft" else None)
    got = llm.generate(ps, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert got == want
    engine = llm.engine
    assert 0 < engine.spec_accepted < engine.spec_proposed  # drafts proposed, some kept, some not
    kv = engine.kv
    assert kv.pool.num_free_blocks == len(kv.pool.blocks)
    if proposer == "draft":
        assert not engine.proposer.last  # finished requests are forgotten


@pytest.mark.parametrize("compile", [False, True])
def test_a_draft_equal_to_the_target_is_always_accepted(compile: bool) -> None:
    """The draft's cache bookkeeping (accepted guesses' K/V kept, the rest recomputed) is exact:
    the target as its own draft proposes exactly the target's greedy tokens (compiled: the
    draft's one-token steps, its two-token catch-up after a full accept, and the verification
    share the compiled decode graphs)."""
    model = random_model("llama")
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=256, speculative="draft", num_spec_tokens=4,
                                  spec_adaptive=False, compile=compile), model)
    got = llm.generate(repetitive_prompts(6), SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True))
    assert all(len(g) == 17 for g in got)
    assert llm.engine.spec_accepted == llm.engine.spec_proposed > 50
    if compile:  # nothing fell back to eager
        assert llm.engine.proposer.compiled.fn is not None and llm.engine.runner.compiled.fn is not None


def test_draft_model_must_share_the_vocabulary() -> None:
    from leanlm.model import Transformer

    model = random_model("llama")
    cfg = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + 1)
    with pytest.raises(LeanLMError, match="vocabulary"):
        LLM(model, EngineConfig(block_size=4, num_blocks=64, speculative="draft"), Transformer(cfg))
    with pytest.raises(LeanLMError, match="draft model"):
        LLM(model, EngineConfig(block_size=4, num_blocks=64, speculative="draft"))


def test_draft_length_follows_acceptance_and_cost() -> None:
    assert best_length(0.9, 0.0, 6) == 6  # free drafts: as many as allowed
    assert best_length(0.9, 0.05, 8) > best_length(0.5, 0.05, 8) > 1
    assert best_length(0.3, 0.3, 8) == 1  # rarely right and costly: one guess
    assert best_length(0.7, 0.1, 3) == 3  # capped


def test_speculation_switches_off_for_large_batches() -> None:
    model = random_model("llama")
    ps = repetitive_prompts(8)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    off = LLM(model, EngineConfig(block_size=4, num_blocks=256, speculative="ngram",
                                  spec_disable_batch_size=4))
    off.generate(ps, params)
    assert off.engine.spec_proposed == 0
    on = LLM(model, EngineConfig(block_size=4, num_blocks=256, speculative="ngram",
                                 spec_disable_batch_size=8))
    on.generate(ps, params)
    assert on.engine.spec_proposed > 0


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

    draft = perturbed(model, 0.1)

    def second_tokens(speculative: str | None) -> torch.Tensor:
        llm = LLM(model, EngineConfig(block_size=4, num_blocks=2048, speculative=speculative),
                  draft if speculative == "draft" else None)
        reqs = [llm.engine.add_request(prompt, p) for p in params]
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        if speculative:
            assert llm.engine.spec_accepted > 100  # many tokens came from verified drafts
        return torch.bincount(torch.tensor([r.output_token_ids[6] for r in reqs]), minlength=320).float()

    a = second_tokens(None)
    for proposer in ("ngram", "draft"):
        b = second_tokens(proposer)
        tv = 0.5 * (a / a.sum() - b / b.sum()).abs().sum()
        assert tv < 0.1, proposer  # the same distribution, up to sampling noise (1,500 draws each)
