"""Loading and saving Hugging Face checkpoints: round trip, shards, dtypes, pickle refusal, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import leanlm
from conftest import FAMILIES, VOCAB, build_hf_model
from leanlm import LeanLMError
from leanlm.checkpoint import load_model, save_model
from leanlm.generate import generate
from leanlm.sampling import SamplingParams


@pytest.mark.parametrize("family", ["llama3-rope", "mistral", "qwen2-sliding", "qwen3", "gpt2"])
def test_round_trip_through_transformers(family, make_hf_checkpoint, tmp_path):
    import transformers

    ours = load_model(make_hf_checkpoint(family))
    out = save_model(ours, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, build_hf_model(family)(tokens).logits)
        assert torch.equal(load_model(out)(tokens), ours(tokens))


def test_sharded_checkpoint_loads(make_hf_checkpoint, tmp_path):
    ours = load_model(make_hf_checkpoint("llama"))
    total = sum(p.numel() * 4 for p in ours.parameters())
    out = save_model(ours, tmp_path / "sharded", max_shard_bytes=total // 2 + 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert not (out / "model.safetensors").exists()
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(out)(tokens), ours(tokens))


def test_transformers_sharded_checkpoint_loads(make_hf_checkpoint):
    path = make_hf_checkpoint("qwen3", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        diff = (load_model(path)(tokens) - build_hf_model("qwen3")(tokens).logits).abs().max()
    assert diff < 1e-4


def test_dtype_selection_and_mmap(make_hf_checkpoint, tmp_path):
    out = save_model(load_model(make_hf_checkpoint("llama")), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert oct((out / "model.safetensors").stat().st_mode & 0o644) == oct(0o644)
    model = load_model(out)  # default: the checkpoint's dtype
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    mapped = load_model(out, mmap=True)
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(mapped(tokens), model(tokens))
    assert load_model(out, dtype="fp32").layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert load_model(out, dtype=torch.float16).norm.weight.dtype == torch.float16
    with pytest.raises(LeanLMError, match="unknown dtype 'int3'"):
        load_model(out, dtype="int3")


def test_save_is_atomic_and_replaces(make_hf_checkpoint, tmp_path):
    model = load_model(make_hf_checkpoint("llama"))
    target = tmp_path / "out"
    save_model(model, target)
    (target / "stale.txt").write_text("old")
    save_model(model, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-0", "out"]  # no temp dirs left


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path):
    path = tmp_path / "pickled"
    build_hf_model("llama").save_pretrained(path, safe_serialization=False)
    if (path / "model.safetensors").exists():  # transformers 5 always writes safetensors
        sd = load_file(path / "model.safetensors")
        (path / "model.safetensors").unlink()
        torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(LeanLMError, match="pickle weights"):
        load_model(path)
    assert load_model(path, allow_pickle=True).config.num_layers == 2


# ---- bad input: each gives one clear line --------------------------------------------------------
def test_directory_without_config(tmp_path):
    with pytest.raises(LeanLMError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(LeanLMError, match="not a directory"):
        load_model(tmp_path / "missing")


def test_unknown_architecture(make_hf_checkpoint):
    path = make_hf_checkpoint("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LeanLMError, match="unknown model_type 'bert'"):
        load_model(path)


def test_truncated_safetensors(make_hf_checkpoint):
    path = make_hf_checkpoint("llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LeanLMError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(path)


def test_tensor_with_wrong_shape(make_hf_checkpoint):
    path = make_hf_checkpoint("llama")
    sd = load_file(path / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LeanLMError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[100, 64\], "
                                          r"expected \[128, 64\]"):
        load_model(path)


def test_missing_and_unexpected_tensors(make_hf_checkpoint):
    path = make_hf_checkpoint("llama")
    sd = load_file(path / "model.safetensors")
    sd["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LeanLMError, match="does not explain"):
        load_model(path)
    del sd["model.layers.9.extra.weight"], sd["model.norm.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LeanLMError, match="missing 1 tensor"):
        load_model(path)


def test_prompt_longer_than_context(make_hf_checkpoint):
    model = load_model(make_hf_checkpoint("gpt2"))  # n_positions = 128
    with pytest.raises(LeanLMError, match="prompt is 200 tokens, the model's context is 128"):
        generate(model, [[3] * 200], SamplingParams(max_tokens=4, temperature=0.0))
    # generation that would run past the context stops at it
    out = generate(model, [[3] * 120], SamplingParams(max_tokens=50, ignore_eos=True, temperature=0.0))
    assert len(out[0]) == 8


def test_public_contract(make_hf_checkpoint):
    model = leanlm.load_model(make_hf_checkpoint("llama"), dtype=None, device="cpu")
    assert isinstance(model, leanlm.Transformer)
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, VOCAB)
    assert set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gpt2"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_load_keeps_one_copy_of_each_weight(family, make_hf_checkpoint, tmp_path):
    """``pack=True``: every linear's weight is only the packed tensor, the embedding stays in the
    file mapping, the logits are the plain load's, and saving gives the checkpoint back."""
    from leanlm.kernels.cpu_linear import Linear

    path = make_hf_checkpoint(family)
    plain = load_model(path, dtype="float32")
    packed = load_model(path, dtype="float32", pack=True)
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * packed.config.num_layers + 1 if family == "llama" else len(linears) > 0
    assert all(m.is_packed and m._packed is None for m in linears)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    out = save_model(packed, tmp_path / "again")
    torch.testing.assert_close(load_model(out).state_dict(), plain.state_dict(), rtol=0, atol=0)
    packed.unpack_weights_()
    assert not any(m.is_packed for m in linears)
    if packed.config.tie_word_embeddings:
        assert packed.lm_head.weight is packed.embed_tokens.weight


PEAK = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # the interpreted Triton kernels' imports would count
import torch
import leanlm
def status(key):  # VmHWM, not ru_maxrss: that one starts from the forking parent's
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
import safetensors.torch  # what any load imports and sets up (oneDNN), before the baseline
torch.ops.mkldnn._reorder_linear_weight(torch.zeros(64, 64, dtype=torch.bfloat16))
base = status("VmRSS")
model = leanlm.load_model(sys.argv[1], pack=sys.argv[2] == "1")
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3, 4]]))
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_packed_load_peaks_at_about_one_copy(tmp_path):
    """Peak resident memory of a packed load + forward, over the safetensors' size: one copy (a
    plain load followed by packing on the first forward held two). (A CPU load does not fuse
    projections by default; one that does peaks at 1.16 here, with a layer's stacked gate/up.)"""
    import subprocess
    import sys

    from leanlm.config import ModelConfig
    from leanlm.model import Transformer

    config = ModelConfig.from_preset("llama-3.2-1b", num_layers=4, hidden_size=1024, intermediate_size=2816,
                                     num_heads=8, num_kv_heads=4, head_dim=128, vocab_size=32000)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").bfloat16()
    model.tie_weights()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    path = save_model(model, tmp_path / "m")
    size = (path / "model.safetensors").stat().st_size
    peak = {p: int(subprocess.run([sys.executable, "-c", PEAK, str(path), p], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]) / size for p in ("1", "0")}
    assert peak["1"] <= 1.15, peak
    assert peak["0"] > 1.5, peak  # the lazily packed copy beside the plain one: what this avoids


def test_quantizing_and_merging_a_packed_model_read_its_weights_plain(make_hf_checkpoint):
    """What reads the weights themselves gets the plain layout: quantize_ unpacks the model, a
    DoRA merge the layers it merges into (equal to merging into a plain load)."""
    from leanlm.peft import LoRAConfig, apply_peft_, merge_
    from leanlm.quant import RTNConfig, quantize_

    path = make_hf_checkpoint("llama")
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    plain, packed = load_model(path, dtype="float32"), load_model(path, dtype="float32", pack=True)
    with torch.inference_mode():
        want = quantize_(plain, RTNConfig(4, 32))(tokens)
        torch.testing.assert_close(quantize_(packed, RTNConfig(4, 32))(tokens), want, rtol=1e-5, atol=1e-6)
    plain, packed = load_model(path, dtype="float32"), load_model(path, dtype="float32", pack=True)
    for m in (plain, packed):
        torch.manual_seed(0)
        apply_peft_(m, LoRAConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero update
        merge_(m)
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
