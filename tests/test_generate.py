"""Sampling matches transformers' logits processors; seeds, stop tokens, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import build_hf_model, write_tokenizer
from leanlm import LeanLMError
from leanlm.checkpoint import load_model
from leanlm.generate import generate, generate_text
from leanlm.sampling import Row, SamplingParams, process_logits
from leanlm.tokenizer import load_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "m"
    build_hf_model("llama").save_pretrained(path)
    return write_tokenizer(path)


def _hf_processed(logits, seen, **kw):
    import transformers as t

    procs = []
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(t.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    procs.append(t.TemperatureLogitsWarper(kw.get("temperature", 1.0)))
    if kw.get("top_k"):
        procs.append(t.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        procs.append(t.TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        procs.append(t.MinPLogitsWarper(kw["min_p"]))
    for p in procs:
        logits = p(seen, logits)
    return logits


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3),
                                dict(min_p=0.1), dict(repetition_penalty=1.3, top_k=20),
                                dict(top_k=10, top_p=0.5, min_p=0.05, temperature=0.9)])
def test_logits_processing_matches_transformers(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    seen = torch.randint(0, 50, (3, 6), generator=g)
    cfg = SamplingParams(**{"temperature": 1.0, **kw})
    _, ours = process_logits(logits, [Row(cfg, row, len(row), None) for row in seen.tolist()])
    theirs = _hf_processed(logits.clone(), seen, **{"temperature": 1.0, **kw})
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-5)


def test_seeded_sampling_is_reproducible(model_dir):
    model = load_model(model_dir)
    cfg = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = generate(model, [[5, 6, 7]], cfg)
    assert a == generate(model, [[5, 6, 7]], cfg)
    other = generate(model, [[5, 6, 7]], SamplingParams(**{**cfg.__dict__, "seed": 8}))
    assert a != other


def test_stop_token_ids_end_the_row(model_dir):
    model = load_model(model_dir)
    free = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0))[0]
    stopped = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=[free[3]],
                                                           temperature=0.0, ignore_eos=True))[0]
    assert stopped == free[: free.index(free[3])]


def test_stop_strings_and_streaming(model_dir):
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    cfg = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0)
    full = generate_text(model, tok, "def main", cfg)
    assert len(full) > 6
    stop = full[3:6]
    chunks: list[str] = []
    text = generate_text(model, tok, "def main", SamplingParams(**{**cfg.__dict__, "stop": [stop]}),
                         stream=chunks.append)
    assert text == full[: full.find(stop)]
    assert "".join(chunks) == text
    streamed: list[str] = []
    assert generate_text(model, tok, "def main", cfg, stream=streamed.append) == full
    assert len(streamed) > 1 and "".join(streamed) == full


def test_chat_prompt_uses_template(model_dir):
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    cfg = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    msgs = [{"role": "user", "content": "hi"}]
    ids = tok.encode_chat(msgs)
    expected = tok.decode(generate(model, [ids], cfg)[0])
    assert generate_text(model, tok, msgs, cfg) == expected


@pytest.mark.parametrize(("bad", "message"), [
    (dict(temperature=-1), "temperature must be >= 0"), (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p must be in"), (dict(top_k=-2), "top_k must be >= 0"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(max_tokens=-1), "max_tokens must be at least 1"), (dict(seed=2**64), "seed must be in")])
def test_bad_generation_settings(bad, message):
    with pytest.raises(LeanLMError, match=message):
        SamplingParams(**bad)


def test_engine_only_options_are_refused(model_dir):
    model = load_model(model_dir)
    for engine_only in (dict(n=2), dict(logprobs=1), dict(prompt_logprobs=0)):
        with pytest.raises(LeanLMError, match="serving engine"):
            generate(model, [[5, 6]], SamplingParams(**engine_only))


def test_bad_prompts(model_dir):
    model = load_model(model_dir)
    with pytest.raises(LeanLMError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(LeanLMError, match="outside the vocabulary"):
        generate(model, [[1, 10_000]])
