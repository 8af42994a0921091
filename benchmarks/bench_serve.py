"""Serving: leanlm's engine against transformers serving the same requests one by one and with
static batching (output throughput), TTFT with and without prefix caching, and an HTTP load test.

Metric definitions follow vLLM's benchmark_serving: TTFT (arrival -> first token), TPOT (mean
time per output token after the first), E2E latency, output throughput (generated tokens / wall
time). Throughput runs send every request at once; ``--load`` takes a Poisson ``--rate``.

    python benchmarks/bench_serve.py                   # throughput + prefix-cache TTFT
    python benchmarks/bench_serve.py --load [--rate R] # 500 streaming requests, 64 clients, HTTP
    python benchmarks/bench_serve.py --kv-cache        # int8 and fp8 K/V: capacity and perplexity
    python benchmarks/bench_serve.py --speculative [--compile] [--draft-model DIR]  # batch-1 speculation
    python benchmarks/bench_serve.py --compile         # decode with and without torch.compile
    python benchmarks/bench_serve.py --fairness        # a light client's TTFT under a flood
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from common import free_port, machine, start_server, unpacked_linears
from leanlm import DEFAULT_MODEL, DRAFT_MODEL, load_model, load_tokenizer
from leanlm.data.text import default_texts
from leanlm.serve import bench
from leanlm.serve.engine import LLM, EngineConfig, LLMEngine
from leanlm.serve.request import SamplingParams
from leanlm.serve.scheduler import SchedulerConfig


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    tok = load_tokenizer(DEFAULT_MODEL)
    stream = [t for text in default_texts(60, seed) for t in tok.encode(text, add_special_tokens=False)]
    rng = random.Random(seed)
    return [stream[s:s + length] for s in (rng.randrange(len(stream) - length) for _ in range(n))]


def drain(engine: LLMEngine) -> None:
    """Step the engine until every request it holds has finished."""
    while engine.has_unfinished_requests():
        engine.step()


def leanlm_run(ps: list[list[int]], new: int, caching: bool = True) -> tuple[float, list[float]]:
    """(wall seconds, TTFT per request) for all requests at once through the engine."""
    model = load_model(DEFAULT_MODEL)
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_memory=512 * 2**20,
                                           enable_prefix_caching=caching,
                                           scheduler=SchedulerConfig(max_num_seqs=64)))
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in ps]
    first: dict[str, float] = {}
    with torch.inference_mode():
        while engine.has_unfinished_requests():
            for r in engine.step():
                first.setdefault(r.request_id, time.perf_counter() - start)
    wall = time.perf_counter() - start
    assert all(len(r.output_token_ids) == new for r in reqs)
    return wall, [first[r.request_id] for r in reqs]


def transformers_run(ps: list[list[int]], new: int, batch: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL)).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ps), batch):
            chunk = ps[i:i + batch]
            longest = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (longest - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
            assert out.shape[1] == longest + new
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> None:
    ps = prompts(args.requests, args.prompt_len)
    new = args.max_tokens
    total = len(ps) * new
    print(f"# bench_serve: default model ({load_model(DEFAULT_MODEL).config.torch_dtype}), "
          f"{len(ps)} requests x {args.prompt_len} prompt tokens x {new} new tokens, greedy, all at "
          f"once; {machine()}")
    rows = []
    for rnd in range(args.rounds):
        wall, ttft = leanlm_run(ps, new)
        with unpacked_linears():
            plain, _ = leanlm_run(ps, new)
        one = transformers_run(ps, new, 1)
        static = transformers_run(ps, new, len(ps))
        rows.append((wall, one, static, plain))
        print(f"round {rnd}: leanlm {total / wall:.1f} tok/s (median TTFT {np.median(ttft):.2f} s), "
              f"with F.linear {total / plain:.1f} tok/s, transformers one-by-one {total / one:.1f} tok/s, "
              f"static batch {total / static:.1f} tok/s", flush=True)
    wall, one, static, plain = (statistics.median(r[i] for r in rows) for i in range(4))
    print("| server | output tokens/s | leanlm speed-up |")
    print("|---|---|---|")
    print(f"| leanlm engine (continuous batching) | {total / wall:.1f} | — |")
    print(f"| leanlm engine, F.linear (no prepacked weights) | {total / plain:.1f} | {plain / wall:.2f}x |")
    print(f"| transformers one by one | {total / one:.1f} | {one / wall:.2f}x |")
    print(f"| transformers static batch of {len(ps)} | {total / static:.1f} | {static / wall:.2f}x |")

    # prefix caching: requests that share a 512-token prefix, served one after another
    shared = prompts(1, 512, seed=1)[0]
    tails = prompts(8, 16, seed=2)
    ps2 = [shared + t for t in tails]
    for caching in (False, True):
        llm = LLM(load_model(DEFAULT_MODEL), EngineConfig(block_size=16, enable_prefix_caching=caching))
        ttfts = []
        with torch.inference_mode():
            for p in ps2:
                start = time.perf_counter()
                req = llm.engine.add_request(p, SamplingParams(max_tokens=1, temperature=0))
                while not req.is_finished:
                    llm.engine.step()
                ttfts.append(time.perf_counter() - start)
        label = "on" if caching else "off"
        print(f"prefix caching {label}: median TTFT of requests 2-8 sharing a 512-token prefix "
              f"{statistics.median(ttfts[1:]) * 1000:.1f} ms (first request {ttfts[0] * 1000:.1f} ms)")


def load(args: argparse.Namespace) -> None:
    """``--load-requests`` streaming requests through HTTP (``leanlm bench serve``'s client) to
    ``leanlm serve`` as it runs (its engine core in a process of its own)."""
    import httpx2 as httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server([sys.executable, "-m", "leanlm.cli", "serve", "--port", str(port), "--max-num-seqs",
                         "64", "--kv-cache-memory", "256"], url)
    tree = psutil.Process(proc.pid)
    rss = lambda: sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])
    tok = load_tokenizer(DEFAULT_MODEL)
    texts = [tok.decode(p) for p in prompts(64, args.prompt_len)]
    rss0 = rss()
    try:
        reqs = bench.schedule(texts, args.load_requests, args.max_tokens, args.rate)
        results, wall = asyncio.run(bench.run(url, reqs, max_concurrency=args.clients,
                                              extra={"temperature": 0}))
        s = bench.summarize(results, wall)
        rss1 = rss()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        usage = next(line.rpartition(" ")[2] for line in metrics.splitlines()
                     if line.startswith("leanlm_kv_cache_usage_ratio{"))
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"# bench_serve --load: `leanlm serve`, {args.load_requests} streaming requests from "
          f"{args.clients} clients, arrival rate {args.rate} req/s, {args.prompt_len}-token prompts, "
          f"max_tokens {args.max_tokens}; {machine()}")
    print(f"ok {s['completed']}, failed {s['failed']}; {wall:.1f} s; output {s['output_throughput']:.1f} "
          f"tok/s; TTFT median {s['median_ttft_ms'] / 1000:.2f} s p99 {s['p99_ttft_ms'] / 1000:.2f} s; "
          f"TPOT median {s['median_tpot_ms']:.1f} ms; ITL median {s['median_itl_ms']:.1f} ms "
          f"p99 {s['p99_itl_ms']:.1f} ms; E2E median {s['median_e2el_ms'] / 1000:.2f} s; "
          f"RSS of the server's processes {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB; "
          f"KV cache in use at the end {float(usage):.0%}")


def fairness(args: argparse.Namespace) -> None:
    """Wall-clock TTFT of a light client (one short request every 0.25 s) while another client
    floods the server with long prompts, under FCFS and VTC, against its TTFT on an idle server."""
    tok = load_tokenizer(DEFAULT_MODEL)
    texts = [tok.decode(p) for p in prompts(64, 256, seed=3)]
    light_texts = [tok.decode(p) for p in prompts(16, 32, seed=4)]
    extra = {"temperature": 0, "ignore_eos": True}

    def light() -> list[bench.BenchRequest]:
        return [bench.BenchRequest(t, 8, user="light", delay=0.5 + 0.25 * i)
                for i, t in enumerate(light_texts)]

    async def both(url: str, flooded: bool) -> list[bench.RequestResult]:
        flood = [bench.BenchRequest(texts[i % len(texts)], 16, user="flood") for i in range(args.flood)]
        runs = [bench.run(url, light(), extra=extra)]
        if flooded:
            runs.append(bench.run(url, flood, extra=extra))
        return (await asyncio.gather(*runs))[0][0]

    print(f"# bench_serve --fairness: flood = {args.flood} requests of 256 tokens (16 out) at once from "
          f"user 'flood'; light = 16 requests of 32 tokens (8 out) every 0.25 s from user 'light'; "
          f"token budget {args.budget}/step, at most {args.max_num_seqs} running, server threads "
          f"{args.threads or 'default'}; {machine()}")
    ttft = {}
    for policy, flooded in (("fcfs", False), ("fcfs", True), ("vtc", True)):
        port = free_port()  # the server in its own process: the clients do not share its GIL
        url = f"http://127.0.0.1:{port}/v1"
        proc = start_server([sys.executable, "-m", "leanlm.cli", "serve", "--port", str(port), "--policy",
                             policy, "--max-num-batched-tokens", str(args.budget), "--max-num-seqs",
                             str(args.max_num_seqs), "--threads", str(args.threads)], url)
        try:
            asyncio.run(bench.run(url, light()[:2], extra=extra))  # warm-up
            results = asyncio.run(both(url, flooded))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        key = f"{policy} under flood" if flooded else "idle server"
        ttft[key] = statistics.median(r.ttft for r in results) * 1000
        print(f"{key}: light client's TTFT median {ttft[key]:.1f} ms, p90 "
              f"{np.percentile([r.ttft * 1000 for r in results], 90):.1f} ms", flush=True)
    for key in ("fcfs under flood", "vtc under flood"):
        print(f"{key}: {ttft[key] / ttft['idle server']:.2f}x the idle TTFT")


def kv_cache(args: argparse.Namespace) -> None:
    """int8 and fp8 vs bf16 K/V: tokens at a fixed memory budget, and perplexity through the
    engine (prompt logprobs of held-out windows, every attention reading the cached K/V)."""
    from leanlm.serve.paged import kv_bytes_per_block, kv_cache_dtype

    model = load_model(DEFAULT_MODEL, dtype="bfloat16").eval()
    budget = 256 * 2**20
    windows = prompts(16, 512, seed=7)
    print(f"# bench_serve --kv-cache: default model (bf16 weights), {len(windows)} windows x 512 tokens; "
          f"{machine()}")
    ppl = {}
    for kind in ("auto", "int8", "fp8"):
        blocks = budget // kv_bytes_per_block(model.config, 16, kv_cache_dtype(kind, torch.bfloat16))
        engine = LLMEngine(model, EngineConfig(kv_cache_memory=budget, kv_cache_dtype=kind))
        reqs = [engine.add_request(w, SamplingParams(max_tokens=1, prompt_logprobs=0)) for w in windows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            drain(engine)
        dt = time.perf_counter() - t0
        lps = [lp for r in reqs for e in r.prompt_logprobs[1:] for lp in [e[0]]]
        ppl[kind] = float(np.exp(-np.mean(lps)))
        print(f"{kind}: {blocks * 16:,} tokens in {budget / 2**20:.0f} MiB; perplexity {ppl[kind]:.4f} "
              f"({len(lps):,} tokens, {dt:.1f} s)", flush=True)
    for kind in ("int8", "fp8"):
        print(f"{kind} / bf16 (auto) perplexity: {ppl[kind] / ppl['auto']:.5f}")


def speculative(args: argparse.Namespace) -> None:
    """Batch-1 greedy decode without speculation, with prompt lookup and with the shipped draft
    model, on an input-grounded task: continuing stdlib code, whose next lines reuse the names
    and phrases of the prompt. Rounds interleave the variants; the median rate is reported.
    With --compile every variant (the baseline too) runs the compiled decode step."""
    model = load_model(DEFAULT_MODEL, dtype=args.dtype).eval()
    draft_dir = Path(args.draft_model) if args.draft_model else DRAFT_MODEL
    draft = load_model(draft_dir, dtype=args.dtype).eval()
    ps = prompts(8, 256, seed=11)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    print(f"# bench_serve --speculative: default model ({args.dtype}), draft model {draft_dir}, "
          f"compile={args.compile}, {len(ps)} prompts x 256 tokens, 64 new tokens each, one request "
          f"at a time, greedy, k <= {args.spec_tokens}; {machine()}")
    variants = (None, "ngram", "draft")
    rates: dict[str | None, list[float]] = {v: [] for v in variants}
    outs, notes = {}, {}
    for _ in range(args.rounds):
        for spec in variants:
            engine = LLMEngine(model, EngineConfig(speculative=spec, num_spec_tokens=args.spec_tokens,
                                                      compile=args.compile),
                               draft if spec == "draft" else None)
            with torch.inference_mode():
                engine.add_request(ps[0], params)  # warm-up
                drain(engine)
                engine.spec_accepted = engine.spec_proposed = 0
                t0 = time.perf_counter()
                reqs = []
                for p in ps:
                    reqs.append(engine.add_request(p, params))
                    drain(engine)
                dt = time.perf_counter() - t0
            rates[spec].append(64 * len(ps) / dt)
            outs[spec] = [r.output_token_ids for r in reqs]
            if spec:
                notes[spec] = (f"; drafts accepted {engine.spec_accepted:,} of {engine.spec_proposed:,} "
                               f"({engine.spec_accepted / max(1, engine.spec_proposed):.2f})"
                               + (f", draft step cost {engine.draft_cost:.2f} target steps"
                                  if spec == "draft" else ""))
    base = statistics.median(rates[None])
    for spec in variants:
        rate = statistics.median(rates[spec])
        line = f"{spec or 'no speculation'}: {rate:.1f} tok/s (median of {args.rounds})"
        if spec:
            pairs = list(zip(outs[spec], outs[None], strict=True))
            line += (f", speed-up {rate / base:.2f}x{notes[spec]}; identical outputs: "
                     f"{sum(x == y for x, y in pairs)} of {len(ps)}")
        print(line, flush=True)


def compiled(args: argparse.Namespace) -> None:
    """Decode tokens/s at batch 1 and 16 with and without the compiled decode step (the first
    request of each engine, untimed, pays for the compilation of its buckets)."""
    model = load_model(DEFAULT_MODEL, dtype=args.dtype).eval()
    ps = prompts(16, 256, seed=11)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    print(f"# bench_serve --compile: default model ({args.dtype}), 256-token prompts, 64 new tokens, "
          f"greedy; batch 1 = 4 requests one at a time, batch 16 = 16 at once; decode tokens/s counts "
          f"the steps after each prefill; {machine()}")
    rates: dict[tuple[bool, int], list[float]] = {}
    outs: dict[tuple[bool, int], list[list[int]]] = {}
    for _ in range(args.rounds):
        for comp in (False, True):
            engine = LLMEngine(model, EngineConfig(compile=comp))
            with torch.inference_mode():
                t0 = time.perf_counter()
                for batch in (1, 16):  # warm-up: compiles the buckets this benchmark uses
                    for p in ps[:batch]:
                        engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True))
                    drain(engine)
                warm = time.perf_counter() - t0
                for batch, groups in ((1, [[p] for p in ps[:4]]), (16, [ps])):
                    decode_time, tokens, reqs = 0.0, 0, []
                    for group in groups:
                        reqs += [engine.add_request(p, params) for p in group]
                        engine.step()  # the prefill (and first token) of the group
                        while engine.has_unfinished_requests():
                            t = time.perf_counter()
                            done = engine.step()
                            decode_time += time.perf_counter() - t
                            tokens += len(done)
                    rates.setdefault((comp, batch), []).append(tokens / decode_time)
                    outs[(comp, batch)] = [r.output_token_ids for r in reqs]
            print(f"compile={comp}: warm-up {warm:.1f} s; " + ", ".join(
                f"batch {b}: {rates[(comp, b)][-1]:.1f} tok/s" for b in (1, 16)), flush=True)
    for batch in (1, 16):
        eager, comp = (statistics.median(rates[(c, batch)]) for c in (False, True))
        same = sum(x == y for x, y in zip(outs[(True, batch)], outs[(False, batch)], strict=True))
        print(f"batch {batch}: eager {eager:.1f} tok/s, compiled {comp:.1f} tok/s, {comp / eager:.2f}x "
              f"(median of {args.rounds}); identical outputs: {same} of {len(outs[(True, batch)])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--load-requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals, requests/s")
    ap.add_argument("--kv-cache", action="store_true", help="int8, fp8 vs bf16 K/V: capacity, perplexity")
    ap.add_argument("--speculative", action="store_true", help="batch-1 decode: prompt lookup, draft model")
    ap.add_argument("--spec-tokens", type=int, default=4)
    ap.add_argument("--draft-model", help="--speculative: a draft model directory (default: the shipped one)")
    ap.add_argument("--compile", action="store_true",
                    help="decode tokens/s with torch.compile; with --speculative, every variant compiled")
    ap.add_argument("--fairness", action="store_true", help="a light client's TTFT under a flood")
    ap.add_argument("--flood", type=int, default=200, help="--fairness: the flooding client's requests")
    ap.add_argument("--budget", type=int, default=512, help="--fairness: tokens per engine step")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="--fairness: the running batch's cap")
    ap.add_argument("--threads", type=int, default=0, help="--fairness: the server's torch threads")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype for --speculative / --compile")
    args = ap.parse_args()
    if args.kv_cache:
        kv_cache(args)
    elif args.speculative:
        speculative(args)
    elif args.compile:
        compiled(args)
    elif args.fairness:
        fairness(args)
    elif args.load:
        load(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
