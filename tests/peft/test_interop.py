"""Adapters made by Hugging Face peft load into leanlm with the same logits, and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_hf_model
from leanlm import load_model
from leanlm.errors import LeanLMError
from leanlm.peft import IA3Config, LoRAConfig, apply_peft_, load_adapter, save_adapter

peft = pytest.importorskip("peft")
if not hasattr(peft, "get_peft_model"):  # tests/peft itself, seen as a namespace package
    pytest.skip("the peft library is not installed", allow_module_level=True)
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4, 8, 250]])

PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False),
    "rslora": lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj"],
                                      init_lora_weights=False, use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                    init_lora_weights=False, use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"], init_ia3_weights=False),
}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    build_hf_model("llama").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, adapter).eval()(TOKENS).logits


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_loads_with_the_same_logits(kind: str, base: Path, tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(hf, PEFT_CONFIGS[kind]())
    if kind == "ia3":  # init_ia3_weights=False still starts at ones: make the scales matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = model.eval()(TOKENS).logits
        ours = load_model(base)
        plain = ours(TOKENS)
        load_adapter(ours, tmp_path / "adapter")
        got = ours(TOKENS)
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, lora_alpha=8, targets=["q_proj", "v_proj", "gate_proj"]),
    LoRAConfig(r=4, use_rslora=True, use_dora=True, targets=["o_proj"]),
    IA3Config(targets=["k_proj", "v_proj", "down_proj"])], ids=["lora", "rslora-dora", "ia3"])
def test_leanlm_adapter_loads_in_peft_with_the_same_logits(config: object, base: Path,
                                                            tmp_path: Path) -> None:
    ours = load_model(base)
    apply_peft_(ours, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * 0.2)
        got = ours(TOKENS)
    save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(peft_logits(base, tmp_path / "ours"), got, rtol=1e-4, atol=1e-4)


def test_adapter_for_another_base_is_refused(base: Path, tmp_path: Path) -> None:
    import transformers

    cfg = build_hf_model("llama").config
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    other = transformers.AutoModelForCausalLM.from_config(cfg)
    lora = peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "a")
    ours = load_model(base)
    with pytest.raises(LeanLMError, match="does not fit this base model: .*lora_A.weight: the file has"):
        load_adapter(ours, tmp_path / "a")
    assert not any(".adapters." in n for n, _ in ours.named_parameters())  # nothing left behind
    with pytest.raises(LeanLMError, match="target 'qq_proj' matches no module; module names end with one of"):
        apply_peft_(ours, LoRAConfig(targets=["qq_proj"]))
