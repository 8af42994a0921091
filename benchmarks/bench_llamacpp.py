"""leanlm's server against llama.cpp's own ``llama-server`` (continuous batching over parallel
slots) on the same model and workload.

llama.cpp is built from the sources vendored in the llama-cpp-python sdist (``llamacpp.py``), the
checkpoint converted by its own converter to f16 and quantized by its ``llama-quantize`` to Q4_0
(4-bit, groups of 32, symmetric). leanlm serves the same checkpoint in bf16, and quantized with RTN
W4 g32 (symmetric, as Q4_0): as ``leanlm quantize`` makes it (head bf16) with bf16 activations,
and as llama-quantize's Q4_0 file is (the tied head in 8 bits, its Q8_0) with int8 activations
(``--int8-activations``, on AVX512-VNNI CPUs: Q4_0's own arithmetic, whose activations are Q8_0
blocks). bf16 and the latter run eagerly and with ``--compile`` (the decode step one compiled
graph calling leanlm's C++ ops). ``llama-server`` runs with as
many parallel slots as the highest concurrency (``-np``), each with room for a prompt and its
output, and ``-t``/``-tb`` threads.
Each server runs alone on the machine's cores, and the same ``leanlm bench serve`` workload
(random prompts sent as token ids, fixed output length, special tokens (EOS among them) banned
by logit bias and ``ignore_eos`` so both make every token, a connection per request) runs at
each concurrency level. ``--preset default`` is the embedded default model; ``--preset
llama-3.2-1b`` a random-weight checkpoint of that shape with the default tokenizer and
its vocabulary (8,192 ids: the embedding and head are smaller than the real 128k ones).

    python benchmarks/bench_llamacpp.py [--preset default|llama-3.2-1b] [--concurrency 1,8,32]
                                        [--rounds N] [--no-compile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import CACHE, free_port, machine, random_model, start_server
from leanlm import DEFAULT_MODEL, save_model
from leanlm.serve import bench
from leanlm.tokenizer import load_tokenizer
from llamacpp import SDIST, build, ggufs


def preset_checkpoint(preset: str) -> Path:
    """A random-weight bf16 checkpoint of ``preset``'s shape whose vocabulary is the default
    tokenizer's (a random model with the preset's own 128k vocabulary samples ids the tokenizer
    cannot decode, which a serving client sees as empty output), with that tokenizer."""
    vocab = load_tokenizer(DEFAULT_MODEL).vocab_size
    path = CACHE / f"{preset}-vocab{vocab}-bfloat16"
    if not (path / "config.json").is_file():
        save_model(random_model(preset, torch.bfloat16, vocab_size=vocab), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


def leanlm_int4(model: Path, out: Path, *options: str) -> Path:
    subprocess.run([sys.executable, "-m", "leanlm.cli", "quantize", str(model), "--method", "rtn",
                    "--bits", "4", "--group-size", "32", "--out", str(out), *options], check=True,
                   capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", type=Path, default=SDIST, help="llama-cpp-python sdist")
    ap.add_argument("--preset", default="default", help="default (the embedded model) or a preset shape")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every server this often; medians")
    ap.add_argument("--no-compile", action="store_true", help="without the leanlm --compile row")
    ap.add_argument("--only", default="", help="comma-separated parts of server names: only those rows")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    model = DEFAULT_MODEL if args.preset == "default" else preset_checkpoint(args.preset)
    tok = load_tokenizer(model)
    # token ids, not text: llama.cpp's own tokenizer splits the same text into other tokens (~11%
    # more for these random prompts), and both servers take ids (the GGUF keeps the vocabulary)
    prompts = bench.random_prompts(tok, args.num_prompts, args.input_len, seed=0, ids=True)
    # every token made must be a text token: special ones (EOS among them) are banned
    banned = {str(t): -100 for t in sorted(bench.special_ids(tok))}
    extra = {"temperature": 0, "ignore_eos": True, "logit_bias": banned}
    print(f"# bench_llamacpp: {args.preset} model, {args.num_prompts} requests per level, random prompts of "
          f"{args.input_len} tokens, {args.output_len} tokens out, all arriving at once, concurrency "
          f"capped at {levels}; {args.threads} threads each; {machine()}", flush=True)
    tree = build(args.llama_cpp_src, ("llama-server", "llama-quantize"))
    gguf_dir = CACHE / f"{args.preset}-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    files = ggufs(tree, model, ("Q4_0",), gguf_dir)
    slots, slot_ctx = max(levels), args.input_len + args.output_len + 64
    with tempfile.TemporaryDirectory() as tmp:
        int4 = leanlm_int4(model, Path(tmp) / "rtn-w4g32")
        # as llama-quantize's Q4_0 file: the tied head in 8 bits (its Q8_0), activations in int8
        int4_h8 = leanlm_int4(model, Path(tmp) / "rtn-w4g32-head8", "--lm-head-bits", "8")
        llama_server = [str(tree / "build/bin/llama-server"), "--host", "127.0.0.1", "-t", str(args.threads),
                        "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * slot_ctx), "-cb"]
        servers = [
            ("leanlm bf16", [sys.executable, "-m", "leanlm.cli", "serve", str(model)]),
            ("leanlm bf16 --compile", [sys.executable, "-m", "leanlm.cli", "serve", str(model), "--compile"]),
            ("llama-server f16", [*llama_server, "-m", str(files["f16"])]),
            ("leanlm int4 (RTN g32)", [sys.executable, "-m", "leanlm.cli", "serve", str(int4)]),
            ("leanlm int4, head int8, int8 activations",
             [sys.executable, "-m", "leanlm.cli", "serve", str(int4_h8), "--int8-activations"]),
            ("leanlm int4, head int8, int8 activations --compile",
             [sys.executable, "-m", "leanlm.cli", "serve", str(int4_h8), "--int8-activations", "--compile"]),
            ("llama-server Q4_0", [*llama_server, "-m", str(files["Q4_0"])]),
        ]
        if args.no_compile:
            servers = [row for row in servers if "--compile" not in row[0]]
        if args.only:
            servers = [row for row in servers if any(part in row[0] for part in args.only.split(","))]
        rows = []
        for rnd in range(args.rounds):  # servers alternate within a round; rounds repeat the whole set
            for name, cmd in servers:
                measured = serve_levels(name, cmd, levels, prompts, extra, args, rnd)
                rows += [(name, level, s) for level, s in measured]
    names = list(dict.fromkeys(name for name, _, _ in rows))
    med = lambda name, lv, key: statistics.median(s[key] for n, v, s in rows if (n, v) == (name, lv))
    print(f"\nmedians of {args.rounds} round(s):")
    print("| server | concurrency | output tok/s | TPOT median ms | TTFT median ms | TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        for lv in levels:
            cells = [f"{med(name, lv, key):.1f}" for key in ("output_throughput", "median_tpot_ms",
                                                              "median_ttft_ms", "p99_ttft_ms")]
            print(f"| {name} | {lv} | " + " | ".join(cells) + " |")
    for ours, theirs in (("leanlm bf16", "llama-server f16"), ("leanlm bf16 --compile", "llama-server f16"),
                         ("leanlm int4 (RTN g32)", "llama-server Q4_0"),
                         ("leanlm int4, head int8, int8 activations", "llama-server Q4_0"),
                         ("leanlm int4, head int8, int8 activations --compile", "llama-server Q4_0")):
        if ours in names:
            print(f"{ours} / {theirs} output throughput (medians): " + ", ".join(
                f"{med(ours, lv, 'output_throughput') / med(theirs, lv, 'output_throughput'):.2f}x at {lv}"
                for lv in levels))


def serve_levels(name: str, cmd: list[str], levels: list[int], prompts: list, extra: dict,
                 args: argparse.Namespace, rnd: int) -> list[tuple[int, dict]]:
    """One server started, warmed at each level, then measured at each level."""
    port = free_port()
    cmd = [*cmd, "--port", str(port)] + ([] if "llama-server" in cmd[0] else ["--max-num-seqs", "64"])
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(cmd, url)
    out = []
    try:
        for level in levels:  # each level's batch shape once (--compile compiles it)
            warm = bench.schedule(prompts, level, 8, float("inf"))
            asyncio.run(bench.run(url, warm, max_concurrency=level, extra=extra, keepalive=False))
        for level in levels:
            reqs = bench.schedule(prompts, args.num_prompts, args.output_len, float("inf"))
            results, wall = asyncio.run(bench.run(url, reqs, max_concurrency=level, extra=extra,
                                                  keepalive=False))
            s = bench.summarize(results, wall)
            out.append((level, s))
            print(f"round {rnd + 1} {name:22s} concurrency {level:3d}: {s['completed']}/{len(reqs)} ok, "
                  f"output "
                  f"{s['output_throughput']:7.1f} tok/s, TPOT median {s['median_tpot_ms']:6.1f} ms, "
                  f"TTFT median {s['median_ttft_ms']:8.1f} ms, p99 {s['p99_ttft_ms']:8.1f} ms"
                  + (f"; errors {s['errors']}" if s.get("errors") else ""), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


if __name__ == "__main__":
    main()
