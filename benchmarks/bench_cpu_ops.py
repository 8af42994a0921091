"""leanlm's C++ CPU ops (``kernels/cpu_ops.py``) against the torch references they replace, in one run.

1. Paged decode attention alone: the default model's attention shape (5 heads of 64, bf16), R
   requests of ~190 keys in 16-slot blocks scattered over a large cache, the torch reference
   (``paged_attention.decode_reference``: gathers an fp32 copy of every request's K/V) against
   ``leanlm_cpu::paged_decode``; hot (the same call again) and cold (caches evicted by a 64 MB
   write between calls, as a decode step's weights evict them), medians, interleaved.
2. The offline serving engine on the default model (bf16): a prefill step of one 128-token prompt
   and decode steps at batch B (128-token prompts), with the kernel mode ``reference`` (every
   op a torch reference) against ``auto`` (the C++ ops), interleaved, medians of step times.
3. ``--int4``: the 4-bit GEMM alone (``leanlm_cpu::int4pack_mm``) against torch's
   ``_weight_int4pack_mm_for_cpu`` on the same packing, and the bf16 product on oneDNN's
   prepacked weight (what the bf16 model runs), on the default model's and a 1B model's layer
   shapes (group 32), at 1 / 4 / 8 / 16 / 32 rows; medians of interleaved calls. Then the
   engine's steps (as in 2.) on the default model (or ``--model``) quantized to 4 bits (RTN, group 32), with
   torch's int4 kernel at every row count against leanlm's from ``cpu_ops.INT4_MIN_ROWS`` rows.
   On CPUs with AVX512-VNNI, W4A8 too (``leanlm_cpu::vnni_mm``: the activations rounded to int8
   per group, ``LEANLM_INT8_ACTIVATIONS``), in the GEMM table and in engine steps against bf16 activations.
4. ``--bf16``: leanlm's bf16 GEMM (``leanlm_cpu::bf16_mm``, 64-row blocks) against oneDNN's bf16
   and fp32 GEMMs on prepacked weights, at 1 / 4 / 8 / 16 / 32 / 128 rows, on the default
   model's and a 1B model's layer shapes; medians of interleaved calls. Then the engine's steps
   on the default model (or ``--model``) packed for oneDNN's bf16 GEMM against leanlm's. On CPUs
   with AVX512-BF16 or AMX oneDNN runs bf16 natively (and ``auto`` keeps it); without them it
   emulates bf16, the case leanlm's GEMM is for.

    python benchmarks/bench_cpu_ops.py [--batches 1 8 32] [--rounds 3] [--int4 | --bf16] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import torch

from common import machine
from leanlm import DEFAULT_MODEL, kernels
from leanlm.checkpoint import load_model
from leanlm.kernels import cpu_ops, cpu_vnni
from leanlm.kernels import paged_attention as pa
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import EngineConfig, LLMEngine


def timed(fn: Callable[[], object], evict: torch.Tensor | None) -> float:
    if evict is not None:
        evict.add_(1)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attention(requests: int, calls: int) -> None:
    g = torch.Generator().manual_seed(requests)
    heads, d, bs, blocks = 5, 64, 16, 4096
    k_cache = torch.randn(blocks * bs, heads, d, generator=g).bfloat16()
    v_cache = torch.randn(blocks * bs, heads, d, generator=g).bfloat16()
    tables = torch.randperm(blocks, generator=g)[:requests * 13].view(requests, 13).int()
    lens = torch.randint(180, 200, (requests,), generator=g)
    q = torch.randn(requests, heads, d, generator=g).bfloat16()
    scale, evict = d**-0.5, torch.zeros(16 << 20)
    fns = {"torch reference": lambda: pa.decode_reference(q, k_cache, v_cache, tables, lens, int(lens.max()),
                                                          bs, scale, None),
           "C++ paged_decode": lambda: cpu_ops.ops().paged_decode(q, k_cache, v_cache, tables, lens, bs,
                                                                  scale, -1)}
    for fn in fns.values():
        fn()
    for label, ev in (("hot", None), ("cold", evict)):
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(calls):
            for name, fn in fns.items():
                times[name].append(timed(fn, ev))
        ref, ours = (statistics.median(times[n]) * 1e3 for n in fns)
        print(f"attention, {requests:2d} requests x ~190 keys, {label:4s}: reference {ref:.3f} ms, "
              f"C++ {ours:.3f} ms ({ref / ours:.1f}x)", flush=True)


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


Mode = tuple[torch.nn.Module, Callable[[], AbstractContextManager]]  # a model, and a context to run it in


def engine_steps(modes: dict[str, Mode], batches: list[int], rounds: int) -> None:
    """Prefill and decode step times of the offline engine under each of ``modes`` (two: the
    baseline first), interleaved, medians."""
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(3, 8000) for _ in range(128)]
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for mode, (model, context) in modes.items():
            with context(), torch.inference_mode():
                engine = LLMEngine(model, EngineConfig())
                one = SamplingParams(max_tokens=1, ignore_eos=True)
                for _ in range(3):  # prefill steps of one prompt
                    engine.add_request(prompt(), one)
                    results.setdefault(("prefill 128 tokens", mode), []).append(timed(engine.step, None))
                    drain(engine)
                for b in batches:
                    for _ in range(b):
                        engine.add_request(prompt(), SamplingParams(max_tokens=40, ignore_eos=True))
                    sched = engine.scheduler
                    while any(not r.output_token_ids for r in sched.running) or sched.waiting:
                        engine.step()  # every prompt prefilled: the steps timed below are decodes
                    steps = results.setdefault((f"decode step, batch {b}", mode), [])
                    steps += [timed(engine.step, None) for _ in range(20)]
                    drain(engine)
    base, ours = modes
    for what in dict.fromkeys(k for k, _ in results):
        ref, new = (statistics.median(results[what, m]) * 1e3 for m in (base, ours))
        print(f"engine {what:22s}: {base} {ref:7.2f} ms, {ours} {new:7.2f} ms ({ref / new:.2f}x)", flush=True)


@contextlib.contextmanager
def torch_int4() -> Iterator[None]:
    """int4 layers on torch's kernel at every row count (leanlm's int4 GEMM off)."""
    rows = cpu_ops.INT4_MIN_ROWS
    cpu_ops.INT4_MIN_ROWS = 1 << 30
    try:
        yield
    finally:
        cpu_ops.INT4_MIN_ROWS = rows


def int4_engine(path: Path, batches: list[int], rounds: int) -> None:
    """Engine steps of the model at ``path`` quantized to 4 bits (RTN, group 32), torch's int4
    kernel against leanlm's from INT4_MIN_ROWS rows."""
    from leanlm.quant import RTNConfig, quantize_

    model = load_model(path, dtype="bfloat16")
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    print(f"int4 (RTN g32) {path.name}:")
    engine_steps({"torch int4": (model, torch_int4), "leanlm int4": (model, contextlib.nullcontext)},
                 batches, rounds)
    if cpu_vnni.available():
        print(f"int4 (RTN g32) {path.name}, bf16 against int8 activations:")
        engine_steps({"leanlm int4": (model, contextlib.nullcontext),
                      "leanlm W4A8": (model, partial(kernels.quantizing_activations, True))}, batches, rounds)


INT4_SHAPES = [(320, 320), (864, 320), (320, 864), (2048, 2048), (8192, 2048), (2048, 8192)]  # [out, in]


def interleaved_us(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median µs of each of ``fns``, called in turn ``calls`` times (after 5 warm-up turns), so no
    function finds its weight in cache from its own last call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(5):
        for fn in fns.values():
            fn()
    for _ in range(calls):
        for name, fn in fns.items():
            times[name].append(timed(fn, None))
    return {name: statistics.median(v) * 1e6 for name, v in times.items()}


def int4_gemm(rows: list[int], calls: int) -> None:
    """The int4 GEMM against torch's on one packing (and bf16 prepacked; and W4A8 on its own
    packing, where the CPU has VNNI), interleaved, medians."""
    from leanlm.quant.linear import int4pack

    gs = 32
    vnni = cpu_vnni.available()
    print("| weight [out × in] | rows | torch int4 µs | leanlm int4 µs | bf16 prepacked µs | "
          "leanlm / torch |" + (" leanlm W4A8 µs | W4A8 / best int4 |" if vnni else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if vnni else ""))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, k in INT4_SHAPES:
            codes = torch.randint(0, 16, (n + (-n) % 64, k), generator=g)
            packed = int4pack(codes)
            sz = torch.randn(k // gs, codes.shape[0], 2, generator=g).to(torch.bfloat16)
            plain = torch.randn(n, k, generator=g).to(torch.bfloat16)
            dense = torch.ops.mkldnn._reorder_linear_weight(plain, None)
            w4a8 = (cpu_vnni.pack(codes, 4), cpu_vnni.block_scales(sz)) if vnni else None
            for m in rows:
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                fns = {"torch": partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, gs, sz),
                       "leanlm": partial(cpu_ops.int4pack_mm, x, packed, sz, gs),
                       "bf16": partial(torch.ops.mkldnn._linear_pointwise, x, dense, None, "none", [], "")}
                if w4a8:
                    fns["w4a8"] = partial(cpu_vnni.mm, x, *w4a8, gs, 4)
                t = interleaved_us(fns, calls)
                best = min(t["torch"], t["leanlm"])
                extra = f" {t['w4a8']:.1f} | {best / t['w4a8']:.2f}x |" if w4a8 else ""
                print(f"| {n}×{k} | {m} | {t['torch']:.1f} | {t['leanlm']:.1f} | {t['bf16']:.1f} | "
                      f"{t['torch'] / t['leanlm']:.2f}x |" + extra, flush=True)


BF16_SHAPES = [(320, 320), (960, 320), (864, 320), (320, 864), (8192, 320), (2048, 2048), (8192, 2048),
               (2048, 8192)]  # [out, in]: the default model's (q, qkv fused, gate, down, head) and a 1B's


def bf16_gemm(rows: list[int], calls: int) -> None:
    """leanlm's bf16 GEMM on 64-row blocks against oneDNN's bf16 and fp32 on prepacked weights,
    interleaved, medians."""
    from leanlm.kernels.cpu_linear import to_blocks

    print("| weight [out × in] | rows | oneDNN bf16 µs | oneDNN fp32 µs | leanlm bf16 µs | "
          "leanlm / oneDNN bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, k in BF16_SHAPES:
            w = torch.randn(n, k, generator=g).to(torch.bfloat16)
            blocks = to_blocks(w)
            packed = {dt: torch.ops.mkldnn._reorder_linear_weight(w.to(dt), None) for dt in (torch.bfloat16,
                                                                                              torch.float32)}
            for m in rows:
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                xf = x.float()
                fns = {"bf16": partial(torch.ops.mkldnn._linear_pointwise, x, packed[torch.bfloat16], None,
                                       "none", [], ""),
                       "fp32": partial(torch.ops.mkldnn._linear_pointwise, xf, packed[torch.float32], None,
                                       "none", [], ""),
                       "leanlm": partial(cpu_ops.bf16_mm, x, blocks, None, n)}
                t = interleaved_us(fns, calls)
                print(f"| {n}×{k} | {m} | {t['bf16']:.1f} | {t['fp32']:.1f} | {t['leanlm']:.1f} | "
                      f"{t['bf16'] / t['leanlm']:.2f}x |", flush=True)


def bf16_engine(path: Path, batches: list[int], rounds: int) -> None:
    """Engine steps of the bf16 model at ``path`` packed for oneDNN's GEMM and for leanlm's."""
    def packed_for(gemm: str) -> torch.nn.Module:
        with kernels.bf16_gemm_kernel(gemm):
            return load_model(path, dtype="bfloat16", pack=True)

    print(f"bf16 {path.name}:")
    engine_steps({"oneDNN": (packed_for("onednn"), contextlib.nullcontext),
                  "leanlm": (packed_for("leanlm"), contextlib.nullcontext)}, batches, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--int4", action="store_true", help="only the int4 GEMM (section 3)")
    ap.add_argument("--bf16", action="store_true", help="only the bf16 GEMM (section 4)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="--int4/--bf16: the model of the engine steps")
    args = ap.parse_args()
    print(f"# bench_cpu_ops: {machine()}", flush=True)
    if cpu_ops.ops() is None:
        raise SystemExit("leanlm's C++ CPU ops could not be built here")
    if args.int4:
        int4_gemm([1, 4, 8, 16, 32], max(20, args.calls // 4))
        int4_engine(args.model, args.batches, args.rounds)
        return
    if args.bf16:
        bf16_gemm([1, 4, 8, 16, 32, 128], max(20, args.calls // 4))
        bf16_engine(args.model, args.batches, args.rounds)
        return
    for requests in (8, 32):
        attention(requests, args.calls)
    model = load_model(DEFAULT_MODEL, pack=True)
    modes = {"reference": (model, partial(kernels.kernel_mode, "reference")),
             "C++ ops": (model, partial(kernels.kernel_mode, "auto"))}
    engine_steps(modes, args.batches, args.rounds)


if __name__ == "__main__":
    main()
