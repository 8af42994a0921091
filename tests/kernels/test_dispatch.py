"""Kernel dispatch: the kernel modes (LEANLM_KERNELS, kernel_mode), and the model, the serving
engine and QuantLinear giving the same results with the kernels on (Triton's interpreter on CPU;
the real kernels on CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model
from leanlm import kernels
from leanlm.errors import LeanLMError
from leanlm.quant import RTNConfig, quantize_
from leanlm.quant.linear import quantized_linears
from leanlm.serve.engine import LLM, EngineConfig
from leanlm.serve.request import SamplingParams
from leanlm.serve.scheduler import SchedulerConfig

CUDA = torch.cuda.is_available()
# where the kernels run: CPU through the interpreter (mode "triton"), CUDA by default ("auto")
TARGETS = [pytest.param("cpu", "triton", id="cpu-interpreter"),
           pytest.param("cuda", "auto", id="cuda", marks=[
               pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


def test_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2)
    with kernels.kernel_mode("auto"):
        assert not kernels.use_triton(x)  # CPU tensors take the reference
    with kernels.kernel_mode("triton"):
        assert kernels.use_triton(x)  # the tests run under TRITON_INTERPRET=1
        w = torch.zeros(2, requires_grad=True)
        assert not kernels.use_triton(x, w)  # no backward in the kernels
        with torch.no_grad():
            assert kernels.use_triton(x, w)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(LeanLMError, match="needs Triton's interpreter"):
            kernels.use_triton(x)
    monkeypatch.setenv("LEANLM_KERNELS", "fast")
    with pytest.raises(LeanLMError, match="LEANLM_KERNELS='fast'"):
        kernels.mode_from_env()
    with pytest.raises(LeanLMError, match="kernel mode 'fast'"):
        kernels.kernel_mode("fast")


def test_the_mode_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment is read at first use; later changes to it do not switch kernels mid-run."""
    with kernels.kernel_mode("reference"):
        monkeypatch.setenv("LEANLM_KERNELS", "triton")
        assert kernels.mode() == "reference"


@pytest.mark.parametrize(("device", "mode"), TARGETS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_forward_unchanged(device: str, mode: str, family: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(family).to(device)
    tokens = torch.randint(2, 300, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        with kernels.kernel_mode("reference"):
            want = model(tokens)
        with kernels.kernel_mode(mode):
            got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, 300) for _ in range(9)]
    return [(shared if i % 2 else []) + [rng.randrange(2, 300) for _ in range(rng.randrange(1, 14))]
            for i in range(n)]


@pytest.mark.parametrize(("device", "mode"), TARGETS)
@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window of 8
def test_engine_greedy_outputs_unchanged(device: str, mode: str, family: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(family).to(device)
    config = EngineConfig(block_size=4, num_blocks=128, scheduler=SchedulerConfig(
        max_num_batched_tokens=24, long_prefill_token_threshold=7))  # chunked, mixed batches
    ps = prompts(8)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)  # past the window
    with kernels.kernel_mode("reference"):
        want = LLM(model, config).generate(ps, params)
    with kernels.kernel_mode(mode):
        got = LLM(model, config).generate(ps, params)
    assert got == want


@pytest.mark.parametrize(("device", "mode"), TARGETS)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linears_use_the_kernel(device: str, mode: str, bits: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model("llama")
    quantize_(model, RTNConfig(bits=bits, group_size=32))
    model.to(device)
    tokens = torch.randint(2, 300, (1, 5), generator=torch.Generator().manual_seed(0)).to(device)
    layers = quantized_linears(model).values()
    with kernels.kernel_mode(mode), torch.no_grad():
        for layer in layers:
            layer.backend = "reference"  # fp32 dequantize + GEMM
        want = model(tokens)
        for layer in layers:
            layer.backend = "auto"
        got = model(tokens)
        layer = next(iter(layers))
        assert layer._choose(torch.zeros(3, layer.in_features, device=device)) == "triton"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("device", "mode"), TARGETS)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_metadata_kernels_match_the_batched_reference(device: str, mode: str, family: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The static-shape decode batch (what a CUDA graph captures) run eagerly with the KV-store and
    split-KV decode kernels gives the logits of its torch reference; padding rows included."""
    from leanlm.serve.paged import DecodeMetadata, PagedKVCache

    model = random_model(family).to(device)
    c, bs, width = model.config, 4, 8
    g = torch.Generator().manual_seed(0)
    lens = [13, 1, 30, 1]  # the last row pads: it writes and reads the scratch slot 0
    tables = torch.stack([torch.randperm(31, generator=g)[:width] + 1 for _ in lens]).to(torch.int32)
    tables[-1] = 0
    slots = torch.tensor([int(t[(n - 1) // bs]) * bs + (n - 1) % bs
                          for t, n in zip(tables, lens, strict=True)])
    tokens = torch.randint(2, 300, (1, len(lens)), generator=g)
    positions = torch.tensor([lens]) - 1

    def logits(kernel_mode: str) -> torch.Tensor:
        cache = PagedKVCache.allocate(c.num_layers, 32, bs, c.num_kv_heads, c.head_dim, torch.float32, device)
        for t in (*cache.k, *cache.v):  # earlier keys, the same in both runs
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        meta = DecodeMetadata(cache, slots.to(device), tables.to(device), torch.tensor(lens, device=device),
                              width * bs, c.sliding_window)
        with kernels.kernel_mode(kernel_mode), torch.no_grad():
            return model(tokens.to(device), positions=positions.to(device), attn=meta)[0]

    torch.testing.assert_close(logits(mode), logits("reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_paged_batches_fuse_rotary_only_where_the_kernels_run(dtype: torch.dtype) -> None:
    """The model hands q/k unrotated to a paged batch (rotary fused into the KV store) only where
    the kernels run on a float cache; on CPU by default, and for FP8, it rotates them as before."""
    from leanlm.attention import SDPAMetadata
    from leanlm.serve.paged import DecodeMetadata, PagedKVCache

    cache = PagedKVCache.allocate(1, 4, 4, 2, 8, dtype)
    one = torch.zeros(1, dtype=torch.long)
    meta = DecodeMetadata(cache, one, one.view(1, 1).int(), one + 1, 4)
    q = torch.zeros(1, 4, 1, 8)
    with kernels.kernel_mode("auto"):
        assert not meta.fuses_rotary(q)
    with kernels.kernel_mode("triton"):
        assert meta.fuses_rotary(q) == (dtype == torch.float32)
        assert not SDPAMetadata.causal(torch.zeros(1, 1, dtype=torch.long)).fuses_rotary(q)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("speculative", [None, "draft"])
def test_cuda_graph_decode_matches_eager(speculative: str | None) -> None:
    """On CUDA, compile=True replays a captured CUDA graph per decode bucket (target, draft, verify
    and catch-up steps): the greedy outputs are the eager engine's, and no bucket fell back."""
    model = random_model("llama").to("cuda")
    ps, params = prompts(8), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = []
    for compile in (False, True):
        config = EngineConfig(block_size=4, num_blocks=256, compile=compile, speculative=speculative,
                              spec_adaptive=False)
        llm = LLM(model, config, draft_model=model if speculative else None)
        outs.append(llm.generate(ps, params))
        if compile:
            assert llm.engine.runner.compiled.fn is not None and llm.engine.runner.compiled.graphs
    assert outs[1] == outs[0]
