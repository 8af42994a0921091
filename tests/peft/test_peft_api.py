"""Merging, trainable parameters, switching adapters, and every method learning a toy task."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from leanlm.peft import (
    BottleneckConfig,
    CompacterConfig,
    IA3Config,
    LoRAConfig,
    ParallelAdapterConfig,
    apply_peft_,
    mark_trainable_,
    merge_,
    remove_peft_,
    set_adapter,
    unmerge_,
)
from leanlm.peft.api import adapted_modules
from leanlm.quant import RTNConfig, quantize_

TOKENS = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = {
    "lora": LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]),
    "dora": LoRAConfig(r=4, use_dora=True, targets=["q_proj", "v_proj"]),
    "ia3": IA3Config(),
    "houlsby": BottleneckConfig(bottleneck=8),
    "pfeiffer": BottleneckConfig(bottleneck=8, placement="pfeiffer"),
    "parallel": ParallelAdapterConfig(bottleneck=8),
    "compacter": CompacterConfig(bottleneck=8, phm_dim=4),
}


def randomize(model: torch.nn.Module, scale: float = 0.1) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("config", [METHODS["lora"], METHODS["dora"], METHODS["ia3"]],
                         ids=["lora", "dora", "ia3"])
def test_merge_equals_unmerged_and_unmerge_restores_weights(config: object) -> None:
    model = random_model("llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft_(model, config)
    randomize(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        merge_(model)
        merged = model(TOKENS)
        unmerge_(model)
        again = model(TOKENS)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    for k, v in before.items():
        assert (after[k] - v).abs().max() <= 1e-6, k


def test_bottleneck_adapters_refuse_to_merge() -> None:
    model = random_model("llama")
    apply_peft_(model, METHODS["houlsby"])
    with pytest.raises(Exception, match="cannot be merged"):
        merge_(model)


@pytest.mark.parametrize("name", list(METHODS))
def test_only_adapters_train_and_the_loss_goes_down(name: str) -> None:
    torch.manual_seed(0)
    model = random_model("llama").train()
    apply_peft_(model, METHODS[name])
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    trainable = mark_trainable_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert trainable == sum(p.numel() for p in params) > 0
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = torch.randint(2, 40, (4, 16), generator=torch.Generator().manual_seed(1))  # a toy task
    losses = []
    for _ in range(25):
        loss = model.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # base untouched


def test_several_adapters_switch_per_call() -> None:
    model = random_model("llama").eval()
    with torch.no_grad():
        plain = model(TOKENS)
        apply_peft_(model, LoRAConfig(r=4), "a")
        apply_peft_(model, IA3Config(), "b")
        randomize(model)
        set_adapter(model, "a")
        out_a = model(TOKENS)
        set_adapter(model, "b")
        out_b = model(TOKENS)
        set_adapter(model, ["a", "b"])
        both = model(TOKENS)
        set_adapter(model, None)
        torch.testing.assert_close(model(TOKENS), plain)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(both, out_a)
    remove_peft_(model)
    assert not adapted_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), plain)


def test_qlora_trains_on_an_int4_base() -> None:
    torch.manual_seed(0)
    model = random_model("llama")
    quantize_(model, RTNConfig(bits=4, group_size=32))
    apply_peft_(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    mark_trainable_(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(2, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(20):
        loss = model.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    q = model.layers[0].self_attn.q_proj
    assert q.adapters["default"].lora_A.weight.grad is None and type(q).__name__ == "QuantLinear"


def test_an_adapter_on_the_head_is_used_by_the_fused_training_loss() -> None:
    model = random_model("llama")
    data = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = model.loss(data[:, :-1], data[:, 1:])
    apply_peft_(model, LoRAConfig(r=4, targets=["lm_head"]))
    randomize(model, 1.0)
    with_lora = model.loss(data[:, :-1], data[:, 1:])
    with torch.no_grad():
        logits = model(data[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
    assert abs(with_lora.item() - plain.item()) > 1e-3
    torch.testing.assert_close(with_lora.detach(), want, rtol=1e-5, atol=1e-5)


def test_a_model_with_adapters_is_not_saved_as_a_plain_checkpoint(tmp_path) -> None:
    from leanlm import save_model
    from leanlm.errors import LeanLMError

    model = random_model("llama")
    apply_peft_(model, LoRAConfig(r=2))
    with pytest.raises(LeanLMError, match="adapters attached"):
        save_model(model, tmp_path / "m")


def test_method_config_is_a_registry_lookup_by_command_line_name() -> None:
    from leanlm.errors import LeanLMError
    from leanlm.peft import REGISTRY, method_config

    assert set(REGISTRY) >= {"lora", "dora", "adapter", "pfeiffer", "parallel-adapter", "ia3", "compacter"}
    options = {"targets": ["q_proj"], "r": 4, "alpha": 8.0, "dropout": 0.1, "bottleneck": 16}
    assert method_config("lora", **options) == LoRAConfig(targets=["q_proj"], r=4, lora_alpha=8.0,
                                                          lora_dropout=0.1)
    assert method_config("dora", **options).use_dora
    assert method_config("pfeiffer", **options) == BottleneckConfig(targets=["q_proj"], bottleneck=16,
                                                                    placement="pfeiffer")
    assert method_config("adapter", **options).placement == "houlsby"
    assert method_config("ia3", **options) == IA3Config(targets=["q_proj"])
    with pytest.raises(LeanLMError, match="unknown method 'nope'"):
        method_config("nope")
