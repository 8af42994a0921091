"""ModelConfig: one torch-free description of every decoder-only family leanlm runs.

The Transformer in ``model.py`` is a single module whose behaviour is fixed by this dataclass:
the families differ only in a handful of switches (norm type, gated MLP or not, rotary or
learned positions, biases, q/k norm, sliding window). ``ModelConfig.from_hf`` reads a Hugging
Face ``config.json`` dict for Llama 1/2/3 (``rope_scaling`` of type ``linear`` and ``llama3``),
Mistral (sliding window), Qwen2 (qkv bias, per-layer sliding window), Qwen3 (q/k RMSNorm) and
GPT-2 (learned positions, LayerNorm, GELU-tanh, Conv1D layout handled by ``checkpoint.py``);
``to_hf`` writes one back that ``transformers`` (4.x and 5.x) loads. Anything the model cannot
honour exactly (an unknown ``model_type``, a rope type we do not implement, cross-attention …)
raises :class:`~leanlm.errors.LeanLMError` naming the field.

``PRESETS`` gives real shapes (``llama-3.2-1b``, ``qwen2.5-0.5b`` …) for random-weight benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from leanlm.errors import LeanLMError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelConfig:
    """Shape and switches of one decoder-only transformer (derived fields in __post_init__)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    gated_mlp: bool = True  # SwiGLU (gate, up, down) vs plain (up, down)
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    positional: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in
    hf_extra: dict[str, Any] = field(default_factory=dict)  # HF keys carried through untouched

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise LeanLMError(f"unknown model_type {self.model_type!r}: expected one of {FAMILIES}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise LeanLMError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise LeanLMError(f"layer_types has {len(self.layer_types)} entries, expected "
                              f"num_hidden_layers={self.num_layers}")
        for t in self.layer_types:
            if t not in ("full_attention", "sliding_attention"):
                raise LeanLMError(f"unsupported layer type {t!r} in layer_types")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise LeanLMError("layer_types asks for sliding_attention but sliding_window is not set")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", "default")
            if rtype not in ROPE_TYPES:
                raise LeanLMError(f"unsupported rope_scaling type {rtype!r}: expected one of {ROPE_TYPES}")
            if rtype == "default":
                self.rope_scaling = None
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise LeanLMError(f"unsupported norm_type {self.norm_type!r}")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise LeanLMError(f"unsupported activation {self.activation!r}")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += h if self.o_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        n_mlp = 3 if self.gated_mlp else 2
        mlp = n_mlp * h * self.intermediate_size
        if self.mlp_bias:
            mlp += (n_mlp - 1) * self.intermediate_size + h
        norm = h * (2 if self.norm_type == "layernorm" else 1)
        per_layer = attn + mlp + 2 * norm
        total = self.num_layers * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * h
            if not self.tie_word_embeddings:
                total += self.vocab_size * h
            if self.positional == "learned":
                total += self.max_position_embeddings * h
        return total

    # ---- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; unsupported options raise LeanLMError."""
        mt = hf.get("model_type")
        if mt is None:
            raise LeanLMError("config.json has no 'model_type'")
        if mt not in FAMILIES:
            raise LeanLMError(f"unknown model_type {mt!r} in config.json: leanlm supports {FAMILIES}")
        return _from_gpt2(hf) if mt == "gpt2" else _from_llama_like(hf)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict in the layout ``transformers`` writes for this family."""
        out = _to_gpt2(self) if self.model_type == "gpt2" else _to_llama_like(self)
        out.update({k: v for k, v in self.hf_extra.items() if k not in out})
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
            out["dtype"] = self.torch_dtype
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise LeanLMError(f"{path}: no such file (expected a Hugging Face config.json)")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LeanLMError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf(hf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise LeanLMError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        if "num_layers" in overrides:
            overrides.setdefault("layer_types", None)  # re-derived for the new depth
        return replace(PRESETS[name], **overrides)


# Keys of config.json that we translate explicitly; everything else round-trips via hf_extra
# (minus training-only or transformers-internal keys that would be stale after our edits).
_DROP = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
         "rope_parameters", "rope_scaling", "rope_theta", "use_cache", "id2label", "label2id"}


def _shared_fields(hf: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """Special token ids, saved dtype and the untranslated keys: the same for every family."""
    return {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
            "pad_token_id": hf.get("pad_token_id"),
            "torch_dtype": hf.get("dtype") or hf.get("torch_dtype"),
            "hf_extra": {k: v for k, v in hf.items() if k not in known and k not in _DROP}}


def _require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise LeanLMError(f"config.json (model_type {hf.get('model_type')!r}) is missing {key!r}")
    return hf[key]


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes "rope_parameters"; 4.x wrote "rope_theta" + "rope_scaling".
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    merged.pop("rope_theta", None)
    rtype = merged.pop("rope_type", merged.pop("type", "default"))
    if rtype == "default":
        return theta, None
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise LeanLMError("unsupported rope option partial_rotary_factor != 1.0")
    if rtype == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if k not in merged:
                raise LeanLMError(f"rope_scaling of type 'llama3' is missing {k!r}")
    if rtype == "linear" and "factor" not in merged:
        raise LeanLMError("rope_scaling of type 'linear' is missing 'factor'")
    if rtype not in ROPE_TYPES:
        raise LeanLMError(f"unsupported rope_scaling type {rtype!r}: leanlm implements {ROPE_TYPES}")
    return theta, {"rope_type": rtype, **merged}


def _from_llama_like(hf: dict[str, Any]) -> ModelConfig:
    mt = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise LeanLMError(f"unsupported hidden_act {act!r}: expected one of {sorted(ACTIVATIONS)}")
    theta, scaling = _rope_from_hf(hf)
    n_layers = int(_require(hf, "num_hidden_layers"))
    sliding, layer_types = None, hf.get("layer_types")
    if mt == "mistral":
        sliding = hf.get("sliding_window")
        layer_types = None
    elif mt in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window"):
            sliding = hf.get("sliding_window")
            if layer_types is None:
                mwl = hf.get("max_window_layers", n_layers)
                layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        elif layer_types is not None and "sliding_attention" in layer_types:
            layer_types = None  # transformers ignores layer_types when use_sliding_window is off
    elif layer_types is not None:
        raise LeanLMError(f"unsupported option layer_types for model_type {mt!r}")
    # Llama/Qwen3: attention_bias covers q,k,v,o; Qwen2: q,k,v always biased, o never; Mistral: none.
    attention_bias = bool(hf.get("attention_bias", False)) and mt in ("llama", "qwen3")
    known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias", "sliding_window",
             "use_sliding_window", "max_window_layers", "layer_types", "tie_word_embeddings",
             "bos_token_id", "eos_token_id", "pad_token_id", "model_type"}
    return ModelConfig(
        model_type=mt,
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=int(_require(hf, "hidden_size")),
        intermediate_size=int(_require(hf, "intermediate_size")),
        num_layers=n_layers,
        num_heads=int(_require(hf, "num_attention_heads")),
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=ACTIVATIONS[act],
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=attention_bias or mt == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=sliding,
        layer_types=layer_types,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_shared_fields(hf, known),
    )


def _to_llama_like(c: ModelConfig) -> dict[str, Any]:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c.model_type]
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.activation]
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
        "hidden_act": act, "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
    }
    # Write both layouts: rope_scaling for transformers 4.x, rope_parameters for 5.x.
    out["rope_scaling"] = dict(c.rope_scaling) if c.rope_scaling else None
    out["rope_parameters"] = {"rope_theta": c.rope_theta, **(c.rope_scaling or {"rope_type": "default"})}
    if c.model_type in ("llama", "qwen3"):
        out["attention_bias"] = c.qkv_bias
    if c.model_type == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    elif c.model_type in ("qwen2", "qwen3"):
        sliding = "sliding_attention" in (c.layer_types or [])
        out["use_sliding_window"] = sliding
        out["sliding_window"] = c.sliding_window
        out["layer_types"] = c.layer_types
        if sliding:
            first = c.layer_types.index("sliding_attention")
            out["max_window_layers"] = first
    return out


def _from_gpt2(hf: dict[str, Any]) -> ModelConfig:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(key):
            raise LeanLMError(f"unsupported GPT-2 option {key}=true")
    if hf.get("scale_attn_weights") is False:
        raise LeanLMError("unsupported GPT-2 option scale_attn_weights=false")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise LeanLMError(f"unsupported activation_function {act!r}")
    n_embd = int(_require(hf, "n_embd"))
    known = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx",
             "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "bos_token_id",
             "eos_token_id", "pad_token_id", "model_type", "scale_attn_weights",
             "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"}
    return ModelConfig(
        model_type="gpt2",
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=n_embd,
        intermediate_size=int(hf.get("n_inner") or 4 * n_embd),
        num_layers=int(_require(hf, "n_layer")),
        num_heads=int(_require(hf, "n_head")),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_type="layernorm",
        gated_mlp=False,
        activation=ACTIVATIONS[act],
        positional="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **_shared_fields(hf, known),
    )


def _to_gpt2(c: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}[c.activation]
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
        "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps, "activation_function": act,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "scale_attn_weights": True,
    }


def _llama32(**kw: Any) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072,
                norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=128001)
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": _llama32(hidden_size=2048, intermediate_size=8192, num_layers=16,
                             num_heads=32, num_kv_heads=8, head_dim=64),
    "llama-3.2-3b": _llama32(hidden_size=3072, intermediate_size=8192, num_layers=28,
                             num_heads=24, num_kv_heads=8, head_dim=128),
    "llama-2-7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096,
                              intermediate_size=11008, num_layers=32, num_heads=32,
                              max_position_embeddings=4096, norm_eps=1e-5, bos_token_id=1,
                              eos_token_id=2),
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                              max_position_embeddings=32768, norm_eps=1e-5, sliding_window=4096,
                              bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896,
                                intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                                max_position_embeddings=32768, rope_theta=1000000.0, qkv_bias=True,
                                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    "qwen3-0.6b": ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                              intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                              head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                              qk_norm=True, tie_word_embeddings=True, bos_token_id=151643,
                              eos_token_id=151645),
    "gpt2": ModelConfig(model_type="gpt2", vocab_size=50257, hidden_size=768, intermediate_size=3072,
                        num_layers=12, num_heads=12, max_position_embeddings=1024, norm_eps=1e-5,
                        norm_type="layernorm", gated_mlp=False, activation="gelu_tanh",
                        positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
                        tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
}
