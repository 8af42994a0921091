"""Serving across processes: the HTTP server against the offline engine, the one-process server
against the split one, and the data-parallel routers.

    python benchmarks/bench_serve_scale.py --http      # offline vs HTTP, 32 concurrent, and at 1
    python benchmarks/bench_serve_scale.py --router    # DP=2: prefix-aware vs least-loaded hit rate

``--http``: the same 64 requests (64-token prompts, 64 greedy tokens each, the default model) run
(1) through the offline engine (``LLM.generate``, all at once), (2) through ``leanlm serve
--engine-in-process`` (the engine in a thread of the HTTP server: the layout before the split) and
(3) through ``leanlm serve`` (the engine core in a process of its own), both loaded by ``leanlm
bench serve``'s client with 32 streams at a time; output tokens/s of each, and the ratio to the
offline engine. Then one request at a time: the HTTP TPOT against the offline engine's decode
step at batch 1. Rounds alternate the variants.

``--router``: ``leanlm serve --data-parallel-size 2`` with each router over a shared-prefix
workload — 8 system prompts of 256 tokens, 12 requests each with its own 16-token question, in a
shuffled order, 8 at a time — and the prefix-cache hit rate over both engine cores (the
``leanlm_prefix_cache_hits`` / ``_queries`` counters of ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time

import httpx2 as httpx
import torch

from common import free_port, machine, start_server
from leanlm import DEFAULT_MODEL, load_model, load_tokenizer
from leanlm.sampling import SamplingParams
from leanlm.serve import bench
from leanlm.serve.engine import LLM, EngineConfig
from leanlm.serve.scheduler import SchedulerConfig


def serve_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "leanlm.cli", "serve", "--port", str(port), "--max-num-seqs", "64",
            "--policy", "fcfs", *extra]


def texts(n: int, length: int, seed: int = 0) -> list[str]:
    return bench.random_prompts(load_tokenizer(DEFAULT_MODEL), n, length, seed)


def offline(prompts: list[str], new: int) -> tuple[float, float]:
    """(output tokens/s of all at once, seconds per decode step of one request alone)."""
    tok = load_tokenizer(DEFAULT_MODEL)
    ids = [tok.encode(t) for t in prompts]
    llm = LLM(load_model(DEFAULT_MODEL), EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64)))
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    with torch.inference_mode():
        llm.generate(ids[:8], params)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(ids, params)
        wall = time.perf_counter() - t0
        steps = []
        engine = llm.engine
        req = engine.add_request(ids[0], params)
        engine.step()  # the prefill
        while not req.is_finished:
            s0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s0)
    return sum(map(len, outs)) / wall, statistics.median(steps)


def http(prompts: list[str], new: int, *extra: str) -> dict[str, dict]:
    """One server, three loads: 32 streams at a time, 32 non-streaming requests at a time, and
    one stream at a time (8 requests)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(serve_cmd(port, *extra), url)
    body = {"temperature": 0, "ignore_eos": True}
    try:
        reqs = bench.schedule(prompts[:8], 8, new, float("inf"))
        asyncio.run(bench.run(url, reqs, max_concurrency=8, extra=body))  # warm-up
        out = {}
        for name, n, concurrency, stream in (("streams", len(prompts), 32, True),
                                             ("whole", len(prompts), 32, False), ("alone", 8, 1, True)):
            reqs = bench.schedule(prompts[:n], n, new, float("inf"))
            results, wall = asyncio.run(bench.run(url, reqs, max_concurrency=concurrency, extra=body,
                                                  stream=stream))
            out[name] = bench.summarize(results, wall)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def http_vs_offline(args: argparse.Namespace) -> None:
    prompts, new = texts(64, 64), 64
    print(f"# bench_serve_scale --http: default model, 64 requests x 64 prompt tokens x {new} greedy "
          f"tokens, 32 at a time (streamed, then not), then 8 streams one at a time; {machine()}", flush=True)
    rows: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        tput, step = offline(prompts, new)
        rows.setdefault("offline", []).append(tput)
        rows.setdefault("step", []).append(step)
        for name, extra in (("in-process", ("--engine-in-process",)), ("split", ())):
            s = http(prompts, new, *extra)
            rows.setdefault(f"{name} streams", []).append(s["streams"]["output_throughput"])
            rows.setdefault(f"{name} whole", []).append(s["whole"]["output_throughput"])
            rows.setdefault(f"{name} tpot", []).append(s["alone"]["median_tpot_ms"] / 1000)
            failed = sum(v["failed"] for v in s.values())
            print(f"round {rnd}: {name}: {s['streams']['output_throughput']:.1f} tok/s streamed, "
                  f"{s['whole']['output_throughput']:.1f} whole ({failed} failed); TPOT alone "
                  f"{s['alone']['median_tpot_ms']:.2f} ms", flush=True)
        print(f"round {rnd}: offline {tput:.1f} tok/s; decode step alone {step * 1000:.2f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print("| | tok/s, 32 streams | vs offline | tok/s, 32 non-streaming | vs offline | TPOT alone (ms) "
          "| vs offline step |")
    print("|---|---|---|---|---|---|---|")
    print(f"| offline engine (LLM.generate) | {med['offline']:.1f} | 1.00x | {med['offline']:.1f} | 1.00x "
          f"| {med['step'] * 1000:.2f} | 1.00x |")
    for name in ("in-process", "split"):
        streams, whole, tpot = med[f"{name} streams"], med[f"{name} whole"], med[f"{name} tpot"]
        print(f"| leanlm serve ({name}) | {streams:.1f} | {streams / med['offline']:.2f}x | {whole:.1f} | "
              f"{whole / med['offline']:.2f}x | {tpot * 1000:.2f} | {tpot / med['step']:.2f}x |")


def hit_rate(url: str) -> tuple[float, dict[str, float]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts: dict[str, dict[str, float]] = {"queries": {}, "hits": {}}
    for kind in counts:
        pattern = rf'leanlm_prefix_cache_{kind}_total{{engine="(\d+)"}} ([\d.e+]+)'
        for engine, value in re.findall(pattern, text):
            counts[kind][engine] = float(value)
    queries, hits = sum(counts["queries"].values()), sum(counts["hits"].values())
    return hits / max(queries, 1), counts["queries"]


def routers(args: argparse.Namespace) -> None:
    tok = load_tokenizer(DEFAULT_MODEL)
    rng = random.Random(0)
    systems = texts(8, 256, seed=1)
    questions = texts(96, 16, seed=2)
    prompts = [systems[i % 8] + questions[i] for i in range(96)]
    rng.shuffle(prompts)
    print(f"# bench_serve_scale --router: DP=2, {len(prompts)} requests, 8 shared 256-token prefixes "
          f"(~{len(tok.encode(prompts[0]))} prompt tokens each), 8 new tokens, 8 at a time; {machine()}")
    print("| router | prefix-cache hit rate | prompt tokens looked up per engine | wall s |")
    print("|---|---|---|---|")
    for router in ("least-loaded", "prefix"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = serve_cmd(port, "--data-parallel-size", "2", "--router", router, "--threads", "1")
        proc = start_server(cmd, f"{url}/v1")
        try:
            reqs = bench.schedule(prompts, len(prompts), 8, float("inf"))
            t0 = time.perf_counter()
            asyncio.run(bench.run(f"{url}/v1", reqs, max_concurrency=8, extra={"temperature": 0}))
            wall = time.perf_counter() - t0
            rate, per_engine = hit_rate(url)
        finally:
            proc.terminate()
            proc.wait(60)
        looked_up = ", ".join(f"{int(v)}" for v in per_engine.values())
        print(f"| {router} | {rate:.3f} | {looked_up} | {wall:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", action="store_true")
    ap.add_argument("--router", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.router:
        routers(args)
    else:
        http_vs_offline(args)


if __name__ == "__main__":
    main()
