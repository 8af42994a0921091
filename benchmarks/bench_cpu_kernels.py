"""CPU linear kernels at decode shapes, streamed from memory, against the measured bandwidth.

A decode step multiplies one row (or a few) by every weight of the model once, so each weight
comes from DRAM, not from cache. Each kernel here runs over a set of distinct weights of one
shape whose bytes exceed the last-level cache many times (``--bytes``, 512 MiB of bf16 by
default), one pass timed (median of ``--repeats``), and reports microseconds per layer and the
weight bytes it streamed per second, against the machine's copy bandwidth (bytes read + written
per second, as ``common.machine`` measures it). Kernels:

- bf16 ``F.linear`` (oneDNN re-lays the weight out on every call) and bf16 prepacked
  (``kernels/cpu_linear.py``: what leanlm's bf16 models run);
- int8 weight-only (``torch._weight_int8pack_mm``, bf16 activations: leanlm's RTN/GPTQ 8-bit);
- int8 × int8 (oneDNN's quantized linear, ``kernels/cpu_int8.py``: leanlm's W8A8), the kernel
  alone and with the per-token activation quantization ``W8A8Linear`` does around it;
- int4 weight-only (``torch._weight_int4pack_mm_for_cpu``, bf16 activations, groups of 32 and
  128: leanlm's RTN/GPTQ/AWQ 4-bit).

    python benchmarks/bench_cpu_kernels.py [--rows 1 16] [--shapes 2048x8192 8192x2048 2048x2048]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common import copy_bandwidth, machine
from leanlm.kernels import cpu_int8
from leanlm.quant.linear import absmax_int8

Kernel = Callable[[torch.Tensor], torch.Tensor]


def layers(n: int, k: int, count: int) -> list[dict[str, object]]:
    """``count`` distinct random weights [n, k] in every kernel's layout."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        s8 = w.float().abs().amax(1) / 127
        w8 = torch.round(w.float() / s8[:, None]).clamp(-127, 127).to(torch.int8)
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        out.append({
            "plain": w, "packed": torch.ops.mkldnn._reorder_linear_weight(w), "w8": w8, "s8": s8,
            "s8_bf16": s8.bfloat16(), "q8": cpu_int8.pack(w8),
            "zeros": torch.zeros(n, dtype=torch.int64),
            "int4": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2),
            **{f"sz{gs}": torch.randn(k // gs, n, 2, generator=g).bfloat16() for gs in (32, 128)},
        })
    return out


def kernels_for(n: int, k: int) -> dict[str, tuple[Callable[[dict, torch.Tensor], torch.Tensor], float]]:
    """name -> (fn(layer, x), weight bytes per layer)."""
    def w8a8(layer: dict, x: torch.Tensor) -> torch.Tensor:
        xq, xs = absmax_int8(x)
        return cpu_int8.int8_mm(xq, layer["q8"], layer["s8"], layer["zeros"]) * xs

    def w8a8_kernel(layer: dict, x: torch.Tensor) -> torch.Tensor:
        return cpu_int8.int8_mm(layer["xq"], layer["q8"], layer["s8"], layer["zeros"])

    def int4(gs: int) -> Callable[[dict, torch.Tensor], torch.Tensor]:
        return lambda L, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, L["int4"], gs, L[f"sz{gs}"])

    def packed_bf16(layer: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer["packed"], None, "none", [], "")

    return {
        "bf16 F.linear": (lambda L, x: F.linear(x, L["plain"]), 2 * n * k),
        "bf16 prepacked": (packed_bf16, 2 * n * k),
        "int8 weight-only (_weight_int8pack_mm)": (lambda L, x: torch.ops.aten._weight_int8pack_mm(
            x, L["w8"], L["s8_bf16"]), n * k + 2 * n),
        "int8 x int8 (oneDNN), kernel": (w8a8_kernel, n * k + 4 * n),
        "int8 x int8 (oneDNN), with per-token quantization": (w8a8, n * k + 4 * n),
        **{f"int4 g{gs} (_weight_int4pack_mm_for_cpu)": (int4(gs), n * k // 2 + 4 * n * (k // gs))
           for gs in (32, 128)},
    }


def one_pass(fn: Callable[[dict, torch.Tensor], torch.Tensor], ws: list[dict], x: torch.Tensor) -> None:
    for layer in ws:
        fn(layer, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=["2048x8192", "8192x2048", "2048x2048"],
                    help="OUTxIN weight shapes")
    ap.add_argument("--bytes", type=int, default=512 << 20, help="bf16 bytes of distinct weights per shape")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"# bench_cpu_kernels: one pass over distinct weights (> cache), median of {args.repeats}; "
          f"{machine()}")
    print("| weight [out x in] | rows | kernel | µs per layer | weight GB/s | of copy bandwidth "
          "| vs bf16 prepacked |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            ws = layers(n, k, max(2, args.bytes // (2 * n * k)))
            for m in args.rows:
                x = torch.randn(m, k).bfloat16()
                xq, _ = absmax_int8(x)
                for layer in ws:
                    layer["xq"] = xq
                times = {}
                for name, (fn, nbytes) in kernels_for(n, k).items():
                    one_pass(fn, ws, x)
                    samples = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        one_pass(fn, ws, x)
                        samples.append((time.perf_counter() - t0) / len(ws))
                    times[name] = (statistics.median(samples), nbytes)
                base = times["bf16 prepacked"][0]
                for name, (sec, nbytes) in times.items():
                    print(f"| {n}x{k} | {m} | {name} | {sec * 1e6:.1f} | {nbytes / sec / 1e9:.1f} | "
                          f"{nbytes / sec / 1e9 / bw:.0%} | {base / sec:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
