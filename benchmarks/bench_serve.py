"""Serving: leanlm's engine against transformers serving the same requests one by one and with
static batching (output throughput), TTFT with and without prefix caching, and an HTTP load test.

Metric definitions follow vLLM's benchmark_serving: TTFT (arrival -> first token), TPOT (mean
time per output token after the first), E2E latency, output throughput (generated tokens / wall
time). Throughput runs send every request at once; ``--load`` takes a Poisson ``--rate``.

    python benchmarks/bench_serve.py                   # throughput + prefix-cache TTFT
    python benchmarks/bench_serve.py --load [--rate R] # 500 streaming requests, 64 clients, HTTP
    python benchmarks/bench_serve.py --kv-cache        # int8 K/V: capacity and perplexity
    python benchmarks/bench_serve.py --speculative     # batch-1 decode with prompt-lookup drafts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import threading
import time

import numpy as np
import psutil
import torch

from common import machine
from leanlm import DEFAULT_MODEL, DRAFT_MODEL, load_model, load_tokenizer
from leanlm.quant.calibration import default_texts
from leanlm.serve.engine import LLM, EngineConfig, LLMEngine
from leanlm.serve.request import SamplingParams
from leanlm.serve.scheduler import SchedulerConfig


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    tok = load_tokenizer(DEFAULT_MODEL)
    stream = [t for text in default_texts(60, seed) for t in tok.encode(text, add_special_tokens=False)]
    rng = random.Random(seed)
    return [stream[s:s + length] for s in (rng.randrange(len(stream) - length) for _ in range(n))]


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
        one = transformers_run(ps, new, 1)
        static = transformers_run(ps, new, len(ps))
        rows.append((wall, one, static))
        print(f"round {rnd}: leanlm {total / wall:.1f} tok/s (median TTFT {np.median(ttft):.2f} s), "
              f"transformers one-by-one {total / one:.1f} tok/s, static batch {total / static:.1f} tok/s",
              flush=True)
    wall, one, static = (statistics.median(r[i] for r in rows) for i in range(3))
    print("| server | output tokens/s | leanlm speed-up |")
    print("|---|---|---|")
    print(f"| leanlm engine (continuous batching) | {total / wall:.1f} | — |")
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


async def _load(url: str, n: int, clients: int, new: int, prompt_list: list[str],
                rate: float) -> dict:
    """``n`` streaming requests, at most ``clients`` at a time, arriving as a Poisson process of
    ``rate`` requests/s (inf: all at once). Per vLLM: TTFT, TPOT = (E2E - TTFT) / (tokens - 1),
    ITL = the gaps between streamed tokens."""
    import httpx2 as httpx

    sem = asyncio.Semaphore(clients)
    stats: dict = {"ok": 0, "failed": 0, "ttft": [], "e2e": [], "tpot": [], "itl": [], "tokens": 0}
    rng = np.random.default_rng(0)
    delays = np.cumsum(rng.exponential(1 / rate, n)) if np.isfinite(rate) else np.zeros(n)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(float(delays[i]))
        async with sem:
            body = {"model": "leanlm-default", "prompt": prompt_list[i % len(prompt_list)],
                    "max_tokens": new, "temperature": 0, "stream": True}
            start = time.perf_counter()
            times: list[float] = []
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["failed"] += 1
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            json.loads(line[6:])
                            times.append(time.perf_counter())
                end = time.perf_counter()
                stats["ok"] += 1
                stats["tokens"] += len(times)
                stats["ttft"].append((times[0] if times else end) - start)
                stats["e2e"].append(end - start)
                if len(times) > 1:
                    stats["tpot"].append((times[-1] - times[0]) / (len(times) - 1))
                    stats["itl"] += list(np.diff(times))
            except Exception:  # a failed request is counted, not fatal
                stats["failed"] += 1

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return stats


def load(args: argparse.Namespace) -> None:
    import uvicorn

    from leanlm.serve.api.server import create_app
    from leanlm.serve.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(LLMEngine(load_model(DEFAULT_MODEL), EngineConfig(
        block_size=16, kv_cache_memory=256 * 2**20, scheduler=SchedulerConfig(max_num_seqs=64))),
        load_tokenizer(DEFAULT_MODEL))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "leanlm-default"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    tok = load_tokenizer(DEFAULT_MODEL)
    texts = [tok.decode(p) for p in prompts(64, args.prompt_len)]
    rss0 = psutil.Process().memory_info().rss
    start = time.perf_counter()
    stats = asyncio.run(_load(f"http://127.0.0.1:{port}", args.load_requests, args.clients,
                              args.max_tokens, texts, args.rate))
    wall = time.perf_counter() - start
    rss1 = psutil.Process().memory_info().rss
    kv = engine.engine.kv
    print(f"# bench_serve --load: {args.load_requests} streaming requests from {args.clients} clients, "
          f"arrival rate {args.rate} req/s, {args.prompt_len}-token prompts, max_tokens "
          f"{args.max_tokens}; {machine()}")
    print(f"ok {stats['ok']}, failed {stats['failed']}; {wall:.1f} s; output {stats['tokens'] / wall:.1f} "
          f"tok/s; TTFT median {np.median(stats['ttft']):.2f} s "
          f"p99 {np.percentile(stats['ttft'], 99):.2f} s; "
          f"TPOT median {np.median(stats['tpot']) * 1000:.1f} ms; ITL median "
          f"{np.median(stats['itl']) * 1000:.1f} ms p99 {np.percentile(stats['itl'], 99) * 1000:.1f} ms; "
          f"E2E median {np.median(stats['e2e']):.2f} s; RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB; "
          f"KV blocks free at the end {kv.pool.num_free_blocks}/{len(kv.pool.blocks)}")
    server.should_exit = True


def kv_cache(args: argparse.Namespace) -> None:
    """int8 vs bf16 K/V: tokens at a fixed memory budget, and perplexity through the engine
    (prompt logprobs of held-out windows, every attention reading the cached K/V)."""
    from leanlm.serve.model_runner import kv_bytes_per_block

    model = load_model(DEFAULT_MODEL, dtype="bfloat16").eval()
    budget = 256 * 2**20
    windows = prompts(16, 512, seed=7)
    print(f"# bench_serve --kv-cache: default model (bf16 weights), {len(windows)} windows x 512 tokens; "
          f"{machine()}")
    ppl = {}
    for kind, dtype in (("bf16", torch.bfloat16), ("int8", torch.int8)):
        blocks = budget // kv_bytes_per_block(model, 16, dtype)
        engine = LLMEngine(model, EngineConfig(kv_cache_memory=budget, kv_cache_dtype=(
            "int8" if kind == "int8" else "auto")))
        reqs = [engine.add_request(w, SamplingParams(max_tokens=1, prompt_logprobs=0)) for w in windows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            while engine.has_unfinished_requests():
                engine.step()
        dt = time.perf_counter() - t0
        lps = [lp for r in reqs for e in r.prompt_logprobs[1:] for lp in [e[0]]]
        ppl[kind] = float(np.exp(-np.mean(lps)))
        print(f"{kind}: {blocks * 16:,} tokens in {budget / 2**20:.0f} MiB; perplexity {ppl[kind]:.4f} "
              f"({len(lps):,} tokens, {dt:.1f} s)", flush=True)
    print(f"int8 / bf16 perplexity: {ppl['int8'] / ppl['bf16']:.5f}")


def speculative(args: argparse.Namespace) -> None:
    """Batch-1 greedy decode without speculation, with prompt lookup and with the shipped draft
    model, on an input-grounded task: continuing stdlib code, whose next lines reuse the names
    and phrases of the prompt. Rounds interleave the variants; the median rate is reported."""
    model = load_model(DEFAULT_MODEL, dtype=args.dtype).eval()
    draft = load_model(DRAFT_MODEL, dtype=args.dtype).eval()
    ps = prompts(8, 256, seed=11)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    print(f"# bench_serve --speculative: default model ({args.dtype}), draft model {DRAFT_MODEL.name}, "
          f"{len(ps)} prompts x 256 tokens, 64 new tokens each, one request at a time, greedy, "
          f"k <= {args.spec_tokens}; {machine()}")
    variants = (None, "ngram", "draft")
    rates: dict[str | None, list[float]] = {v: [] for v in variants}
    outs, notes = {}, {}
    for _ in range(args.rounds):
        for spec in variants:
            engine = LLMEngine(model, EngineConfig(speculative=spec, num_spec_tokens=args.spec_tokens),
                               draft if spec == "draft" else None)
            with torch.inference_mode():
                engine.add_request(ps[0], params)  # warm-up
                while engine.has_unfinished_requests():
                    engine.step()
                engine.spec_accepted = engine.spec_proposed = 0
                t0 = time.perf_counter()
                reqs = []
                for p in ps:
                    reqs.append(engine.add_request(p, params))
                    while engine.has_unfinished_requests():
                        engine.step()
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
    ap.add_argument("--kv-cache", action="store_true", help="int8 vs bf16 K/V: capacity, perplexity")
    ap.add_argument("--speculative", action="store_true", help="batch-1 decode: prompt lookup, draft model")
    ap.add_argument("--spec-tokens", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype for --speculative")
    args = ap.parse_args()
    if args.kv_cache:
        kv_cache(args)
    elif args.speculative:
        speculative(args)
    elif args.load:
        load(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
