"""Batch-1 decode against llama.cpp's own ``llama-bench``, same checkpoint, same machine, one run.

llama.cpp is built from the sources vendored in the llama-cpp-python sdist (``llama-bench`` and
``llama-quantize``, CMake, ``GGML_NATIVE``), the checkpoint converted with its own
``convert_hf_to_gguf.py`` to f16 and quantized with its own ``llama-quantize`` to Q4_0 (4 bits,
groups of 32, symmetric) and Q8_0 (8 bits, groups of 32). llama-bench's ``tg`` test (``-p 0 -n
N``: N tokens generated one at a time from an empty context, ``-t`` threads) against leanlm's
decode of the same N tokens at batch 1 after a one-token prompt, per token (``(t(N) − t(1)) /
(N − 1)``, so the prefill is excluded as llama-bench's tg excludes it); median of ``--rounds``,
leanlm and llama.cpp alternating so that the machine's noise hits both; each quantized row's
rounds decode with the bf16 model too, so its "vs leanlm bf16" ratio is measured alongside.
leanlm runs bf16 (packed at load), RTN W4 g32 symmetric (as Q4_0), RTN W8 per-channel (bf16
activations) and SmoothQuant W8A8 (int8 activations per token, as Q8_0 × Q8), each with the head
in bf16 (leanlm's default) and, for RTN, with the head quantized too (``quantize_(...,
lm_head=...)``: int4 with an 8- or 4-bit head, int8 with an 8-bit one): llama-quantize stores the
tied output/embedding tensor quantized (Q6_K for Q4_0, Q8_0 for Q8_0). Differences the table
shows rather than hides: the bytes each reads per token, and leanlm's weight-only kernels take
bf16 activations where llama.cpp quantizes activations to 8 bits (the W8A8 row does too, and
on AVX512-VNNI CPUs the rows with int8 activations, ``--int8-activations``: per group of 32 for
4 bits, as Q8_0's blocks, per 128 columns for 8 bits per channel).

    python benchmarks/bench_llamabench.py [--llama-cpp-src llama_cpp_python-0.3.36.tar.gz] [--rounds 3]
    python benchmarks/bench_llamabench.py --own   # leanlm only: int4/int8 bodies x head formats vs bf16
    python benchmarks/bench_llamabench.py --profile   # + each row's GEMM time and bandwidth

``--own`` holds the bf16 model and one int4 and one int8 body in memory and swaps the head module
(bf16 packed, int8 per channel, int4 g32) between decodes, every variant in every round, so the
ratios to bf16 come from interleaved measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
from pathlib import Path

import torch

import leanlm
from bench_cpu_start import checkpoint
from bench_generate import per_token
from common import machine, read_bandwidth
from leanlm import kernels
from leanlm.generate import generate
from leanlm.kernels import cpu_vnni
from leanlm.quant import RTNConfig, SmoothQuantConfig, quantize_
from leanlm.quant.rtn import RTN
from leanlm.sampling import SamplingParams
from llamacpp import SDIST, build, ggufs

A8 = "a8:"  # rows run with int8 activations (leanlm.kernels.cpu_vnni; AVX512-VNNI CPUs only)


def llama_bench(tree: Path, gguf: Path, new: int, threads: int) -> tuple[float, int]:
    """(seconds per generated token of one llama-bench tg run, the model's bytes)."""
    out = subprocess.run([str(tree / "build/bin/llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(new),
                          "-r", "1", "-t", str(threads), "-o", "json"], check=True,
                         capture_output=True, text=True)
    row = json.loads(out.stdout)[0]
    return 1e-9 * row["samples_ns"][0] / new, int(row["model_size"])


def leanlm_decode(model: torch.nn.Module, new: int) -> float:
    def run(n: int) -> list[list[int]]:
        return generate(model, [[1]], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    return per_token(run, new, 1)


# the ops that multiply by a weight in a CPU decode step (leanlm's C++ GEMMs, torch's int4/int8
# packed kernels, oneDNN's prepacked linear, plain matmuls)
GEMMS = ("leanlm_cpu::vnni_mm", "leanlm_cpu::int4pack_mm", "leanlm_cpu::bf16_mm",
         "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
         "aten::mm", "aten::addmm")


def gemm_seconds(model: torch.nn.Module, new: int) -> float:
    """Seconds per token inside the weight GEMMs: their self time in a profile of one ``new``-token
    decode (a one-token prompt, then ``new`` − 1 steps: ``new`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    generate(model, [[1]], params)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, [[1]], params)
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMMS) * 1e-6 / new


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding (one row of it)
    and the rotary table; a tied head counts once, as the head."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("embed_tokens") or name == "inv_freq" or id(t) in seen:
            continue
        seen.add(id(t))
        total += torch.ops.mkldnn._nbytes(t) if t.is_mkldnn else t.numel() * t.element_size()
    for m in model.modules():  # int4 layers hold their codes in a kernel's packed layout
        for packed in getattr(m, "_kernels", {}).values():
            for x in packed:
                if isinstance(x, torch.Tensor) and id(x) not in seen:
                    seen.add(id(x))
                    total += x.numel() * x.element_size()
    return total


def own(path: Path, new: int, rounds: int) -> None:
    """Interleaved leanlm-only decode: bf16, and int4 / int8 bodies with each head format."""
    bf16 = leanlm.load_model(path, pack=True)
    variants: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {"bf16": (bf16, bf16.lm_head)}
    bodies = (("int4 (RTN W4 g32)", RTNConfig(4, 32), (RTNConfig(8, -1), RTNConfig(4, 32))),
              ("int8 (RTN W8 per channel)", RTNConfig(8, -1), (RTNConfig(8, -1),)))
    for body, config, head_configs in bodies:
        model = quantize_(leanlm.load_model(path), config, progress=False)
        variants[f"{body}, head bf16"] = (model, model.lm_head)
        for hc in head_configs:
            head = RTN(hc).quantize_linear("lm_head", model.lm_head)
            groups = "per channel" if hc.group_size < 0 else f"g{hc.group_size}"
            variants[f"{body}, head W{hc.bits} {groups}"] = (model, head)
        model.lm_head.pack_()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (model, head) in variants.items():
            model.lm_head = head
            times[name].append(leanlm_decode(model, new))
    base = statistics.median(times["bf16"])
    print("| weights | ms/token | GB read | vs bf16 |\n|---|---:|---:|---:|")
    for name, (model, head) in variants.items():
        model.lm_head = head
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {weight_bytes(model) / 1e9:.2f} | {base / t:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", type=Path, default=SDIST)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--own", action="store_true", help="leanlm only: quantized bodies and heads vs bf16")
    ap.add_argument("--only", default="", help="comma-separated parts of row names: only those rows")
    ap.add_argument("--profile", action="store_true",
                    help="also each leanlm row's GEMM time per token and the bandwidth it reads weights at")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    path = checkpoint(args.preset)
    if args.own:
        print(f"# bench_llamabench --own: {args.preset} (random weights), batch 1, {args.new_tokens} tokens, "
              f"median of {args.rounds} interleaved rounds, {threads} threads; {machine()}", flush=True)
        own(path, args.new_tokens, args.rounds)
        return
    tree = build(args.llama_cpp_src, ("llama-bench", "llama-quantize"))
    files = ggufs(tree, path)
    print(f"# bench_llamabench: {args.preset} bf16 (random weights), batch 1, {args.new_tokens} tokens, "
          f"median of {args.rounds} rounds (leanlm and llama.cpp alternating), {threads} threads; "
          f"{machine()}", flush=True)
    calib = torch.randint(0, 8000, (4, 64), generator=torch.Generator().manual_seed(0))
    rows = [("bf16", "f16", None, False),
            ("int4 (RTN W4 g32 sym)", "Q4_0", RTNConfig(4, 32), False),
            (A8 + "int4 W4A8 (RTN W4 g32 sym, int8 activations)", "Q4_0", RTNConfig(4, 32), False),
            (A8 + "int4 W4A8, head W8A8 (RTN W4 g32 sym, head W8 per channel, int8 activations)", "Q4_0",
             RTNConfig(4, 32), RTNConfig(8, -1)),
            (A8 + "int4 W4A8, head W4A8 (RTN W4 g32 sym, int8 activations)", "Q4_0", RTNConfig(4, 32), True),
            ("int4, head int8 (RTN W4 g32 sym, head W8 per channel)", "Q4_0", RTNConfig(4, 32),
             RTNConfig(8, -1)),
            ("int4, head int4 (RTN W4 g32 sym)", "Q4_0", RTNConfig(4, 32), True),
            ("int8 (RTN W8 per channel, bf16 activations)", "Q8_0", RTNConfig(8, -1), False),
            ("int8, head too (RTN W8 per channel)", "Q8_0", RTNConfig(8, -1), True),
            (A8 + "int8 W8A8, head too (RTN W8 per channel, int8 activations)", "Q8_0", RTNConfig(8, -1),
             True),
            ("int8 W8A8 (SmoothQuant, per-token int8 activations)", "Q8_0", SmoothQuantConfig(), False)]
    print("| weights | leanlm ms/token | GB read | llama.cpp | ms/token | GB read | leanlm speed-up "
          "| vs leanlm bf16 (same rounds) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|", flush=True)
    bf16 = leanlm.load_model(path, pack=True)  # decoded in every row's rounds: "vs leanlm bf16"
    if not cpu_vnni.available():
        rows = [row for row in rows if not row[0].startswith(A8)]
    if args.only:
        rows = [row for row in rows if any(part in row[0] for part in args.only.split(","))]
    for name, kind, config, head in rows:  # one quantized model in memory at a time
        a8 = name.startswith(A8)
        name = name.removeprefix(A8)
        model = bf16
        if config is not None:
            model = leanlm.load_model(path)
            quantize_(model, config, calib if isinstance(config, SmoothQuantConfig) else None, lm_head=head,
                      progress=False)
            model.pack_weights_()  # the head, where it stays bf16
        ours, base, theirs = [], [], []
        for _ in range(args.rounds):
            if model is not bf16:
                base.append(leanlm_decode(bf16, args.new_tokens))
            with kernels.quantizing_activations(a8):
                ours.append(leanlm_decode(model, args.new_tokens))
            seconds, size = llama_bench(tree, files[kind], args.new_tokens, threads)
            theirs.append(seconds)
        a, b = statistics.median(ours), statistics.median(theirs)
        ref = statistics.median(base) if base else a
        print(f"| {name} | {a * 1e3:.1f} | {weight_bytes(model) / 1e9:.2f} | {kind} | {b * 1e3:.1f} | "
              f"{size / 1e9:.2f} | **{b / a:.2f}x** | {ref / a:.2f}x |", flush=True)
        if args.profile:  # the weights' bytes over the GEMMs' time: how near the memory bound
            with kernels.quantizing_activations(a8):
                gemm = gemm_seconds(model, args.new_tokens)
            rate, read = weight_bytes(model) / gemm / 1e9, read_bandwidth()
            print(f"|   profile: GEMMs {gemm * 1e3:.1f} of {a * 1e3:.1f} ms/token, weights read at "
                  f"{rate:.1f} GB/s = {100 * rate / read:.0f}% of the read bandwidth ({read:.1f} GB/s) |",
                  flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
