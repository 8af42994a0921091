"""leanlm's server against llama.cpp's (llama-cpp-python[server]) on the same model and workload.

The default model is converted to GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (from the
llama-cpp-python sdist; its BPE pre-tokenizer check does not know leanlm's tokenizer, which is
GPT-2's byte-level BPE regex, so the lookup is pointed at "gpt-2"), at f16 and at Q4_0 (4-bit,
groups of 32, symmetric). leanlm serves the same checkpoint in bf16 and quantized with RTN W4
g32 (symmetric, as Q4_0). Each server runs alone on the machine's cores, and the same
``leanlm bench serve`` workload (random prompts, fixed output length, EOS banned by logit
bias so both make every token) runs at each concurrency level.

    python benchmarks/bench_llamacpp.py --llama-cpp-src /path/to/llama_cpp_python-0.3.36.tar.gz

(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` fetches the sdist.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import free_port, machine, start_server
from leanlm import DEFAULT_MODEL
from leanlm.serve import bench
from leanlm.tokenizer import load_tokenizer

CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_dir(src: Path, work: Path) -> Path:
    """The vendored llama.cpp directory of an sdist (a .tar.gz, or its extracted tree)."""
    if src.is_dir():
        found = next(src.glob("**/vendor/llama.cpp"), src)
        return found
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and any(
            part in m.name for part in ("convert_hf_to_gguf.py", "/gguf-py/", "/conversion/"))]
        tar.extractall(work, members=members, filter="data")
    return next(work.glob("*/vendor/llama.cpp"))


def convert(src: Path, work: Path) -> dict[str, Path]:
    f16 = work / "default-f16.gguf"
    subprocess.run([sys.executable, "-c", CONVERT, str(src), str(DEFAULT_MODEL), "--outfile", str(f16),
                    "--outtype", "f16"], check=True, capture_output=True)
    import llama_cpp

    q4 = work / "default-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), params) != 0:
        raise RuntimeError("llama.cpp quantization to Q4_0 failed")
    return {"f16": f16, "q4_0": q4}


def leanlm_int4(work: Path) -> Path:
    out = work / "default-rtn-w4g32"
    subprocess.run([sys.executable, "-m", "leanlm.cli", "quantize", str(DEFAULT_MODEL), "--method", "rtn",
                    "--bits", "4", "--group-size", "32", "--sym", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", type=Path, required=True, help="llama-cpp-python sdist or its tree")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    tok = load_tokenizer(DEFAULT_MODEL)
    prompts = bench.random_prompts(tok, args.num_prompts, args.input_len, seed=0)
    eos = {str(t): -100 for t in ([tok.eos_token_id] if tok.eos_token_id is not None else [])}
    extra = {"temperature": 0, "ignore_eos": True, "logit_bias": eos}
    print(f"# bench_llamacpp: default model, {args.num_prompts} requests per level, random prompts of "
          f"{args.input_len} tokens, {args.output_len} tokens out, all arriving at once, concurrency "
          f"capped at {levels}; {args.threads} threads each; {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ggufs = convert(llama_cpp_dir(args.llama_cpp_src, work), work)
        int4 = leanlm_int4(work)
        servers = [
            ("leanlm bf16", [sys.executable, "-m", "leanlm.cli", "serve", str(DEFAULT_MODEL)]),
            ("llama.cpp f16", [sys.executable, "-m", "llama_cpp.server", "--model", str(ggufs["f16"])]),
            ("leanlm int4 (RTN g32)", [sys.executable, "-m", "leanlm.cli", "serve", str(int4)]),
            ("llama.cpp Q4_0", [sys.executable, "-m", "llama_cpp.server", "--model", str(ggufs["q4_0"])]),
        ]
        rows = []
        for name, cmd in servers:
            port = free_port()
            if "llama_cpp.server" in cmd:
                cmd += ["--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.threads),
                        "--n_threads_batch", str(args.threads), "--n_batch", "512", "--verbose", "false",
                        "--interrupt_requests", "false"]  # queue concurrent requests, do not cut them off
            else:
                cmd += ["--port", str(port), "--max-num-seqs", "64"]
            url = f"http://127.0.0.1:{port}/v1"
            proc = start_server(cmd, url)
            try:
                warm = bench.schedule(prompts, 2, 8, float("inf"))
                asyncio.run(bench.run(url, warm, extra=extra))
                for level in levels:
                    reqs = bench.schedule(prompts, args.num_prompts, args.output_len, float("inf"))
                    results, wall = asyncio.run(bench.run(url, reqs, max_concurrency=level, extra=extra))
                    s = bench.summarize(results, wall)
                    rows.append((name, level, s))
                    print(f"{name:22s} concurrency {level:3d}: {s['completed']}/{len(reqs)} ok, output "
                          f"{s['output_throughput']:7.1f} tok/s, TPOT median {s['median_tpot_ms']:6.1f} ms, "
                          f"TTFT median {s['median_ttft_ms']:8.1f} ms, p99 {s['p99_ttft_ms']:8.1f} ms"
                          + (f"; errors {s['errors']}" if s.get("errors") else ""), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print("\n| server | concurrency | output tok/s | TPOT median ms | TTFT median ms | TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, level, s in rows:
        print(f"| {name} | {level} | {s['output_throughput']:.1f} | {s['median_tpot_ms']:.1f} | "
              f"{s['median_ttft_ms']:.1f} | {s['p99_ttft_ms']:.1f} |")
    by = {(n, lv): s["output_throughput"] for n, lv, s in rows}
    for ours, theirs in (("leanlm bf16", "llama.cpp f16"), ("leanlm int4 (RTN g32)", "llama.cpp Q4_0")):
        print(f"{ours} / {theirs} output throughput: " + ", ".join(
            f"{by[(ours, lv)] / by[(theirs, lv)]:.2f}x at {lv}" for lv in levels))


if __name__ == "__main__":
    main()
