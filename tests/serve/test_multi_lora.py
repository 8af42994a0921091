"""Multi-LoRA serving: requests for 8 adapters (and the base) in one batch give the outputs of
each adapter alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import random_model
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.peft import IA3Config, LoRAConfig, apply_peft_, save_adapter, set_adapter
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import LLM, EngineConfig


def make_adapters(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        model = random_model("llama")
        config = IA3Config() if i == n - 1 else LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"])
        apply_peft_(model, config)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters." in name:
                    p.add_(torch.randn_like(p) * 0.5)
        paths.append(save_adapter(model, root / f"a{i}"))
    return paths


def test_eight_adapters_in_one_batch_match_each_alone(tmp_path: Path) -> None:
    adapters = make_adapters(tmp_path, 8)
    llm = LLM(random_model("llama"), EngineConfig(block_size=4, num_blocks=256))
    for i, path in enumerate(adapters):
        llm.engine.add_lora(f"a{i}", path)
    rng = random.Random(0)
    shared = [rng.randrange(2, 300) for _ in range(9)]  # a common prefix: the cache must not mix adapters
    prompts = [shared + [rng.randrange(2, 300) for _ in range(rng.randrange(1, 10))] for _ in range(20)]
    loras = [f"a{i % 8}" if i < 16 else None for i in range(20)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    batched = llm.generate(prompts, params, lora=loras)
    model = llm.engine.model
    outputs_differ = set()
    for prompt, lora, got in zip(prompts, loras, batched, strict=True):
        set_adapter(model, lora)
        want = generate(model, [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        assert got == want, lora
        outputs_differ.add(tuple(got))
    set_adapter(model, None)
    assert len(outputs_differ) > 10  # the adapters really change the outputs
    kv = llm.engine.kv
    assert kv.pool.num_free_blocks == len(kv.pool.blocks)


def test_unknown_adapter_and_head_adapters_are_refused(tmp_path: Path) -> None:
    llm = LLM(random_model("llama"), EngineConfig(block_size=4, num_blocks=64))
    with pytest.raises(LeanLMError, match="unknown LoRA adapter 'x'"):
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2), lora="x")
    model = random_model("llama")
    apply_peft_(model, LoRAConfig(r=2, targets=["lm_head"]))
    save_adapter(model, tmp_path / "head")
    with pytest.raises(LeanLMError, match="adapters on lm_head cannot be served"):
        llm.engine.add_lora("head", tmp_path / "head", load=True)
    assert not llm.engine.loras and not llm.engine.resident_loras


def test_adapters_load_on_demand_within_a_resident_cap(tmp_path: Path) -> None:
    adapters = make_adapters(tmp_path, 5)
    model = random_model("llama")
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=256, max_loras=2))
    for i, path in enumerate(adapters):
        llm.engine.add_lora(f"a{i}", path)
    assert not llm.engine.resident_loras  # registered, not loaded
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    outs = {}
    for name in ["a0", "a1", "a2", "a0", "a4"]:
        outs.setdefault(name, []).append(llm.generate([prompt], params, lora=name)[0])
        assert len(llm.engine.resident_loras) <= 2 and name in llm.engine.resident_loras
    assert outs["a0"][0] == outs["a0"][1]  # unloaded and reloaded: the same adapter
    assert list(llm.engine.resident_loras) == ["a0", "a4"]
    with pytest.raises(LeanLMError, match="no adapter named"):
        set_adapter(model, "a2")  # unloaded from the model


def test_openai_clients_select_adapters_by_model_name(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    from serve_fixtures import KEY, start_server

    from conftest import build_hf_model, write_tokenizer
    from leanlm import load_model, load_tokenizer

    path = tmp_path / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    base = load_model(path)
    apply_peft_(base, LoRAConfig(r=4))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p))
    save_adapter(base, tmp_path / "ad")
    srv, thread, url = start_server(path, {"mine": tmp_path / "ad"})
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        assert [m.id for m in client.models.list().data] == ["tiny", "mine"]
        texts = {}
        for name in ("tiny", "mine"):
            r = client.completions.create(model=name, prompt="hello world", max_tokens=8, temperature=0)
            assert r.model == name
            texts[name] = r.choices[0].text
        tok = load_tokenizer(path)
        llm = LLM(load_model(path), EngineConfig(block_size=4, num_blocks=64))
        llm.engine.add_lora("mine", tmp_path / "ad")
        want = llm.generate([tok.encode("hello world")], SamplingParams(max_tokens=8, temperature=0),
                            lora="mine")
        assert texts["mine"] == tok.decode(want[0]) != texts["tiny"]
        with pytest.raises(openai.BadRequestError, match="does not exist"):
            client.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
