"""FP8 (E4M3) W8A8: the quantizer's error bound, the layer's arithmetic, dtype casts, the
compressed-tensors checkpoint round trip and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import random_model
from leanlm import load_model
from leanlm.errors import LeanLMError
from leanlm.quant import FP8Config, Fp8Linear, quantize_, save_quantized
from leanlm.quant.fp8 import E4M3, absmax_fp8


def test_absmax_fp8_keeps_a_relative_error_of_one_sixteenth() -> None:
    t = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows over six decades
    q, scale = absmax_fp8(t)
    assert q.dtype == E4M3 and scale.shape == (64, 1)
    assert float(q.float().abs().amax()) == 448.0  # each row's maximum lands on E4M3's largest value
    back = q.float() * scale
    normal = q.float().abs() >= 2.0**-6  # E4M3's smallest normal: below it the spacing is absolute
    rel = ((back - t).abs() / t.abs())[normal]
    assert float(rel.max()) <= 2.0**-4 + 1e-6


def test_layer_computes_the_scaled_fp8_product() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 5, 96)
    xq, xs = absmax_fp8(x.reshape(-1, 96))
    want = (xq.float() @ layer.weight.float().t()) * xs * layer.weight_scale[None, :] + linear.bias
    got = layer(x)
    assert got.shape == (3, 5, 40)
    torch.testing.assert_close(got.reshape(-1, 40), want.detach(), rtol=0, atol=0)
    full = F.linear(x, linear.weight, linear.bias).detach()
    assert float((got - full).norm() / full.norm()) < 0.05  # two 3-bit mantissas: a few percent


def test_model_casts_leave_the_fp8_tensors_alone() -> None:
    model = quantize_(random_model("llama"), FP8Config(), progress=False)
    q = model.layers[0].self_attn.q_proj
    weight = q.weight.clone()
    model.to(torch.bfloat16)
    assert q.weight.dtype == E4M3 and torch.equal(q.weight, weight)
    assert q.weight_scale.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert model(tokens).dtype == torch.bfloat16


def test_compressed_tensors_round_trip(tmp_path: Path) -> None:
    model = random_model("qwen2").to(torch.bfloat16)
    quantize_(model, FP8Config(), progress=False)
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "float-quantized"
    group = cfg["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["strategy"]) == ("float", "channel")
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    assert cfg["ignore"] == ["lm_head"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert w.dtype == E4M3 and s.shape == (w.shape[0], 1) and s.dtype == torch.float32
    loaded = load_model(tmp_path / "q")
    assert isinstance(loaded.layers[0].mlp.down_proj, Fp8Linear)
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_other_compressed_tensors_schemes_are_refused(tmp_path: Path) -> None:
    model = quantize_(random_model("llama"), FP8Config(), progress=False)
    save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "int"
    path.write_text(json.dumps(cfg))
    with pytest.raises(LeanLMError, match=r"compressed-tensors weights \('int', 8, 'channel', False\)"):
        load_model(tmp_path / "q")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
def test_scaled_mm_matches_the_reference_on_gpu() -> None:
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(torch.nn.Linear(256, 512)).cuda()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    xq, xs = absmax_fp8(x)
    want = (xq.float() @ layer.weight.float().t()) * xs * layer.weight_scale[None, :] + layer.bias.float()
    torch.testing.assert_close(layer(x).float(), want, rtol=1e-2, atol=1e-2)  # bf16 output rounding
