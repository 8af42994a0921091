"""GPTQ / AWQ / w8a8 checkpoints: documented bit order, an independent decoder, round trips, and
checkpoints written by an independent (AutoGPTQ-style) packer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, write_tokenizer
from leanlm import load_model, load_tokenizer, save_model
from leanlm.errors import LeanLMError
from leanlm.quant import (
    AWQConfig,
    GPTQConfig,
    LLMInt8Config,
    QuantLinear,
    RTNConfig,
    SmoothQuantConfig,
    quantize_,
)
from leanlm.quant.formats import awq_tensors, gptq_tensors, save_quantized
from leanlm.quant.primitives import default_g_idx

U32 = 0xFFFFFFFF


def layer(codes: torch.Tensor, zeros: torch.Tensor | None = None, group: int = -1) -> QuantLinear:
    n, k = codes.shape
    g = 1 if group == -1 else k // group
    z = torch.full((n, g), 8) if zeros is None else zeros
    return QuantLinear.from_codes(codes, torch.ones(n, g), z, default_g_idx(k, group), 4, group)


def words(t: torch.Tensor) -> list:
    return (t.to(torch.int64) & U32).tolist()


def test_gptq_hand_built_4x8() -> None:
    # [N=8 out, K=8 in] (qzeros packs along N, so N is a whole word too)
    codes = torch.tensor([[(n + k) % 16 for k in range(8)] for n in range(8)])
    t = gptq_tensors(layer(codes))
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (1, 8)  # [K·4/32, N]
    assert words(t["qweight"]) == [[0x76543210, 0x87654321, 0x98765432, 0xA9876543,
                                    0xBA987654, 0xCBA98765, 0xDCBA9876, 0xEDCBA987]]
    # qzeros: v1 stores z - 1 along N; symmetric 4-bit z = 8 -> 0x77777777; z = 0 wraps to 15
    z8 = gptq_tensors(layer(torch.zeros(8, 8, dtype=torch.long)))
    assert words(z8["qzeros"]) == [[0x77777777]]
    zn = gptq_tensors(layer(torch.zeros(8, 8, dtype=torch.long), torch.arange(8)[:, None]))
    assert words(zn["qzeros"]) == [[0x6543210F]]


def test_awq_hand_built_4x8() -> None:
    codes = torch.tensor([[n + k for k in range(4)] for n in range(8)])  # [N=8 out, K=4 in]
    t = awq_tensors(layer(codes, torch.arange(8)[:, None]))
    assert t["qweight"].shape == (4, 1)  # [K, N/8], outputs interleaved 0,2,4,6,1,3,5,7
    assert words(t["qweight"]) == [[0x75316420], [0x86427531], [0x97538642], [0xA8649753]]
    assert words(t["qzeros"]) == [[0x75316420]]  # zeros packed the same way, no minus one


# ---- an independent decoder, written from the format description --------------------------------
def stream_codes(column_words: list[int], bits: int, count: int) -> list[int]:
    stream = sum((w & U32) << (32 * i) for i, w in enumerate(column_words))
    return [(stream >> (bits * j)) & (2**bits - 1) for j in range(count)]


def decode_gptq(t: dict[str, torch.Tensor], bits: int, k: int, n: int) -> torch.Tensor:
    qw, qz = t["qweight"].tolist(), t["qzeros"].tolist()
    scales, g_idx = t["scales"].float(), t["g_idx"].tolist()
    zeros = [[(z + 1) & (2**bits - 1) for z in stream_codes(row, bits, n)] for row in qz]
    w = torch.zeros(n, k)
    for col in range(n):
        q = stream_codes([row[col] for row in qw], bits, k)
        for j in range(k):
            g = g_idx[j]
            w[col, j] = scales[g, col] * (q[j] - zeros[g][col])
    return w


def decode_awq(t: dict[str, torch.Tensor], k: int, n: int, group: int) -> torch.Tensor:
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(rows: list[list[int]]) -> list[list[int]]:
        out = []
        for row in rows:
            vals = [0] * n
            for j, word in enumerate(row):
                for i in range(8):
                    vals[8 * j + order[i]] = ((word & U32) >> (4 * i)) & 0xF
            out.append(vals)
        return out

    q, z, s = unpack(t["qweight"].tolist()), unpack(t["qzeros"].tolist()), t["scales"].float()
    return torch.tensor([[float(s[j // group, c]) * (q[j][c] - z[j // group][c]) for j in range(k)]
                         for c in range(n)])


@pytest.mark.parametrize(("fmt", "config"), [
    ("gptq", GPTQConfig(bits=4, group_size=32, act_order=True)),
    ("gptq", GPTQConfig(bits=3, group_size=32, sym=False)),
    ("gptq", RTNConfig(bits=2, group_size=64)),
    ("awq", AWQConfig(bits=4, group_size=32)),
])
def test_saved_tensors_decode_independently_and_reload_identically(tmp_path: Path, fmt: str,
                                                                  config: object) -> None:
    torch.manual_seed(0)
    model = random_model("llama").to(torch.bfloat16)
    calib = torch.randint(0, 300, (4, 32))
    quantize_(model, config, calib, progress=False)
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want, want_decode = model(tokens), model(tokens[:, :1])
    out = save_quantized(model, tmp_path / "q", load_tokenizer(write_tokenizer(tmp_path / "tok")),
                         format=fmt)
    tensors = load_file(str(out / "model.safetensors"))
    name = "layers.1.mlp.down_proj"
    m = model.get_submodule(name)
    t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"model.{name}.")}
    assert "weight" not in t
    if fmt == "gptq":
        ours = decode_gptq(t, config.bits, m.in_features, m.out_features)
    else:
        ours = decode_awq(t, m.in_features, m.out_features, config.group_size)
    torch.testing.assert_close(ours, m.dequantize(), rtol=1e-3, atol=1e-6)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == fmt and qcfg["bits"] == config.bits
    assert qcfg["group_size"] == config.group_size
    if fmt == "gptq":
        assert qcfg["desc_act"] == getattr(config, "act_order", False)
        assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    # transformers parses the quantization_config (running it needs gptqmodel/autoawq kernels)
    from transformers.utils.quantization_config import AwqConfig as HFAwq
    from transformers.utils.quantization_config import GPTQConfig as HFGPTQ

    parsed = (HFGPTQ if fmt == "gptq" else HFAwq).from_dict(qcfg)
    assert (parsed.bits, parsed.group_size) == (config.bits, config.group_size)
    loaded = load_model(out)
    assert isinstance(loaded.get_submodule(name), QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), want)
        assert torch.equal(loaded(tokens[:, :1]), want_decode)


def test_a_quantized_tied_head_is_saved_untied(tmp_path: Path) -> None:
    model = random_model("qwen2").to(torch.bfloat16)  # tied embeddings; bf16 scales survive fp16
    quantize_(model, RTNConfig(bits=8, group_size=-1), filter_fn=lambda n, m: True, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 300, (1, 5))
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["lm_head"] is True
    names = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.qweight" in names and "lm_head.weight" not in names
    loaded = load_model(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("config", [SmoothQuantConfig(), LLMInt8Config(threshold=4.0)])
def test_w8a8_round_trip(tmp_path: Path, config: object) -> None:
    model = random_model("llama")
    quantize_(model, config, torch.randint(0, 300, (4, 16)), progress=False)
    tokens = torch.randint(0, 300, (1, 7))
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert type(loaded.layers[0].mlp.up_proj) is type(model.layers[0].mlp.up_proj)


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop for 2/4/8 bits: intweight [K, N] -> qweight [K·b/32, N]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    return qweight.astype(np.int32)


def test_loads_a_checkpoint_packed_by_another_tool(tmp_path: Path) -> None:
    """A GPTQ checkpoint built with numpy the way AutoGPTQ packs one (asymmetric 4-bit, g32)."""
    model = random_model("llama")
    save_model(model, tmp_path / "fp")
    tensors = load_file(str(tmp_path / "fp" / "model.safetensors"))
    expected = {}
    bits, group = 4, 32
    for name in [k for k in tensors if k.endswith("_proj.weight")]:
        w = tensors.pop(name).numpy().astype(np.float64)
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scale = (hi - lo) / 15
        zero = np.round(-lo / scale)
        q = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 15)
        expected[name.removeprefix("model.").removesuffix(".weight")] = torch.tensor(
            ((q - zero[..., None]) * scale[..., None]).reshape(n, k), dtype=torch.float32)
        base = name.removesuffix(".weight")
        qweight = autogptq_pack(q.reshape(n, k).T.astype(np.int64), bits)
        # qzeros [G, N·b/32]: the same loop along N, on z - 1 (AutoGPTQ's v1 convention)
        qzeros = autogptq_pack((zero - 1).astype(np.int64), bits).T.copy()
        tensors[f"{base}.qweight"] = torch.from_numpy(qweight)
        tensors[f"{base}.qzeros"] = torch.from_numpy(qzeros)
        tensors[f"{base}.scales"] = torch.tensor(scale.T, dtype=torch.float16).contiguous()
        tensors[f"{base}.g_idx"] = torch.arange(k, dtype=torch.int32) // group
    save_file(tensors, str(tmp_path / "fp" / "model.safetensors"))
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group,
                                  "desc_act": False, "sym": False, "checkpoint_format": "gptq"}
    (tmp_path / "fp" / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path / "fp")
    for name, w in expected.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear)
        torch.testing.assert_close(m.dequantize(), w, rtol=2e-3, atol=1e-5)  # fp16 scales


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM packing loop: intweight [K, N] -> qweight [K, N/8]."""
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return qweight.astype(np.int32)


def test_loads_an_awq_checkpoint_packed_by_another_tool(tmp_path: Path) -> None:
    model = random_model("llama")
    save_model(model, tmp_path / "fp")
    tensors = load_file(str(tmp_path / "fp" / "model.safetensors"))
    group, expected = 32, {}
    for name in [k for k in tensors if k.endswith("_proj.weight")]:
        w = tensors.pop(name).numpy().astype(np.float64)
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        lo, hi = g.min(-1), g.max(-1)  # AutoAWQ: no widening to include 0
        scale = np.maximum(hi - lo, 1e-5) / 15
        zero = np.clip(-np.round(lo / scale), 0, 15)
        q = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 15)
        expected[name.removeprefix("model.").removesuffix(".weight")] = torch.tensor(
            ((q - zero[..., None]) * scale[..., None]).reshape(n, k), dtype=torch.float32)
        base = name.removesuffix(".weight")
        tensors[f"{base}.qweight"] = torch.from_numpy(autoawq_pack(q.reshape(n, k).T.astype(np.int64)))
        tensors[f"{base}.qzeros"] = torch.from_numpy(autoawq_pack(zero.T.astype(np.int64)))
        tensors[f"{base}.scales"] = torch.tensor(scale.T, dtype=torch.float16).contiguous()
    save_file(tensors, str(tmp_path / "fp" / "model.safetensors"))
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                  "zero_point": True, "version": "gemm"}
    (tmp_path / "fp" / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path / "fp")
    for name, w in expected.items():
        torch.testing.assert_close(loaded.get_submodule(name).dequantize(), w, rtol=2e-3, atol=1e-5)


def test_format_errors(tmp_path: Path) -> None:
    model = random_model("llama")
    with pytest.raises(LeanLMError, match="not quantized"):
        save_quantized(model, tmp_path / "x")
    quantize_(model, RTNConfig(bits=3, group_size=32), progress=False)
    with pytest.raises(LeanLMError, match="AWQ GEMM format stores 4-bit"):
        save_quantized(model, tmp_path / "x", format="awq")
    with pytest.raises(LeanLMError, match="save_quantized"):
        save_model(model, tmp_path / "x")
    w8 = random_model("llama")
    quantize_(w8, LLMInt8Config(), progress=False)
    with pytest.raises(LeanLMError, match="cannot hold"):
        save_quantized(w8, tmp_path / "x", format="gptq")
    assert not (tmp_path / "x").exists()
    save_quantized(model, tmp_path / "q")
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.qweight"] = t["model.layers.0.mlp.up_proj.qweight"][:1]
    save_file(t, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(LeanLMError, match="do not fit its shape"):
        load_model(tmp_path / "q")


def test_an_8_bit_head_under_a_4_bit_body_is_a_dynamic_override(tmp_path: Path) -> None:
    model = random_model("qwen2").to(torch.bfloat16)  # tied: the head is quantized apart
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False,
              lm_head=RTNConfig(bits=8, group_size=-1))
    assert (model.lm_head.bits, model.lm_head.group_size) == (8, -1)
    assert model.layers[0].mlp.up_proj.bits == 4
    save_quantized(model, tmp_path / "q")
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["lm_head"]) == (4, 32, True)
    assert qcfg["dynamic"] == {"+:lm_head": {"bits": 8, "group_size": -1}}  # GPTQModel's / vLLM's key
    loaded = load_model(tmp_path / "q")
    assert (loaded.lm_head.bits, loaded.lm_head.group_size) == (8, -1)
    assert loaded.layers[0].mlp.up_proj.bits == 4
    tokens = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(LeanLMError, match="the head's config must be a RTNConfig"):
        quantize_(random_model("llama"), RTNConfig(), progress=False, lm_head=GPTQConfig())
