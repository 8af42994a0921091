"""Triton kernels on a CUDA GPU against the roofline, their torch references and SDPA / cuBLAS.

One run builds every kernel, checks it against its reference on the benchmark's own inputs, and
times it (median of ``triton.testing.do_bench``). The roofline is measured in the same run:
memory bandwidth as a device-to-device copy (bytes read + written / time) and the bf16 GEMM rate
of an 8192³ ``torch.matmul``. Each kernel reports achieved bandwidth (bytes it must move / time)
and its fraction of the measured copy bandwidth; decode-shaped ops are memory-bound, so that
fraction is the figure of merit. The whole-model line times the serving engine decoding one
request on a ``llama-3.2-1b``-shaped model (random bf16 weights, and RTN int4 g128) against the
bandwidth roofline: tokens/s ≤ bandwidth / bytes of weights read per token.

    python benchmarks/bench_kernels.py                                 # a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke      # CPU: tiny shapes, checks only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import triton

from common import machine, median_time, random_model
from leanlm.kernels import kv_store, paged_attention, quant_gemm, quant_gemv, rmsnorm, rotary
from leanlm.kernels.packing import pack_codes, unpack_codes
from leanlm.quant import RTNConfig, quantize_
from leanlm.quant.primitives import dequantize_weight
from leanlm.serve.compiled import CompiledDecode
from leanlm.serve.engine import LLM, EngineConfig
from leanlm.serve.paged import PagedKVCache
from leanlm.serve.request import SamplingParams

GiB = 2**30
# tile configurations from a ``--tune`` sweep (``--tuned FILE``): "decode" (with "splits"), "gemv"
TUNED: dict[str, dict] = {}


def bench(fn, device: torch.device, rep: int = 200) -> float:
    """Median seconds per call (over ``rep`` ms of calls on CUDA)."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") / 1e3
    return median_time(fn, repeats=3)


def roofline(device: torch.device, smoke: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, bf16 GEMM FLOP/s), measured."""
    n = 2**20 if smoke else GiB // 2
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    bw = 2 * n / bench(lambda: b.copy_(a), device)
    s = 128 if smoke else 8192
    x = torch.randn(s, s, dtype=torch.bfloat16, device=device)
    y = torch.randn(s, s, dtype=torch.bfloat16, device=device)
    return bw, 2 * s**3 / bench(lambda: x @ y, device)


def paged_batch(batch: int, ctx: int, heads: int, kv_heads: int, d: int, block_size: int,
                device: torch.device, dtype: torch.dtype, query_len: int = 1) -> dict:
    """Every request has ``ctx`` keys in shuffled blocks and ``query_len`` new queries."""
    per = -(-ctx // block_size)
    g = torch.Generator().manual_seed(0)
    tables = torch.randperm(batch * per, generator=g).view(batch, per).to(torch.int32)
    kc = torch.randn(batch * per * block_size, kv_heads, d, generator=g).to(device, dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(batch * query_len, heads, d, generator=g).to(device, dtype)
    return dict(q=q, k_cache=kc, v_cache=vc, block_tables=tables.to(device),
                seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
                query_start=torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32,
                                         device=device),
                block_size=block_size, scale=d**-0.5, max_query_len=query_len, max_seq_len=ctx)


def report(rows: list[dict], name: str, shape: str, seconds: float, nbytes: float, bw: float,
           err: float, **peers: float) -> dict:
    row = dict(kernel=name, shape=shape, ms=seconds * 1e3, gbs=nbytes / seconds / 1e9,
               roofline=nbytes / seconds / bw, err=err, **{k: v / seconds for k, v in peers.items()})
    rows.append(row)
    extra = "  ".join(f"{k} {v:.2f}x" for k, v in row.items() if k.startswith("vs_"))
    print(f"{name:<22} {shape:<28} {row['ms']:9.4f} ms  {row['gbs']:8.1f} GB/s  "
          f"{100 * row['roofline']:5.1f}% of copy BW  max err {err:.2e}  {extra}", flush=True)
    return row


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def attention_rows(rows: list[dict], dev: torch.device, bw: float, smoke: bool) -> None:
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, ctx, heads, kv_heads, d = (2, 64, 4, 2, 16) if smoke else (64, 4096, 32, 8, 128)
    b = paged_batch(batch, ctx, heads, kv_heads, d, 16, dev, dtype)
    cfg = dict(TUNED.get("decode", {}))
    splits = cfg.pop("splits", None)
    out = paged_attention.paged_attention(**b, num_splits=splits, config=cfg)
    ref_args = {**b, "seq_lens": b["seq_lens"].tolist(), "query_start": b["query_start"].tolist()}
    ref_args.pop("max_query_len"), ref_args.pop("max_seq_len")
    ref = paged_attention.reference(**ref_args)
    kv_bytes = 2 * batch * ctx * kv_heads * d * dtype.itemsize
    t = bench(lambda: paged_attention.paged_attention(**b, num_splits=splits, config=cfg), dev)
    t1 = bench(lambda: paged_attention.paged_attention(**b, num_splits=1, config=cfg), dev)
    t_ref = bench(lambda: paged_attention.reference(**ref_args), dev)
    qs = b["q"].view(batch, heads, 1, d)
    ks = torch.randn(batch, kv_heads, ctx, d, device=dev, dtype=dtype)
    t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, ks, ks, enable_gqa=True), dev)
    report(rows, "paged decode attn", f"b{batch} ctx{ctx} h{heads}/{kv_heads} d{d}", t, kv_bytes, bw,
           max_err(out, ref), vs_reference=t_ref, vs_sdpa_contiguous=t_sdpa, vs_one_split=t1)
    # prefill: fresh prompts, causal; FLOPs 4·H·D·Σ q·(q+1)/2
    pb, pl = (2, 24) if smoke else (8, 1024)
    p = paged_batch(pb, pl, heads, kv_heads, d, 16, dev, dtype, query_len=pl)
    out = paged_attention.paged_attention(**p)
    pref = {**p, "seq_lens": p["seq_lens"].tolist(), "query_start": p["query_start"].tolist()}
    pref.pop("max_query_len"), pref.pop("max_seq_len")
    err = max_err(out, paged_attention.reference(**pref))
    t = bench(lambda: paged_attention.paged_attention(**p), dev)
    qd = p["q"].view(pb, pl, heads, d).transpose(1, 2)
    kd = torch.randn(pb, kv_heads, pl, d, device=dev, dtype=dtype)
    t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        qd, kd, kd, is_causal=True, enable_gqa=True), dev)
    flops = 4 * heads * d * pb * pl * (pl + 1) / 2
    report(rows, "paged prefill attn", f"b{pb} q{pl} h{heads}/{kv_heads} d{d}", t,
           2 * pb * pl * kv_heads * d * dtype.itemsize + 2 * p["q"].nbytes, bw, err,
           vs_sdpa_contiguous=t_sdpa)
    print(f"{'':<22} prefill: {flops / t / 1e12:.1f} TFLOP/s", flush=True)


def gemm_rows(rows: list[dict], dev: torch.device, bw: float, smoke: bool) -> None:
    """int4 g128: the decode GEMV on its interleaved layout (what QuantLinear runs for M ≤ 4), the
    canonical-layout GEMV and act-order for comparison, and the dot kernel for M = 16, 64 against
    dequantize + cuBLAS (QuantLinear's path there)."""
    k, n, group = (256, 512, 128) if smoke else (4096, 11008, 128)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    qweight = pack_codes(codes, 4).to(dev)
    words = quant_gemv.interleave(qweight, 4, k)
    scales = (torch.rand(n, k // group, generator=g) * 0.01).to(dev, torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8).to(dev)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(dev, torch.int32)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    dtype = torch.float32 if smoke else torch.bfloat16
    nbytes = lambda x: (qweight.nbytes + scales.nbytes + zeros.nbytes + x.nbytes
                        + x.shape[0] * n * x.element_size())
    rel = lambda y, ref: max_err(y, ref) / float(ref.abs().max())
    for m in (1, 16, 64):
        x = torch.randn(m, k, device=dev, dtype=dtype)
        contiguous = torch.arange(k, device=dev) // group
        ref = quant_gemm.reference(x.float(), qweight, scales.float(), zeros, contiguous, 4)
        t_bf16 = bench(lambda x=x: torch.matmul(x.to(w.dtype), w.t()), dev)
        if m == 1:
            cfg = TUNED.get("gemv")
            run = lambda x=x, cfg=cfg: quant_gemv.quant_gemv(x, words, scales, zeros, 4, group, config=cfg)
            report(rows, "int4 gemv g128", f"m{m} k{k} n{n}", bench(run, dev), nbytes(x), bw,
                   rel(run(), ref), vs_bf16_matmul=t_bf16)
            run = lambda x=x: quant_gemm.quant_gemm(x, qweight, scales, zeros, None, 4, group)
            report(rows, "int4 gemv canonical", f"m{m} k{k} n{n}", bench(run, dev), nbytes(x), bw,
                   rel(run(), ref), vs_bf16_matmul=t_bf16)
            ref = quant_gemm.reference(x.float(), qweight, scales.float(), zeros, g_idx, 4)
            run = lambda x=x: quant_gemm.quant_gemm(x, qweight, scales, zeros, g_idx, 4, group)
            report(rows, "int4 gemv act-order", f"m{m} k{k} n{n}", bench(run, dev),
                   nbytes(x) + g_idx.nbytes, bw, rel(run(), ref), vs_bf16_matmul=t_bf16)
            # what QuantLinear runs for act-order: columns sorted by group, the input gathered
            perm = torch.argsort(g_idx.long(), stable=True)
            sorted_words = quant_gemv.interleave(pack_codes(codes[:, perm.cpu()], 4).to(dev), 4, k)
            run = lambda x=x, p=perm, w=sorted_words, c=cfg: quant_gemv.quant_gemv(
                x[:, p].contiguous(), w, scales, zeros, 4, group, config=c)
            report(rows, "int4 gemv act-order sorted", f"m{m} k{k} n{n}", bench(run, dev),
                   nbytes(x) + perm.nbytes, bw, rel(run(), ref), vs_bf16_matmul=t_bf16)
            continue
        run = lambda x=x: quant_gemm.quant_gemm(x, qweight, scales, zeros, None, 4, group)
        dequant = lambda x=x: torch.matmul(x.to(w.dtype), dequantize_weight(
            unpack_codes(qweight, 4, k), scales, zeros, None, torch.bfloat16, group).t())
        report(rows, "int4 gemm g128", f"m{m} k{k} n{n}", bench(run, dev), nbytes(x), bw, rel(run(), ref),
               vs_bf16_matmul=t_bf16, vs_dequant_matmul=bench(dequant, dev))


def elementwise_rows(rows: list[dict], dev: torch.device, bw: float, smoke: bool) -> None:
    dtype = torch.float32 if smoke else torch.bfloat16
    t_, h = (64, 256) if smoke else (4096, 4096)
    x, r = torch.randn(t_, h, device=dev, dtype=dtype), torch.randn(t_, h, device=dev, dtype=dtype)
    w = torch.rand(h, device=dev, dtype=dtype) + 0.5
    y, _ = rmsnorm.rms_norm(x, w, 1e-6, r)
    err = max_err(y, rmsnorm.reference(x, w, 1e-6, r)[0])
    t = bench(lambda: rmsnorm.rms_norm(x, w, 1e-6, r), dev)
    report(rows, "add + rmsnorm", f"{t_}x{h}", t, 4 * x.nbytes, bw, err,
           vs_reference=bench(lambda: rmsnorm.reference(x, w, 1e-6, r), dev))
    heads, d = (4, 16) if smoke else (32, 128)
    q = torch.randn(1, t_, heads, d, device=dev, dtype=dtype).transpose(1, 2)
    ang = torch.arange(t_, device=dev)[:, None] * torch.rand(d // 2, device=dev)
    cos = torch.cat([ang, ang], -1).cos().to(dtype)[None, None]
    sin = torch.cat([ang, ang], -1).sin().to(dtype)[None, None]
    err = max_err(rotary.rotary(q, cos, sin), rotary.reference(q, cos, sin))
    t = bench(lambda: rotary.rotary(q, cos, sin), dev)
    report(rows, "rotary", f"t{t_} h{heads} d{d}", t, 2 * q.nbytes + 2 * cos.nbytes, bw, err,
           vs_reference=bench(lambda: rotary.reference(q, cos, sin), dev))
    kv_heads = 2 if smoke else 8
    k = torch.randn(t_, kv_heads, d, device=dev, dtype=dtype)
    kc = torch.zeros(4 * t_, kv_heads, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(4 * t_, device=dev)[:t_]
    kv_store.kv_store(kc, vc, k, k, slots)
    err = max_err(kc[slots], k)
    t = bench(lambda: kv_store.kv_store(kc, vc, k, k, slots), dev)
    report(rows, "kv store", f"t{t_} kv{kv_heads} d{d}", t, 4 * k.nbytes, bw, err,
           vs_reference=bench(lambda: kv_store.reference(kc, vc, k, k, slots), dev))


def model_rows(dev: torch.device, bw: float, smoke: bool, quick: bool = False) -> dict[str, float]:
    """Batch-1 decode tokens/s against bandwidth / bytes of weights per token, three ways: the
    serving engine eager (a launch per kernel), the engine with ``compile=True`` (a CUDA graph per
    decode step on CUDA) and the same graphs in a bare greedy loop (no scheduler, no sampler);
    ``quick`` skips the eager engine (slow: a launch per kernel)."""
    preset = "llama-3.2-1b"
    small = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=512) if smoke else {}
    new = 8 if smoke else 256
    fractions: dict[str, float] = {}
    for quant in (None, RTNConfig(bits=4, group_size=128 if not smoke else 32)):
        model = random_model(preset, torch.float32 if smoke else torch.bfloat16, **small).to(dev)
        if quant is not None:
            quantize_(model, quant)
        weights = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
        weights -= model.embed_tokens.weight.nbytes  # the embedding is gathered, not read
        if model.lm_head.weight is model.embed_tokens.weight:
            weights += model.embed_tokens.weight.nbytes  # ... but a tied head reads all of it
        ceiling = bw / weights
        name = "bf16" if quant is None else "int4 g128"
        for how in ("engine eager", "engine graphs", "graph loop")[quick:]:
            tps = graph_loop_rate(model, new) if how == "graph loop" else \
                engine_rate(model, dev, new, compile=how == "engine graphs")
            fractions[f"{name} {how}"] = tps / ceiling
            shape = preset + (" (shrunk)" if smoke else "")
            print(f"model decode {shape} {name}, {how}: {tps:.1f} tok/s, roofline {ceiling:.1f} tok/s "
                  f"({weights / GiB:.2f} GiB read per token) -> {100 * tps / ceiling:.1f}%", flush=True)
        del model
    return fractions


def engine_rate(model: torch.nn.Module, dev: torch.device, new: int, compile: bool) -> float:
    """Engine tokens/s decoding one request: (time for ``new`` tokens - time for 1) / (new - 1)."""
    llm = LLM(model, EngineConfig(block_size=16, num_blocks=64, compile=compile))

    def run(n: int) -> None:
        llm.generate([[3, 4, 5, 6, 7, 8, 9, 10]],
                     SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    run(new)  # compile / capture and warm up
    t_long = min(timed(lambda: run(new)) for _ in range(3))
    t_short = min(timed(lambda: run(1)) for _ in range(3))
    return (new - 1) / (t_long - t_short)


def graph_loop(model: torch.nn.Module):
    """``run(n)``: greedy decode of n tokens of one sequence through the engine's static-shape
    decode step alone (:class:`CompiledDecode`: CUDA graphs on CUDA)."""
    c, bs = model.config, 16
    cache = PagedKVCache.allocate(c.num_layers, 64 + 1, bs, c.num_kv_heads, c.head_dim,
                                  model.embed_tokens.weight.dtype, model.embed_tokens.weight.device)
    step = CompiledDecode(model, cache)
    table = list(range(64))

    def run(n: int) -> None:
        tok = 3
        for p in range(n):
            logits = step([tok], [p], [table[p // bs] * bs + p % bs], [table])
            tok = int(logits[0].argmax())

    return run


def graph_loop_rate(model: torch.nn.Module, new: int) -> float:
    """Tokens/s of :func:`graph_loop` over ``new`` steps, after a warm-up that captures every bucket."""
    run = graph_loop(model)
    run(new)
    return new / min(timed(lambda: run(new)) for _ in range(3))


def tune(dev: torch.device, bw: float, smoke: bool) -> dict[str, dict]:
    """Sweep the tile configurations of the two targeted kernels at their target shapes and print
    each one's time and fraction of copy bandwidth, best first (the launchers' defaults are set
    from such a sweep)."""
    import itertools

    b = paged_batch(*((2, 64, 4, 2, 16) if smoke else (64, 4096, 32, 8, 128)), 16, dev,
                    torch.float32 if smoke else torch.bfloat16)
    kv_bytes = b["k_cache"].nbytes + b["v_cache"].nbytes
    runs = []
    # the full sweep (block_n 32/64/128 x warps 4/8 x stages 2/3/4 x splits auto/4) on an H200 put
    # the defaults first (RESULTS.md); these few keep checking it
    for bn, w, st, sp in itertools.product((64, 128), (4,), (2, 3), (None,)):
        cfg = dict(block_n=bn, num_warps=w, num_stages=st)
        try:
            t = bench(lambda cfg=cfg, sp=sp: paged_attention.paged_attention(**b, num_splits=sp, config=cfg),
                      dev, rep=50)
        except Exception as e:  # e.g. out of shared memory
            print(f"  decode {cfg} splits {sp}: {type(e).__name__}", flush=True)
            continue
        runs.append((t, "decode attn", {**cfg, "splits": sp}, kv_bytes / t / bw))
    k, n, group = (256, 512, 128) if smoke else (4096, 11008, 128)
    qweight = pack_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8), 4).to(dev)
    words = quant_gemv.interleave(qweight, 4, k)
    scales = (torch.rand(n, k // group) * 0.01).to(dev, torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8).to(dev)
    x = torch.randn(1, k, device=dev, dtype=torch.float32 if smoke else torch.bfloat16)
    nbytes = words.nbytes + scales.nbytes + zeros.nbytes
    # an H200 sweep of block_n 8-128 x warps 1-8 x prefetch (RESULTS.md) put (16, 8, no prefetch)
    # first; chunks per step came after it
    for bn, w, ch in itertools.product((8, 16, 32, 64), (2, 4, 8), (1, 2, 4)):
        cfg = dict(block_n=bn, num_warps=w, prefetch=0, chunks=ch)
        try:
            t = bench(lambda cfg=cfg: quant_gemv.quant_gemv(x, words, scales, zeros, 4, group, config=cfg),
                      dev, rep=50)
        except Exception as e:
            print(f"  gemv {cfg}: {type(e).__name__}", flush=True)
            continue
        runs.append((t, "int4 gemv", cfg, nbytes / t / bw))
    best = {}
    for kind, key in (("decode attn", "decode"), ("int4 gemv", "gemv")):
        mine = sorted((r for r in runs if r[1] == kind), key=lambda r: r[0])
        print(f"tune {kind}: {len(mine)} configurations, best 12:")
        for t, _, cfg, frac in mine[:12]:
            print(f"  {t * 1e6:8.1f} us  {100 * frac:5.1f}% of copy BW  {cfg}", flush=True)
        if mine:
            best[key] = mine[0][2]
    return best


def profile(dev: torch.device, smoke: bool) -> None:
    """Where a batch-1 decode step of the bf16 ``llama-3.2-1b`` shape spends its GPU time: the
    kernels of 32 steps of the bare greedy loop (CUDA graphs), by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    small = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=512) if smoke else {}
    model = random_model("llama-3.2-1b", torch.float32 if smoke else torch.bfloat16, **small).to(dev)
    run = graph_loop(model)
    run(64)  # capture every bucket first
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        run(32)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print("32 decode steps (bf16, CUDA graphs), 1-32 tokens of context:")
    print(prof.key_averages().table(sort_by=key, row_limit=30), flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script and kernels run")
    ap.add_argument("--tune", metavar="FILE", help="only sweep the decode attention and GEMV tiles; "
                    "write the best configurations to FILE (JSON)")
    ap.add_argument("--quick", action="store_true", help="skip the eager engine's model decode")
    ap.add_argument("--profile", action="store_true", help="only profile a 1B model's decode step")
    ap.add_argument("--tuned", metavar="FILE", help="time the targets with a --tune sweep's configurations")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        if not args.smoke or os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench_kernels needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        os.environ["LEANLM_KERNELS"] = "triton"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    bw, flops = roofline(dev, args.smoke)
    print(f"roofline: copy bandwidth {bw / 1e9:.1f} GB/s, bf16 GEMM {flops / 1e12:.1f} TFLOP/s", flush=True)
    print("vs_X: X's time / the kernel's time (above 1: the kernel is faster); err: max abs "
          "difference from the reference (relative for the GEMMs)", flush=True)
    if args.profile:
        return profile(dev, args.smoke)
    if args.tune:
        Path(args.tune).write_text(json.dumps(tune(dev, bw, args.smoke)))
        return
    if args.tuned:
        TUNED.update(json.loads(Path(args.tuned).read_text()))
        print(f"tuned configurations: {TUNED}")
    rows: list[dict] = []
    attention_rows(rows, dev, bw, args.smoke)
    gemm_rows(rows, dev, bw, args.smoke)
    elementwise_rows(rows, dev, bw, args.smoke)
    model = model_rows(dev, bw, args.smoke, args.quick)
    by_name = {r["kernel"] + " " + r["shape"].split()[0]: r for r in rows}
    decode, gemv = by_name["paged decode attn " + rows[0]["shape"].split()[0]], by_name["int4 gemv g128 m1"]
    targets = [
        ("paged decode attention >= 70% of copy bandwidth", decode["roofline"] >= 0.7),
        ("int4 GEMV >= 60% of copy bandwidth", gemv["roofline"] >= 0.6),
        ("int4 GEMV >= 2.5x bf16 torch.matmul", gemv["vs_bf16_matmul"] >= 2.5),
        ("model decode (bf16, engine graphs) >= 50% of the bandwidth roofline",
         model["bf16 engine graphs"] >= 0.5),
    ]
    for what, met in targets:
        print(f"{'met ' if met else 'MISSED'}  {what}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
