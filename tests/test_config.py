"""ModelConfig <-> Hugging Face config.json for every family; unsupported options fail clearly."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, hf_config
from leanlm import LeanLMError, ModelConfig


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_round_trip(family):
    hf = hf_config(family).to_dict()
    ours = ModelConfig.from_hf(hf)
    again = ModelConfig.from_hf(ours.to_hf())
    assert again == ours


def test_family_switches():
    llama = ModelConfig.from_hf(hf_config("llama3-rope").to_dict())
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.tie_word_embeddings
    assert llama.num_kv_heads == 2 and llama.head_dim == 16
    mistral = ModelConfig.from_hf(hf_config("mistral").to_dict())
    assert mistral.sliding_window == 8 and set(mistral.layer_types) == {"sliding_attention"}
    qwen2 = ModelConfig.from_hf(hf_config("qwen2-sliding").to_dict())
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert qwen2.layer_types == ["full_attention", "sliding_attention"]
    assert ModelConfig.from_hf(hf_config("qwen3").to_dict()).qk_norm
    gpt2 = ModelConfig.from_hf(hf_config("gpt2").to_dict())
    assert (gpt2.positional, gpt2.norm_type, gpt2.gated_mlp, gpt2.activation) == (
        "learned", "layernorm", False, "gelu_tanh")


def test_transformers4_rope_layout():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
          "rope_scaling": {"type": "linear", "factor": 4.0}}
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "unknown model_type 'bert'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"hidden_act": "relu2"}, "unsupported hidden_act 'relu2'"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"vocab_size": None}, "missing 'vocab_size'"),
])
def test_unsupported_options_are_named(change, message):
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 4, **change}
    with pytest.raises(LeanLMError, match=message):
        ModelConfig.from_hf(hf)


def test_unsupported_gpt2_option():
    hf = hf_config("gpt2").to_dict()
    hf["scale_attn_by_inverse_layer_idx"] = True
    with pytest.raises(LeanLMError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf(hf)


def test_unknown_preset():
    with pytest.raises(LeanLMError, match="unknown preset 'llama-9'"):
        ModelConfig.from_preset("llama-9")
