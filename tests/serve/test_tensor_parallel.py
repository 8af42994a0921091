"""The engine over tensor-parallel worker processes (gloo, fp32) gives the single-process engine's
greedy tokens and logprobs: GQA, q/k norm, sliding window, a GPTQ int4 model and two LoRA
adapters in one batch, with prefix caching and chunked prefill on; and with fewer K/V heads
than ranks (TP=4, 2 K/V heads)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import build_hf_model, random_model
from leanlm.checkpoint import load_model
from leanlm.peft import LoRAConfig, apply_peft_, save_adapter
from leanlm.quant import GPTQConfig, quantize_
from leanlm.quant.formats import save_quantized
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import LLM, EngineConfig, LLMEngine
from leanlm.serve.executor import MultiprocExecutor
from leanlm.serve.scheduler import SchedulerConfig

pytestmark = pytest.mark.dist

# chunked prefill (at most 7 tokens of a request per step, 24 per step) and prefix caching
CONFIG = EngineConfig(block_size=4, num_blocks=96, scheduler=SchedulerConfig(
    max_num_batched_tokens=24, long_prefill_token_threshold=7))
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3)


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, 300) for _ in range(12)]
    return [(shared if i % 2 else []) + [rng.randrange(2, 300) for _ in range(rng.randrange(3, 15))]
            for i in range(n)]


def run(engine: LLMEngine, loras: list[str | None]) -> tuple[list[list[int]], list[list[float]]]:
    ps = prompts(len(loras))
    requests = [engine.add_request(p, PARAMS, lora=a) for p, a in zip(ps, loras, strict=True)]
    while engine.has_unfinished_requests():
        engine.step()
    return ([r.output_token_ids for r in requests],
            [[lp for lp, _ in r.output_logprobs] for r in requests])


def compare(path: Path, tp: int, adapters: dict[str, Path] | None = None) -> None:
    loras: list[str | None] = [None] * 6
    if adapters:
        loras = [None, *adapters, None, *adapters][:6]
    single = LLM(load_model(path), CONFIG).engine
    for name, adapter in (adapters or {}).items():
        single.add_lora(name, adapter)
    want_tokens, want_logprobs = run(single, loras)
    model_config = load_model(path).config
    make = lambda spec: MultiprocExecutor(replace(spec, model=str(path), dtype="float32"), tp)
    engine = LLMEngine.with_executor(model_config, CONFIG, torch.float32, tp, make)
    try:
        for name, adapter in (adapters or {}).items():
            engine.add_lora(name, adapter)
        tokens, logprobs = run(engine, loras)
        # the same prompts again: now their prefixes come from the prefix cache
        again, _ = run(engine, loras)
    finally:
        engine.executor.shutdown()
    assert tokens == want_tokens and again == want_tokens
    for got, want in zip(logprobs, want_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_tp2_matches_one_process(family: str, tmp_path: Path) -> None:
    path = tmp_path / family
    build_hf_model(family).save_pretrained(path)
    compare(path, 2)


def test_tp2_gptq_int4_and_two_lora_adapters_in_one_batch(tmp_path: Path) -> None:
    model = random_model("llama")
    calib = torch.randint(2, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib, progress=False)
    quantized = save_quantized(model, tmp_path / "gptq")
    compare(quantized, 2)
    base = tmp_path / "llama"
    build_hf_model("llama").save_pretrained(base)
    adapters = {}
    for i in range(2):
        model = load_model(base)
        apply_peft_(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters." in name:
                    p.add_(torch.randn_like(p) * 0.5)
        adapters[f"a{i}"] = save_adapter(model, tmp_path / f"a{i}")
    compare(base, 2, adapters)


def test_tp4_with_fewer_kv_heads_than_ranks(tmp_path: Path) -> None:
    path = tmp_path / "llama"  # 4 heads, 2 K/V heads: each K/V head held by two ranks
    build_hf_model("llama").save_pretrained(path)
    compare(path, 4)
