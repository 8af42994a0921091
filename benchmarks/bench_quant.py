"""Post-training quantization: quality and quantization time against torchao and optimum-quanto
(default), decode speed of int4/int8 linears (--speed), GPTQ peak memory (--memory).

Quality: the embedded default model, calibrated on seeded windows of the corpus's train split
(the GPTQ protocol: --samples x --seq-len tokens) and scored on every domain's validation split,
the same non-overlapping windows for every row; everything is evaluated in bf16.

    python benchmarks/bench_quant.py [--corpus DIR] [--samples 128] [--seq-len 512]
    python benchmarks/bench_quant.py --speed     # random llama-3.2-1b shape, decode tokens/s
    python benchmarks/bench_quant.py --memory    # GPTQ on the llama-3.2-1b shape, peak RSS
    python benchmarks/bench_quant.py --resident  # RSS of the int4 model while decoding
    python benchmarks/bench_quant.py --peers     # GPTQ/AWQ against GPTQModel (quant_peers.py)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import CACHE, machine, random_model, unpacked_linears
from leanlm import DEFAULT_MODEL, Transformer, kernels, load_model, load_tokenizer
from leanlm.data.tokens import load_tokens, tokenize_corpus
from leanlm.eval.efficiency import model_bytes, tokens_per_s
from leanlm.eval.perplexity import stream_loss
from leanlm.quant import (
    AWQConfig,
    GPTQConfig,
    LLMInt8Config,
    RTNConfig,
    SmoothQuantConfig,
    quantize_,
)
from leanlm.quant.calibration import sample_windows


def corpus_dir(path: Path | None) -> Path:
    if path is not None:
        return path
    out = CACHE / "corpus"
    if not (out / "manifest.json").is_file():
        from leanlm.data.corpus import build_corpus, default_sources

        build_corpus(out, default_sources())
    return out


# ---- quality -----------------------------------------------------------------------------------
Build = Callable[[torch.Tensor], tuple[nn.Module, float]]


def leanlm_method(config: object) -> Build:
    def run(calib: torch.Tensor) -> tuple[nn.Module, float]:
        model = load_model(DEFAULT_MODEL, dtype="float32")  # calibrate in fp32, evaluate in bf16
        t0 = time.perf_counter()
        quantize_(model, config, calib, progress=False)
        return model.to(torch.bfloat16), time.perf_counter() - t0
    return run


def torchao_method(kind: str, group: int = 32) -> Build:
    def run(calib: torch.Tensor) -> tuple[nn.Module, float]:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize

        model = load_model(DEFAULT_MODEL, dtype="bfloat16")
        if kind == "int8":
            cfg = Int8WeightOnlyConfig()
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            cfg = PrototypeInt4WeightOnlyConfig(group_size=group)
        t0 = time.perf_counter()
        ao_quantize(model, cfg,
                    filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("layers."))
        elapsed = time.perf_counter() - t0
        if type(model.layers[0].mlp.up_proj.weight) is nn.Parameter:
            raise RuntimeError(f"torchao left the weights unquantized ({kind}, group {group})")
        return model, elapsed
    return run


def quanto_method(kind: str) -> Build:
    def run(calib: torch.Tensor) -> tuple[nn.Module, float]:
        from optimum.quanto import freeze, qint4, qint8
        from optimum.quanto import quantize as quanto_quantize

        model = load_model(DEFAULT_MODEL, dtype="bfloat16")
        t0 = time.perf_counter()
        quanto_quantize(model.layers, weights=qint4 if kind == "int4" else qint8)
        freeze(model.layers)
        return model, time.perf_counter() - t0
    return run


ROWS: list[tuple[str, str, int, int, Build]] = [
    # (tool, method, bits, group, build)
    ("leanlm", "RTN sym", 4, 128, leanlm_method(RTNConfig(4, 128))),
    ("leanlm", "RTN asym", 4, 128, leanlm_method(RTNConfig(4, 128, sym=False))),
    ("leanlm", "GPTQ", 4, 128, leanlm_method(GPTQConfig(4, 128))),
    ("leanlm", "GPTQ act-order", 4, 128, leanlm_method(GPTQConfig(4, 128, act_order=True))),
    ("leanlm", "AWQ", 4, 128, leanlm_method(AWQConfig(4, 128))),
    ("quanto", "qint4", 4, 128, quanto_method("int4")),
    ("leanlm", "RTN sym", 3, 128, leanlm_method(RTNConfig(3, 128))),
    ("leanlm", "RTN asym", 3, 128, leanlm_method(RTNConfig(3, 128, sym=False))),
    ("leanlm", "GPTQ", 3, 128, leanlm_method(GPTQConfig(3, 128))),
    ("leanlm", "AWQ", 3, 128, leanlm_method(AWQConfig(3, 128))),
    ("leanlm", "RTN asym", 4, 32, leanlm_method(RTNConfig(4, 32, sym=False))),
    ("leanlm", "GPTQ", 4, 32, leanlm_method(GPTQConfig(4, 32))),
    ("leanlm", "AWQ", 4, 32, leanlm_method(AWQConfig(4, 32))),
    ("torchao", "int4 weight-only", 4, 32, torchao_method("int4", 32)),
    ("leanlm", "RTN", 8, -1, leanlm_method(RTNConfig(8, -1))),
    ("torchao", "int8 weight-only", 8, -1, torchao_method("int8")),
    ("quanto", "qint8", 8, -1, quanto_method("int8")),
    ("leanlm", "SmoothQuant W8A8", 8, -1, leanlm_method(SmoothQuantConfig())),
    ("leanlm", "LLM.int8()", 8, -1, leanlm_method(LLMInt8Config())),
]


def eval_data(args: argparse.Namespace, seed: int = 0) -> tuple[Any, dict[str, np.ndarray], torch.Tensor]:
    """(tokenizer, validation tokens per domain, calibration windows [samples, seq_len]): windows
    of the corpus's train split drawn with ``seed``, scored on every domain's validation split."""
    corpus = corpus_dir(args.corpus)
    tok = load_tokenizer(DEFAULT_MODEL)
    files = tokenize_corpus(corpus, tok, CACHE / "quant-tokens", tok.eos_token_id)
    val = {d: load_tokens(f["val"]) for d, f in files.items()}
    train = np.concatenate([load_tokens(f["train"]) for f in files.values()]).astype(np.int64)
    return tok, val, sample_windows(torch.from_numpy(train), args.samples, args.seq_len, seed=seed)


def perplexity(model: nn.Module, tok: Any, val: dict[str, np.ndarray], args: argparse.Namespace) -> float:
    """exp(mean loss) over all validation windows of every domain (document-masked)."""
    s = n = 0
    for tokens in val.values():
        ds, dn = stream_loss(model, tokens, args.eval_len, tok.eos_token_id, 8, args.max_windows)
        s, n = s + ds, n + dn
    return math.exp(s / n)


def quality(args: argparse.Namespace) -> None:
    tok, val, calib = eval_data(args)

    def score(model: nn.Module) -> float:
        return perplexity(model, tok, val, args)

    fp = load_model(DEFAULT_MODEL, dtype="bfloat16")
    fp_ppl, fp_size = score(fp), model_bytes(fp)
    print(f"# bench_quant quality: default model, {machine()}")
    print(f"# calibration {args.samples} x {args.seq_len} train tokens (seed 0); eval: val splits of "
          f"{', '.join(val)}, windows of {args.eval_len}, bf16")
    print("| tool | method | bits | group | ppl | Δppl | Δ% | weights MiB | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| — | bf16 | 16 | — | {fp_ppl:.3f} | — | — | {fp_size / 2**20:.1f} | — |")
    results = {}
    for tool, name, bits, group, build in ROWS:
        if args.only and args.only not in f"{tool} {name}":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model, secs = build(calib)
            except Exception as e:  # a peer that cannot run this shape: say so in the table
                print(f"| {tool} | {name} | {bits} | {group} | failed: {str(e)[:80]} |")
                continue
            ppl = score(model)
        size = f"{model_bytes(model) / 2**20:.1f}" if tool == "leanlm" else "n/a"
        results[(tool, name, bits, group)] = ppl
        g = "ch" if group == -1 else group
        print(f"| {tool} | {name} | {bits} | {g} | {ppl:.3f} | {ppl - fp_ppl:+.3f} | "
              f"{100 * (ppl / fp_ppl - 1):+.2f} | {size} | {secs:.1f} |", flush=True)
        if args.int8_activations and tool == "leanlm" and bits in (4, 8) and "A8" not in name:
            with kernels.quantizing_activations(True):  # the same model, int8 activations on VNNI
                ppl = score(model)
            print(f"| {tool} | {name}, int8 activations (W{bits}A8) | {bits} | {g} | {ppl:.3f} | "
                  f"{ppl - fp_ppl:+.3f} | {100 * (ppl / fp_ppl - 1):+.2f} | {size} | {secs:.1f} |",
                  flush=True)
    checks(results, fp_ppl)


def checks(r: dict, fp: float) -> None:
    def inc(tool: str, name: str, bits: int, group: int) -> float:
        return r.get((tool, name, bits, group), float("nan")) - fp

    print()
    for rtn_name in ("RTN sym", "RTN asym"):
        rtn = inc("leanlm", rtn_name, 4, 128)
        for m in ("GPTQ", "AWQ"):
            ratio = inc("leanlm", m, 4, 128) / rtn
            print(f"W4 g128: {m} Δppl / {rtn_name} Δppl = {ratio:.2f} (target <= 0.5)")
    for m in ("GPTQ", "AWQ"):
        w3 = [inc("leanlm", n, 3, 128) for n in (m, "RTN sym", "RTN asym")]
        print(f"W4 g128: {m} Δ% = {100 * inc('leanlm', m, 4, 128) / fp:.2f} (target < 5); "
              f"W3 g128: {m} Δppl {w3[0]:+.3f} vs RTN sym {w3[1]:+.3f} / asym {w3[2]:+.3f}")
    print(f"W8A8 SmoothQuant Δ% = {100 * inc('leanlm', 'SmoothQuant W8A8', 8, -1) / fp:.2f} (target <= 1)")


# ---- speed ------------------------------------------------------------------------------------------
def random_1b(seed: int = 0) -> Transformer:
    return random_model("llama-3.2-1b", torch.bfloat16, seed)


def speed(args: argparse.Namespace) -> None:
    print(f"# bench_quant --speed: random llama-3.2-1b shape (bf16), batch 1, {machine()}")
    every_linear = lambda name, m: True
    # "F.linear": bf16 without the prepacked CPU linears (LEANLM_KERNELS=reference), the baseline
    # before kernels/cpu_linear.py
    rows = [("bf16", None, None), ("bf16, F.linear", None, None),
            ("int8 per-channel", RTNConfig(8, -1), every_linear),
            ("int4 g128", RTNConfig(4, 128), every_linear),
            ("int4 g128, LM head left in bf16", RTNConfig(4, 128), None)]
    rates: dict[str, list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for name, cfg, filter_fn in rows:
            model = random_1b()
            if cfg is not None:
                quantize_(model, cfg, filter_fn=filter_fn, progress=False)
            with unpacked_linears() if name.endswith("F.linear") else contextlib.nullcontext():
                rates.setdefault(name, []).append(tokens_per_s(model))
            del model
        print(f"round {rnd}: " + ", ".join(f"{k} {v[-1][0]:.2f} / {v[-1][1]:.1f} tok/s"
                                           for k, v in rates.items()), flush=True)
    base = [float(np.median([r[i] for r in rates["bf16"]])) for i in (0, 1)]
    print("| weights | decode tokens/s | vs bf16 | prefill (128 tokens) tokens/s | vs bf16 |")
    print("|---|---|---|---|---|")
    for name, v in rates.items():
        dec, pre = (float(np.median([r[i] for r in v])) for i in (0, 1))
        print(f"| {name} | {dec:.2f} | {dec / base[0]:.2f}x | {pre:.1f} | {pre / base[1]:.2f}x |")


# ---- memory ----------------------------------------------------------------------------------------
def memory(args: argparse.Namespace) -> None:
    if not args.child:
        cmd = [sys.executable, __file__, "--memory", "--child", "--samples", str(args.samples),
               "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(out.stdout, out.stderr[-2000:] if out.returncode else "", sep="")
        return
    model = random_1b()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    calib = torch.randint(0, 128000, (args.samples, args.seq_len))
    t0 = time.perf_counter()
    quantize_(model, GPTQConfig(4, 128), calib, batch_size=4, progress=False)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"# bench_quant --memory: GPTQ W4 g128 on a random llama-3.2-1b shape, calibration "
          f"{args.samples} x {args.seq_len}, {machine()}")
    print(f"bf16 model {size / 2**30:.2f} GiB; peak RSS after building it {rss0 / 2**30:.2f} GiB; "
          f"peak RSS while quantizing {peak / 2**30:.2f} GiB = {peak / size:.2f}x the model "
          f"(target < 2x); {secs:.0f} s")


def resident(args: argparse.Namespace) -> None:
    """Resident memory of a bf16 vs an int4 (all linears, RTN g128) 1B-shaped model, decoding."""
    import ctypes
    import gc

    import psutil

    proc = psutil.Process()
    libc = ctypes.CDLL("libc.so.6")

    def rss() -> int:  # live memory: return the allocator's free heap pages to the OS first
        gc.collect()
        libc.malloc_trim(0)
        return proc.memory_info().rss

    model = random_1b()
    bf16 = rss()
    quantize_(model, RTNConfig(4, 128), filter_fn=lambda name, m: True, progress=False)
    after = rss()
    decode, _ = tokens_per_s(model, steps=6, prompt=16)
    decoding = rss()
    print(f"# bench_quant --resident: random llama-3.2-1b shape, {machine()}")
    print(f"RSS: bf16 model {bf16 / 2**30:.2f} GiB; int4 after quantizing {after / 2**30:.2f} GiB; "
          f"int4 after prefill + decode ({decode:.1f} tok/s) {decoding / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0, help="per domain (0 = all)")
    ap.add_argument("--int8-activations", action="store_true", help="also score each leanlm 4/8-bit "
                    "weight-only model with int8 activations (LEANLM_INT8_ACTIVATIONS, needs AVX512-VNNI)")
    ap.add_argument("--only", default="", help="run only rows whose 'tool method' contains this")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--resident", action="store_true", help="RSS of the int4 model while decoding")
    ap.add_argument("--peers", action="store_true", help="GPTQ/AWQ against GPTQModel (quant_peers.py)")
    ap.add_argument("--peer-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None, help="--speed: 3, --peers: 1 (per seed)")
    ap.add_argument("--seeds", type=int, default=5, help="--peers: calibration sets (seeds 0..N-1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peers or args.peer_child:
        import quant_peers

        args.samples, args.seq_len, args.rounds = args.samples or 128, args.seq_len or 512, args.rounds or 1
        if args.peer_child:
            quant_peers.child(args.peer_child)
        else:
            quant_peers.peers(args, eval_data, perplexity)
    elif args.resident:
        resident(args)
    elif args.memory:
        args.samples, args.seq_len = args.samples or 16, args.seq_len or 512
        memory(args)
    elif args.speed:
        args.rounds = args.rounds or 3
        speed(args)
    else:
        args.samples, args.seq_len = args.samples or 128, args.seq_len or 512
        quality(args)


if __name__ == "__main__":
    main()
