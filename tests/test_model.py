"""Numerical parity with transformers for every family: logits and greedy generation."""

from __future__ import annotations

import pytest
import torch

import leanlm
from conftest import FAMILIES, VOCAB, build_hf_model
from leanlm.attention import SDPAMetadata
from leanlm.generate import generate
from leanlm.sampling import SamplingParams


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, make_hf_checkpoint):
    path = make_hf_checkpoint(family)
    hf = build_hf_model(family)
    ours = leanlm.load_model(path)
    assert ours.config.model_type == hf.config.model_type
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 40, VOCAB)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(family, make_hf_checkpoint):
    path = make_hf_checkpoint(family, seed=3)
    hf = build_hf_model(family, seed=3)
    hf.generation_config.eos_token_id = None
    ours = leanlm.load_model(path)
    prompt = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 7:]
    got = generate(ours, [prompt[0].tolist()],
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert got == expected.tolist()


def test_kv_cache_decode_equals_full_forward(make_hf_checkpoint):
    # Mistral with window 8: decoding past the window must keep masking old keys.
    model = leanlm.load_model(make_hf_checkpoint("mistral"))
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(1, 20)

        def step(start: int, end: int) -> torch.Tensor:
            positions = torch.arange(start, end)[None]
            attn = SDPAMetadata.cached(cache, positions, model.sliding_window)
            return model(tokens[:, start:end], positions, attn)

        steps = [step(0, 5)] + [step(i, i + 1) for i in range(5, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_sliding_window_changes_the_result(make_hf_checkpoint):
    # Guards the parity test above: the window really is applied (else it would pass vacuously).
    model = leanlm.load_model(make_hf_checkpoint("mistral"))
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(tokens)
        model.config.layer_types = ["full_attention"] * model.config.num_layers
        for layer in model.layers:
            layer.self_attn.sliding = False
        full = model(tokens)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert not torch.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


def test_batched_generation_with_left_padding_matches_single(make_hf_checkpoint):
    model = leanlm.load_model(make_hf_checkpoint("qwen2-sliding"))
    prompts = [[5, 9, 13], [7, 3, 11, 2, 19, 23, 29, 31, 37, 41]]
    cfg = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batched = generate(model, prompts, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in prompts]


def test_bf16_close_to_transformers_bf16(make_hf_checkpoint):
    path = make_hf_checkpoint("llama")
    hf = build_hf_model("llama").to(torch.bfloat16)
    ours = leanlm.load_model(path, dtype="bfloat16")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens).float() - hf(tokens).logits.float()).abs().max().item()
    assert diff < 2e-2


def test_presets_have_the_published_parameter_counts():
    assert abs(leanlm.ModelConfig.from_preset("llama-3.2-1b").num_parameters() - 1.236e9) < 0.01e9
    assert abs(leanlm.ModelConfig.from_preset("qwen2.5-0.5b").num_parameters() - 0.494e9) < 0.01e9
    assert abs(leanlm.ModelConfig.from_preset("gpt2").num_parameters() - 124.4e6) < 0.5e6
    cfg = leanlm.ModelConfig.from_preset("llama-3.2-1b", num_layers=1, vocab_size=512)
    with torch.device("meta"):
        model = leanlm.Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
