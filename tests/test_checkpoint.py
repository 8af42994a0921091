"""Loading and saving Hugging Face checkpoints: round trip, shards, dtypes, pickle refusal, bad input."""

from __future__ import annotations

import json

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
