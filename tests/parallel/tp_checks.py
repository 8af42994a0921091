"""Checks of the tensor-parallel plan, run on every rank under torchrun (gloo, CPU, fp32):
``torchrun --nproc-per-node P tp_checks.py CHECK ...``. Each check builds the same tiny random
model on every rank, computes the reference (unsharded) result in-process, shards the model over
all P ranks and compares; any failure raises, so the launch exits non-zero with the traceback."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh

from leanlm import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's model builders

from conftest import VOCAB, hf_config, random_model
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.model import Transformer
from leanlm.parallel import (
    local_kv_heads,
    shard_adapters_,
    sum_partial_gradients_,
    tensor_parallel_,
    tp_mesh,
)
from leanlm.peft import IA3Config, LoRAConfig, apply_peft_, load_adapter, save_adapter
from leanlm.peft.api import mark_trainable_, routed, set_adapter
from leanlm.quant import FP8Config, GPTQConfig, RTNConfig, quantize_
from leanlm.quant.linear import QuantLinear
from leanlm.quant.llm_int8 import LLMInt8Config
from leanlm.sampling import SamplingParams

MESH = None
TOKENS = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
PROMPTS = [TOKENS[0, :11].tolist(), TOKENS[1, :5].tolist()]  # left padding; past Mistral's window
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
EXACT = {"rtol": 1e-5, "atol": 1e-5}


def rank() -> int:
    return MESH.get_local_rank()


def outputs(model: Transformer) -> tuple[torch.Tensor, list[list[int]]]:
    with torch.inference_mode():
        return model(TOKENS), generate(model, PROMPTS, GREEDY)


def same_after_sharding(model: Transformer, tol: dict[str, float] = EXACT) -> Transformer:
    """Logits and greedy generations of ``model`` before and after sharding it over the mesh."""
    ref_logits, ref_tokens = outputs(model)
    tensor_parallel_(model, MESH)
    logits, tokens = outputs(model)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert tokens == ref_tokens, (tokens, ref_tokens)
    return model


def odd_vocab_model() -> Transformer:
    """Qwen2 (tied head) with 321 tokens: vocabulary pieces of unequal sizes on 2 and 4 ranks."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf({**hf_config("qwen2").to_dict(), "vocab_size": 321}))
    model.init_weights(std=0.05)
    return model


def check_families() -> None:
    """Llama (GQA), Qwen3 (q/k norm), Mistral (sliding window), Qwen2 (qkv bias, tied head),
    a Llama with every bias and as many K/V heads as heads, GPT-2 (learned positions, LayerNorm),
    an odd vocabulary."""
    for family in ("llama", "qwen3", "mistral", "qwen2", "llama-linear-rope", "gpt2", "odd-vocab"):
        model = same_after_sharding(odd_vocab_model() if family == "odd-vocab" else random_model(family))
        tp = MESH.size()
        attn = model.layers[0].self_attn
        assert attn.num_heads == model.config.num_heads // tp, family
        assert attn.num_kv_heads == local_kv_heads(model.config, tp), family
        assert model.make_cache(1, 4).k[0].shape[1] == attn.num_kv_heads
        if torch.backends.mkldnn.is_available():
            assert attn.q_proj._packed[1] is not None  # the local shard ran prepacked (oneDNN)


def check_gqa_replicas() -> None:
    """Fewer K/V heads than ranks: each rank keeps the K/V head its query heads read."""
    model = random_model("llama")
    tp, kv, d = MESH.size(), model.config.num_kv_heads, model.config.head_dim
    assert kv < tp
    head = rank() // (tp // kv)
    want = model.layers[0].self_attn.k_proj.weight[head * d:(head + 1) * d].detach().clone()
    same_after_sharding(model)
    assert model.layers[0].self_attn.num_kv_heads == 1
    assert torch.equal(model.layers[0].self_attn.k_proj.weight.to_local(), want)


def check_quantized() -> None:
    """GPTQ int4 with act-order (row-parallel shards keep every group's scales) and LLM.int8()
    W8A8 (global per-token scales) in fp32 match exactly, FP8 W8A8 to fp32 rounding; RTN int4 on
    the packed CPU kernel matches at its bf16 precision, column-parallel shards still on it."""
    calib = torch.randint(2, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    gptq = random_model("llama")
    quantize_(gptq, GPTQConfig(bits=4, group_size=32, act_order=True, backend="dequant"), calib,
              batch_size=4, progress=False)
    assert not torch.equal(gptq.layers[0].mlp.down_proj.g_idx, torch.arange(128) // 32)
    same_after_sharding(gptq)
    same_after_sharding(quantize_(random_model("llama"), LLMInt8Config(threshold=0.5), progress=False))
    # FP8: the same global per-token scales; the partial fp32 sums add in another order
    same_after_sharding(quantize_(random_model("llama"), FP8Config(), progress=False),
                        {"rtol": 1e-5, "atol": 1e-5})
    rtn = quantize_(random_model("llama"), RTNConfig(bits=4, group_size=32), progress=False)
    with kernels.allow_bf16_kernels(True):  # (an fp32 model's quantized layers compute fp32 otherwise)
        same_after_sharding(rtn, {"rtol": 0.05, "atol": 0.05})
    q = rtn.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.out_features == 64 // MESH.size()
    assert "int4pack" in q._kernels  # the packed CPU kernel ran on the shard


def lora_model(n: int = 2) -> Transformer:
    model = random_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(n):
        apply_peft_(model, LoRAConfig(r=4, targets=targets), f"a{i}")
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".adapters.a{i}." in name:
                    p.add_(torch.randn_like(p) * 0.3)
    set_adapter(model, None)
    return model


ROUTES = ["a0"] * 7 + [None] * 5 + ["a1"] * 12  # two adapters and the base in one batch


def routed_logits(model: Transformer) -> torch.Tensor:
    with torch.inference_mode(), routed(ROUTES):
        return model(TOKENS.reshape(1, -1))


def check_lora() -> None:
    """Two LoRA adapters routed per token in one batch, attached before sharding and loaded
    after it; an adapter attached after sharding and not sharded is refused."""
    model = lora_model()
    ref = routed_logits(model)
    with torch.inference_mode():
        base = model(TOKENS.reshape(1, -1))
    for rows in (slice(0, 7), slice(12, None)):  # each adapter changes its tokens' logits
        assert not torch.allclose(ref[:, rows], base[:, rows], atol=1e-3)
    set_adapter(model, "a1")
    ref_tokens = generate(model, PROMPTS, GREEDY)
    set_adapter(model, None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [save_adapter(model, Path(tmp) / name, name) for name in ("a0", "a1")]
        same_after_sharding(model)  # the base alone
        torch.testing.assert_close(routed_logits(model), ref, **EXACT)
        set_adapter(model, "a1")
        assert generate(model, PROMPTS, GREEDY) == ref_tokens
        lo = model.layers[0].self_attn.o_proj.adapters["a0"].lora_A.weight  # row-parallel: A split
        assert lo.shape[1] == 64 // MESH.size()

        later = random_model("llama")  # adapters loaded after sharding, as a server loads them
        tensor_parallel_(later, MESH)
        for name, path in zip(("a0", "a1"), paths, strict=True):
            load_adapter(later, path, name)
        set_adapter(later, None)
        with expect_error("shard_adapters_"):
            routed_logits(later)
        shard_adapters_(later)
        torch.testing.assert_close(routed_logits(later), ref, **EXACT)

        # QLoRA: the same adapters on an int4 base, loaded before and after sharding it
        def quantized(shard: bool) -> Transformer:
            model = quantize_(random_model("llama"), RTNConfig(bits=4, group_size=32, backend="dequant"),
                              progress=False)
            if shard:
                tensor_parallel_(model, MESH)
            for name, path in zip(("a0", "a1"), paths, strict=True):
                load_adapter(model, path, name)
            set_adapter(model, None)
            return model

        before = quantized(shard=False)
        qref = routed_logits(before)
        tensor_parallel_(before, MESH)
        torch.testing.assert_close(routed_logits(before), qref, **EXACT)
        after = quantized(shard=True)
        shard_adapters_(after)
        torch.testing.assert_close(routed_logits(after), qref, **EXACT)


@contextmanager
def expect_error(text: str) -> Iterator[None]:
    try:
        yield
    except LeanLMError as e:
        assert text in str(e), str(e)
    else:
        raise AssertionError(f"no LeanLMError mentioning {text!r}")


def whole_grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad


def adapter_slice(model: Transformer, name: str, g: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the unsharded gradient ``g`` of parameter ``name`` if it is a cut
    adapter factor, else ``g``."""
    if ".adapters." not in name:
        return g
    shard = model.get_submodule(name.split(".adapters.")[0]).tp_shard
    if shard.split == "rows" and ".lora_B." in name:
        return g[shard.index]
    if shard.split == "columns" and ".lora_A." in name:
        return g[:, shard.index]
    return g


def check_training() -> None:
    """The loss and every gradient match: the base's (whole DTensor gradients), and a LoRA
    adapter's on a frozen base (its replicated factors summed over the ranks). Where ranks share
    K/V heads, gradients through them are refused."""
    tokens, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    for lora in (False, True):
        ref = lora_model(1) if lora else random_model("llama")
        model = lora_model(1) if lora else random_model("llama")
        if lora:
            for m in (ref, model):
                set_adapter(m, "a0")
                mark_trainable_(m)
        ref_loss = ref.loss(tokens, targets)
        ref_loss.backward()
        tensor_parallel_(model, MESH)
        if model.config.num_kv_heads < MESH.size():
            with expect_error("K/V heads shared"):
                model.loss(tokens, targets)
            return
        loss = model.loss(tokens, targets)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), **EXACT)
        refs = dict(ref.named_parameters())
        grads = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert len(grads) == sum(p.requires_grad for p in refs.values()) > 0
        for name, p in grads:
            want = adapter_slice(model, name, refs[name].grad)
            # fp32 noise: these gradients differ from float64's by up to 5e-5 of their largest entry
            err = float((whole_grad(p) - want).abs().max() / want.abs().max())
            assert err < 2e-4, (name, err)


def check_sequence() -> None:
    """Sequence parallelism and the vocabulary-parallel loss: loss, every gradient (norms' and
    row-parallel biases' partial ones summed after backward) and the logits of a no-grad forward
    match the unsharded model's; Qwen3's per-head q/k norms get whole gradients with or without
    sequence parallelism; learned positions are refused."""
    tokens, targets = TOKENS[:, :8], TOKENS[:, 1:9]  # 8 tokens: split by 2 and by 4
    for family, sp in (("llama", True), ("qwen3", False), ("qwen3", True), ("llama-linear-rope", True)):
        ref, model = random_model(family), random_model(family)
        if ref.config.num_kv_heads % MESH.size():
            continue
        ref_loss = ref.loss(tokens, targets)
        ref_loss.backward()
        tensor_parallel_(model, MESH, sequence_parallel=sp, loss_parallel=True)
        assert model.lm_head.cross_entropy is not None
        loss = model.loss(tokens, targets)
        loss.backward()
        assert sum_partial_gradients_(model) > 0
        torch.testing.assert_close(loss, ref_loss.detach(), **EXACT)
        refs = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = refs[name].grad
            err = float((whole_grad(p) - want).abs().max() / want.abs().max())
            assert err < 2e-4, (family, sp, name, err)
        with torch.inference_mode():
            torch.testing.assert_close(model(tokens), ref(tokens), **EXACT)
    with expect_error("rotary positions"):
        tensor_parallel_(random_model("gpt2"), MESH, sequence_parallel=True)


def check_errors() -> None:
    """Bad input is refused in one line before anything is sharded."""
    tp = MESH.size()
    base = random_model("llama").config.to_hf()
    odd = Transformer(ModelConfig.from_hf({**base, "num_attention_heads": 3 * tp + 1 if tp > 1 else 3,
                                           "num_key_value_heads": 1, "head_dim": 16}))
    with expect_error("attention heads"):
        tensor_parallel_(odd, MESH)
    with expect_error("1-D mesh"):
        tensor_parallel_(odd, init_device_mesh("cpu", (1, tp)))
    assert not any(hasattr(p, "full_tensor") for p in odd.parameters())
    dora = random_model("llama")
    apply_peft_(dora, LoRAConfig(r=2, use_dora=True))
    with expect_error("DoRA"):
        tensor_parallel_(dora, MESH)
    ia3 = random_model("llama")
    apply_peft_(ia3, IA3Config())
    with expect_error("IA3 adapters cannot be sharded"):
        tensor_parallel_(ia3, MESH)
    assert not any(hasattr(p, "full_tensor") for p in ia3.parameters())


CHECKS: dict[str, Callable[[], None]] = {
    "families": check_families, "gqa_replicas": check_gqa_replicas, "quantized": check_quantized,
    "lora": check_lora, "training": check_training, "errors": check_errors, "sequence": check_sequence,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    MESH = tp_mesh()
    assert MESH.size() == int(os.environ["WORLD_SIZE"])
    for check in sys.argv[1:]:
        CHECKS[check]()
        print(f"rank {rank()}: {check} ok", flush=True)
    torch.distributed.destroy_process_group()
