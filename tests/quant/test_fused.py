"""Fused weight-only quantized projections: the same logits, state and checkpoints as apart."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from leanlm.checkpoint import load_model
from leanlm.quant import GPTQConfig, QuantLinear, RTNConfig, quantize_, save_quantized

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11], [4, 4, 8, 15, 16, 23, 42]])
CALIB = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def quantized(family: str, config: GPTQConfig | RTNConfig) -> torch.nn.Module:
    model = random_model(family)
    quantize_(model, config, CALIB if isinstance(config, GPTQConfig) else None, progress=False)
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=32, act_order=True),
                                    RTNConfig(bits=8, group_size=-1)], ids=["gptq4-act-order", "rtn8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logits_equal_unfused(family: str, config: GPTQConfig | RTNConfig, dtype: torch.dtype) -> None:
    """Equal bit for bit: bf16 runs the int4pack / int8pack kernels, fp32 dequantizes; either
    way each output column reads its own row's codes and scales, in the same order."""
    model = quantized(family, config).to(dtype)
    want = state(model)
    with torch.inference_mode():
        ref = model(TOKENS)
    assert model.fuse_projections_() == 2 * model.config.num_layers  # act-order q/k/v share g_idx
    qkv = model.layers[0].self_attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.out_features == 64 + 2 * 32
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), ref)
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)
    model.unfuse_projections_()
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), ref)


def test_layers_of_different_g_idx_stay_apart() -> None:
    model = quantized("llama", RTNConfig(bits=4, group_size=32))
    v = model.layers[0].self_attn.v_proj
    v.g_idx = v.g_idx.flip(0).contiguous()  # another column order: not one int4 layout with q, k
    assert model.fuse_projections_() == 2 * model.config.num_layers - 1
    assert "q_proj" in model.layers[0].self_attn._modules
    assert "qkv" in model.layers[1].self_attn._modules


def test_save_quantized_of_a_fused_model_writes_the_same_checkpoint(tmp_path) -> None:
    model = quantized("llama", GPTQConfig(bits=4, group_size=32))
    apart = save_quantized(model, tmp_path / "apart")
    model.fuse_projections_()
    fused = save_quantized(model, tmp_path / "fused")
    assert (fused / "model.safetensors").read_bytes() == (apart / "model.safetensors").read_bytes()
    assert "qkv" in model.layers[0].self_attn._modules  # fused again after writing
    loaded = load_model(fused, pack=True, fuse=True)  # (a GPU load's default)
    assert isinstance(loaded.layers[0].mlp.gate_up, QuantLinear)
    with torch.inference_mode():
        assert torch.equal(loaded(TOKENS), load_model(fused)(TOKENS))


def test_quantizing_a_fused_model_quantizes_each_projection() -> None:
    model = random_model("llama")
    model.fuse_projections_()
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    assert isinstance(model.layers[0].self_attn.k_proj, QuantLinear)
    assert "qkv" not in model.layers[0].self_attn._modules
