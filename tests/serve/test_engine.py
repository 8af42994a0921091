"""The engine end to end: greedy outputs equal the reference generator token for token."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model
from leanlm.generate import generate
from leanlm.kernels import cpu_ops
from leanlm.kernels.cpu_linear import Linear
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import LLM, EngineConfig
from leanlm.serve.scheduler import SchedulerConfig


def prompts(n: int = 32, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, 300) for _ in range(9)]
    out = []
    for i in range(n):
        body = [rng.randrange(2, 300) for _ in range(rng.randrange(1, 14))]
        out.append(shared + body if i % 2 else body)  # half share a 9-token prefix
    return out


@pytest.mark.parametrize(("family", "config"), [
    ("llama", EngineConfig(block_size=4, num_blocks=256)),
    ("llama", EngineConfig(block_size=4, num_blocks=256, enable_prefix_caching=False)),
    ("llama", EngineConfig(block_size=4, num_blocks=14)),  # forces preemption
    ("llama", EngineConfig(block_size=4, num_blocks=256, scheduler=SchedulerConfig(
        max_num_batched_tokens=16, long_prefill_token_threshold=5))),  # chunked prefill
    ("qwen3", EngineConfig(block_size=8, num_blocks=64)),
    ("mistral", EngineConfig(block_size=4, num_blocks=256)),  # sliding window 8
    ("gpt2", EngineConfig(block_size=4, num_blocks=256)),
])
def test_greedy_outputs_match_the_reference_generator(family: str, config: EngineConfig) -> None:
    model = random_model(family)
    ps = prompts()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [generate(model, [p],
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0] for p in ps]
    llm = LLM(model, config)
    got = llm.generate(ps, params)
    assert got == want
    kv = llm.engine.kv
    assert kv.pool.num_free_blocks == len(kv.pool.blocks)  # everything freed at the end
    if config.enable_prefix_caching and family == "llama" and config.num_blocks == 256:
        assert kv.stats.hits > 0


def test_preemption_happens_under_a_small_budget() -> None:
    model = random_model("llama")
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=14))
    reqs = [llm.engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            for p in prompts(12)]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert sum(r.num_preemptions for r in reqs) > 0


def test_sampling_is_seeded() -> None:
    model = random_model("llama")
    p = SamplingParams(max_tokens=6, temperature=1.0, top_k=20, seed=3, ignore_eos=True)
    a = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(prompts(4), p)
    b = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(prompts(4), p)
    assert a == b and all(len(x) == 6 for x in a)
    assert torch.tensor([t for x in a for t in x]).unique().numel() > 3


def test_serves_a_quantized_model() -> None:
    from leanlm.quant import GPTQConfig, QuantLinear, quantize_

    # fp32 activations: in bf16 the batched engine and the one-request generator round differently
    # and a near-tie can flip a greedy token (the packed int4 kernels run in bf16 either way)
    model = random_model("llama")
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib, progress=False)
    assert isinstance(model.layers[0].mlp.up_proj, QuantLinear)
    ps = prompts(8)
    want = [generate(model, [p],
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0] for p in ps]
    got = LLM(model, EngineConfig(block_size=4, num_blocks=128)).generate(
        ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert got == want


def test_penalties_and_logit_bias() -> None:
    from leanlm.sampling import Row, apply_penalties

    params = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias={1: 2.0})
    out = apply_penalties(torch.zeros(1, 6), [Row(params, [5, 3, 3, 4], 1, None)])  # prompt [5]
    assert out[0].tolist() == [0.0, 2.0, 0.0, -2.5, -1.5, 0.0]
    model = random_model("llama")
    got = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(
        prompts(3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={5: 100.0}))
    assert got == [[5] * 4] * 3


def test_tiny_temperatures_sample_greedily_and_bad_floats_are_refused() -> None:
    from leanlm.errors import LeanLMError

    model = random_model("llama")
    ps = prompts(3)
    greedy = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(
        ps, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    tiny = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(
        ps, SamplingParams(max_tokens=4, temperature=1e-300, ignore_eos=True))
    assert tiny == greedy  # found by the fuzzer: 1/temperature overflowed into NaN probabilities
    for bad in ({"temperature": float("inf")}, {"top_p": float("nan")}, {"logit_bias": {1: 1e9}}):
        with pytest.raises(LeanLMError):
            SamplingParams(**bad)


@pytest.mark.parametrize(("chunked", "cached"), [(False, False), (True, False), (False, True)])
def test_prompt_logprobs_equal_a_teacher_forced_forward(chunked: bool, cached: bool) -> None:
    """Every prompt position scored, also when the prompt's blocks are already in the prefix
    cache (such a request does not take the hit: its positions need logits)."""
    model = random_model("llama")
    sched = SchedulerConfig(max_num_batched_tokens=8, long_prefill_token_threshold=3) if chunked else None
    engine = LLM(model, EngineConfig(block_size=4, num_blocks=64, scheduler=sched)).engine
    prompt = prompts(3)[1]
    if cached:
        engine.add_request(prompt, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.kv.pool.cached  # the prompt's full blocks are there to hit
    req = engine.add_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2, ignore_eos=True))
    engine.add_request(prompts(3)[2], SamplingParams(max_tokens=2))  # a neighbour in the batch
    while engine.has_unfinished_requests():
        engine.step()
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        lp, top = req.prompt_logprobs[p]
        assert lp == pytest.approx(float(want[p - 1, prompt[p]]), abs=1e-4)
        assert [t for t, _ in top] == want[p - 1].topk(2).indices.tolist()


@pytest.mark.parametrize(("kv", "dtype", "ratio"), [("int8", torch.int8, 1.9),
                                                  ("fp8", torch.float8_e4m3fn, 2.0)])
def test_8bit_kv_cache_doubles_capacity_and_stays_close(kv: str, dtype: torch.dtype, ratio: float) -> None:
    from leanlm import DEFAULT_MODEL, ModelConfig
    from leanlm.serve.paged import kv_bytes_per_block

    c = ModelConfig.from_json_file(DEFAULT_MODEL / "config.json")
    # tokens per byte: 128 bytes per head in bf16, 64 + 2 (a scale) in int8, 64 in fp8
    assert kv_bytes_per_block(c, 16, torch.bfloat16) / kv_bytes_per_block(c, 16, dtype) >= ratio
    model = random_model("llama")
    prompt = prompts(3)[1] * 3
    lps = {}
    for name in ("auto", kv):
        engine = LLM(model, EngineConfig(block_size=4, num_blocks=64, kv_cache_dtype=name,
                                         scheduler=SchedulerConfig(max_num_batched_tokens=8,
                                                                   long_prefill_token_threshold=5))).engine
        if name == kv:
            assert engine.runner.cache.k[0].dtype == dtype
        req = engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
        while engine.has_unfinished_requests():
            engine.step()
        lps[name] = torch.tensor([lp for lp, _ in req.prompt_logprobs[1:]])
    assert (lps[kv] - lps["auto"]).abs().max() < 0.05
    assert not torch.equal(lps[kv], lps["auto"])  # the 8-bit path really ran


def test_kv_cache_dtype_is_checked() -> None:
    from leanlm.errors import LeanLMError

    with pytest.raises(LeanLMError, match="kv_cache_dtype 'fp4': expected auto, int8, fp8"):
        LLM(random_model("llama"), EngineConfig(num_blocks=8, kv_cache_dtype="fp4"))


def steps_to_first_token(policy: str, flood: bool) -> int:
    """Engine steps until a light client's request (sent after 3 steps) has its first token."""
    model = random_model("llama")
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=512, scheduler=SchedulerConfig(
        max_num_batched_tokens=48, policy=policy)))
    engine = llm.engine
    rng = random.Random(0)
    if flood:
        for _ in range(30):
            engine.add_request([rng.randrange(2, 300) for _ in range(40)],
                               SamplingParams(max_tokens=20, ignore_eos=True), client="flood")
    for _ in range(3):
        engine.step()
    light = engine.add_request([5, 6, 7, 8, 9, 10, 11, 12], SamplingParams(max_tokens=2, ignore_eos=True),
                               client="light")
    steps = 0
    while not light.output_token_ids:
        engine.step()
        steps += 1
    return steps


def test_vtc_keeps_a_light_client_responsive_under_a_flood() -> None:
    unloaded = steps_to_first_token("vtc", flood=False)
    assert unloaded == 1
    assert steps_to_first_token("vtc", flood=True) <= 2 * unloaded
    assert steps_to_first_token("fcfs", flood=True) > 2 * unloaded  # queued behind the flood


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window
def test_compiled_decode_matches_eager(family: str) -> None:
    """Decode-only steps through torch.compile (batch and length padded to buckets, padding rows
    writing to the scratch block) give the eager engine's tokens; int8 and fp8 K/V too."""
    model = random_model(family)
    ps = prompts(5, seed=4)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    for kv in ("auto", "int8", "fp8"):
        eager = LLM(model, EngineConfig(block_size=4, num_blocks=128, kv_cache_dtype=kv)).generate(ps, params)
        llm = LLM(model, EngineConfig(block_size=4, num_blocks=128, kv_cache_dtype=kv, compile=True))
        assert llm.generate(ps, params) == eager
        assert llm.engine.runner.compiled.fn is not None  # it compiled, it did not fall back


def test_compiled_decode_serves_every_batch_from_few_graphs() -> None:
    """Symbolic shapes: the warm-up compiles a few graphs (dynamo specialises sizes of 1), and
    then 16 (rows, table width) shapes compile nothing more; each step's logits are the eager
    forward's."""
    from torch._dynamo.utils import counters

    from leanlm.serve.compiled import CompiledDecode
    from leanlm.serve.paged import PagedKVCache

    model, bs = random_model(), 4
    c = model.config
    cache = PagedKVCache.allocate(c.num_layers, 64 + 1, bs, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    decode = CompiledDecode(model, cache)
    eager = CompiledDecode(model, cache)
    eager.fn = eager._forward
    before = counters["stats"]["unique_graphs"]
    decode.warm_up()
    warmed = counters["stats"]["unique_graphs"] - before
    with torch.inference_mode():
        for rows in (1, 2, 3, 4):
            for blocks in (1, 2, 3, 4):
                n = blocks * bs
                step = ([5 + rows] * rows, [n - 1] * rows, [r * 16 * bs + n - 1 for r in range(rows)],
                        [list(range(r * 16, r * 16 + blocks)) for r in range(rows)])
                out = decode(*step)
                assert out is not None and out.shape == (rows, c.vocab_size)
                torch.testing.assert_close(out, eager(*step), rtol=1e-5, atol=1e-5)
    assert decode.fn is not None and 1 <= warmed <= 4
    assert counters["stats"]["unique_graphs"] - before == warmed


@pytest.mark.skipif(cpu_ops.ops() is None, reason="the C++ ops cannot be built here")
@pytest.mark.parametrize("weights", ["bf16", "int4, int8 activations"])
def test_compiled_cpu_decode_calls_the_cpp_ops(weights: str) -> None:
    """A bf16 model packed for the CPU: the compiled step calls leanlm's C++ attention, RMSNorm
    and (where the CPU has no bf16 instructions) bf16 GEMM from its graph, gives the eager
    engine's tokens, and leaves the weights packed; quantized to 4 bits with int8 activations,
    the VNNI GEMM (where the CPU has VNNI)."""
    from leanlm import kernels
    from leanlm.kernels import cpu_vnni
    from leanlm.quant import RTNConfig, quantize_

    model = random_model().to(torch.bfloat16)
    ops = {"leanlm_cpu.rotary_decode_qkv", "leanlm_cpu.rms_norm"}
    if weights == "bf16":
        ops |= set() if cpu_ops.native_bf16() else {"leanlm_cpu.bf16_mm"}
    else:
        quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
        ops |= {"leanlm_cpu.vnni_mm"} if cpu_vnni.available() else set()
    model.pack_weights_(fuse=True)
    with kernels.quantizing_activations(weights != "bf16"):
        compiled_matches_eager(model, ops)


def compiled_matches_eager(model: torch.nn.Module, ops: set[str]) -> None:
    """The engine's tokens with and without ``compile``, ``ops`` among the compiled graph's, and
    nothing compiled after the warm-up (a server's)."""
    from torch._inductor.compile_fx import compile_fx

    from leanlm.serve.compiled import INDUCTOR_OPTIONS

    ps = prompts(6, seed=7)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=128, compile=True))  # first: as a server
    compiled, called, graphs = llm.engine.runner.compiled, set(), []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # then inductor, as the engine
        graphs.append(gm)
        called.update(str(n.target).removesuffix(".default") for n in gm.graph.nodes
                      if n.op == "call_function")
        return compile_fx(gm, example_inputs, config_patches=INDUCTOR_OPTIONS)

    compiled.fn = torch.compile(compiled._forward, dynamic=True, backend=recording)
    compiled.warm_up()
    warmed = len(graphs)
    got = llm.generate(ps, params)
    assert got == LLM(model, EngineConfig(block_size=4, num_blocks=128)).generate(ps, params)
    assert len(graphs) == warmed  # no graph break, no recompile: the warm-up compiled them all
    assert ops <= called, called
    assert all(m.is_packed for m in model.modules() if isinstance(m, Linear))


def test_compiled_decode_falls_back_to_eager() -> None:
    model = random_model("llama")
    ps = prompts(3, seed=5)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = LLM(model, EngineConfig(block_size=4, num_blocks=64)).generate(ps, params)
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=64, compile=True))

    def broken(*args: object) -> None:
        raise RuntimeError("no C++ compiler")

    llm.engine.runner.compiled.fn = broken
    with pytest.warns(UserWarning, match="compiled decode unavailable.*no C\\+\\+ compiler"):
        assert llm.generate(ps, params) == want
    assert llm.engine.runner.compiled.fn is None


def test_seeds_outside_torchs_range_and_empty_stop_strings_are_refused() -> None:
    """Checked when the request is made, not when its step runs in the engine thread (where a
    seed torch cannot take used to fail the whole step)."""
    from leanlm.errors import LeanLMError

    for seed in (-2**63, -1, 0, 2**64 - 1):
        SamplingParams(seed=seed)
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(LeanLMError, match="seed"):
            SamplingParams(seed=seed)
    with pytest.raises(LeanLMError, match="stop strings"):
        SamplingParams(stop=["ok", ""])
    out = LLM(random_model("llama"), EngineConfig(block_size=4, num_blocks=64)).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=3, seed=2**64 - 1, temperature=1.0))
    assert len(out[0]) == 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_projections_give_the_same_greedy_outputs(family: str) -> None:
    """The engine on a model with q/k/v and gate/up fused and packed (as ``serve`` loads it)
    decodes what the unfused reference generator does."""
    model = random_model(family).bfloat16()
    ps = prompts(12)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [generate(model, [p], params)[0] for p in ps]
    model.pack_weights_(fuse=True)
    assert "qkv" in model.layers[0].self_attn._modules
    assert LLM(model, EngineConfig(block_size=4, num_blocks=256)).generate(ps, params) == want


def test_a_wholly_cached_prompt_computes_one_token_unstored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose blocks are all cached is admitted with every block shared: its first step
    computes only the last token (for the logits), reads that token's K/V from the cache (slot
    -1: not stored again into the shared block), and the outputs are the reference's."""
    from leanlm.serve.batch import PagedBatch

    model = random_model("llama")
    rng = random.Random(5)
    ps = [[rng.randrange(2, 300) for _ in range(8)] for _ in range(3)]  # two whole blocks each
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [generate(model, [p], params)[0] for p in ps]
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=64))
    assert llm.generate(ps, params) == want
    steps: list[list[int]] = []
    logits = PagedBatch.logits
    monkeypatch.setattr(PagedBatch, "logits", lambda self, *a, **k: steps.append(list(self.slots)) or
                        logits(self, *a, **k))
    assert llm.generate(ps, params) == want
    assert steps[0] == [-1, -1, -1]  # one token per prompt, none stored
    assert all(s >= 0 for step in steps[1:] for s in step)
