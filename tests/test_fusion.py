"""Fused q/k/v and gate/up projections: the same logits, the same state dict, the same files."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from conftest import random_model
from leanlm import kernels
from leanlm.checkpoint import load_model, save_model
from leanlm.kernels.cpu_linear import Linear
from leanlm.model import Transformer

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11], [4, 4, 8, 15, 16, 23, 42]])


def snapshot(model: Transformer) -> dict[str, tuple[torch.Tensor, bool]]:
    return {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}


def same_state(model: Transformer, want: dict[str, tuple[torch.Tensor, bool]]) -> bool:
    got = model.state_dict(keep_vars=True)
    return list(got) == list(want) and all(
        torch.equal(got[k].detach(), want[k][0]) and got[k].dtype == want[k][0].dtype for k in got)


@pytest.mark.parametrize("family", ["llama", "llama-linear-rope", "qwen3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logits_equal_unfused_and_unfuse_restores_parameters(family: str, dtype: torch.dtype) -> None:
    """llama: GQA; llama-linear-rope: q/k/v and MLP biases; qwen3: q/k norms; gpt2: no gate.
    Equal bit for bit, fp32 and bf16, with and without autograd: each output column of the
    stacked product is the dot product of the same row and the same input, in the same order,
    and the split outputs are views of it (nothing is rounded differently)."""
    model = random_model(family).to(dtype)
    want = snapshot(model)
    with torch.inference_mode():
        ref = model(TOKENS)
    ref_grad_mode = model(TOKENS).detach()
    layers = model.config.num_layers
    assert model.fuse_projections_() == layers * (1 if family == "gpt2" else 2)
    attn = model.layers[0].self_attn
    assert "qkv" in attn._modules and "q_proj" not in attn._modules
    assert next(iter(attn._modules)) == "qkv"  # in q_proj's place
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), ref)
    assert torch.equal(model(TOKENS).detach(), ref_grad_mode)
    assert same_state(model, want)  # the state dict keeps the Hugging Face names and order
    assert model.fuse_projections_() == 0  # idempotent
    assert model.unfuse_projections_() == layers * (1 if family == "gpt2" else 2)
    assert same_state(model, want)
    assert type(model.layers[0].self_attn.q_proj) is Linear
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), ref)


def test_saving_a_fused_model_writes_the_same_file(tmp_path) -> None:
    model = random_model("llama-linear-rope")
    plain = save_model(model, tmp_path / "plain")
    model.fuse_projections_()
    fused = save_model(model, tmp_path / "fused")
    assert (fused / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert "qkv" in model.layers[0].self_attn._modules  # saving left it fused


def test_loading_hugging_face_names_into_a_fused_model() -> None:
    source, target = random_model("llama", seed=1), random_model("llama", seed=2)
    target.fuse_projections_()
    target.load_state_dict(source.state_dict())
    with torch.inference_mode():
        assert torch.equal(target(TOKENS), source(TOKENS))
    target.unfuse_projections_()
    assert same_state(target, snapshot(source))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_load_packs_the_fused_weights_only(family: str, make_hf_checkpoint, tmp_path) -> None:
    """A fusing packed load fuses before packing: one packed tensor per group and no plain copy
    beside it; by default a CPU load keeps the projections apart, as ``fusing(False)`` does."""
    path = make_hf_checkpoint(family)
    plain = load_model(path, dtype="bfloat16")
    with kernels.fusing(True):  # (on the CPU only when asked)
        packed = load_model(path, dtype="bfloat16", pack=True)
    layers = packed.config.num_layers
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * layers + 1  # qkv, o_proj, gate_up, down_proj; the head
    assert all(m.is_packed and m._packed is None for m in linears)
    c = packed.config
    assert packed.layers[0].self_attn.qkv.out_features == c.hidden_size + 2 * c.num_kv_heads * c.head_dim
    with torch.inference_mode():
        assert torch.equal(packed(TOKENS), plain(TOKENS))
    assert same_state(packed, snapshot(plain))
    out = save_model(packed, tmp_path / "again")
    assert same_state(load_model(out), snapshot(plain))
    with kernels.fusing(False):
        apart = load_model(path, dtype="bfloat16", pack=True)
    assert "q_proj" in apart.layers[0].self_attn._modules
    assert "q_proj" in load_model(path, dtype="bfloat16", pack=True).layers[0].self_attn._modules
    assert kernels.fuse("cuda") and not kernels.fuse("cpu")
    assert kernels.fuse("cpu", serving=True)  # the serving engine fuses on the CPU too
    with kernels.fusing(False):
        assert not kernels.fuse("cpu", serving=True) and not kernels.fuse("cuda")
    assert load_model(path, dtype="bfloat16", pack=False).layers[0].self_attn.q_proj is not None


def test_copies_and_pickles_of_a_fused_packed_model() -> None:
    model = random_model("llama")
    model.pack_weights_(fuse=True)
    with torch.inference_mode():
        ref = model(TOKENS)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.inference_mode():
            assert torch.equal(other(TOKENS), ref)
        assert list(other.state_dict()) == list(model.state_dict())
        assert other.unfuse_projections_() == 2 * model.config.num_layers


def test_adapters_and_shards_are_not_fused_and_transforms_unfuse() -> None:
    from leanlm.peft import LoRAConfig, apply_peft_

    model = random_model("llama")
    model.fuse_projections_()
    apply_peft_(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]))  # adapters need the parts
    attn = model.layers[0].self_attn
    assert hasattr(attn.q_proj, "adapters") and "qkv" not in attn._modules
    assert model.fuse_projections_() == model.config.num_layers  # gate/up only: q/v have adapters
    assert "qkv" not in attn._modules and "gate_up" in model.layers[0].mlp._modules

    shard = random_model("llama")
    shard.layers[0].mlp.up_proj.tp_shard = True  # what the tensor-parallel plan marks
    assert shard.fuse_projections_() == 2 * shard.config.num_layers - 1
    assert "up_proj" in shard.layers[0].mlp._modules


@pytest.mark.parametrize("compile", [False, True])
def test_the_serving_engine_fuses_its_cpu_model(make_hf_checkpoint, compile: bool) -> None:
    """Fused and packed for eager steps; compiled, fused too (the C++ decode op takes the fused
    q/k/v), and packed where the packing is leanlm's bf16 blocks, which the compiler traces."""
    from leanlm.kernels import cpu_linear
    from leanlm.serve.core_process import CoreSpec, build_engine
    from leanlm.serve.engine import EngineConfig

    path = str(make_hf_checkpoint("llama"))
    engine = build_engine(CoreSpec(model=path, engine=EngineConfig(compile=compile), dtype="bfloat16"))
    attn = engine.model.layers[0].self_attn
    assert "qkv" in attn._modules and "q_proj" not in attn._modules
    assert attn.qkv.is_packed == (not compile or cpu_linear.blocked())

