"""Paged decode attention on the CPU: a C++ kernel that reads K/V through the block table in place.

The torch reference (:func:`leanlm.kernels.paged_attention.decode_reference`) gathers every
request's keys and values into a fresh fp32 copy laid out for two batched products; on a small
model serving 32 requests that copy is most of a decode step (a py-spy profile of ``leanlm
serve`` put the paged decode attention at ~60% of the engine core). The kernel here
(``csrc/paged_decode.cpp``) computes the same thing without the copy: one request per work item
on ATen's thread pool, each slot's row (all K/V heads side by side, ``block_size`` slots
contiguous per block) read once, widened to fp32 in registers (AVX-512 where the CPU has it),

    s_j = (q · k_j)·scale,   p_j = e^{s_j − max s} / Σ_j e^{s_j − max s},   o = Σ_j p_j v_j,

in fp32 as the reference does for one query per request, so the two agree to fp32 rounding
(they differ in summation order only).

The kernel is compiled on first use with :mod:`torch.utils.cpp_extension` (a C++ compiler and
ninja; cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for the
CPU's x86-64 level (v4 = AVX-512, v3 = AVX2), so a cache shared by different machines never runs
code built for another ISA. If it cannot be built the engine keeps the torch reference and
says so once. It runs in the ``auto`` kernel mode on CPU tensors of a float cache whose dtype
is q's (fp32/bf16/fp16), outside ``torch.compile`` and autograd; ``LEANLM_KERNELS=reference``
(or :func:`leanlm.kernels.kernel_mode`) turns it off.
"""

from __future__ import annotations

import functools
import itertools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leanlm import kernels
from leanlm.kernels import check, check_tensor, paged_attention

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def x86_level() -> str:
    """The highest x86-64 micro-architecture level this CPU has, from /proc/cpuinfo ("" if
    none can be told: another architecture, or no /proc)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ""
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "v4"
    if {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags:
        return "v3"
    return ""


@functools.cache
def ops() -> Any | None:
    """``torch.ops.leanlm_cpu``, built and loaded on first call; None if it cannot be built."""
    from torch.utils import cpp_extension

    level = x86_level()
    # -fopenmp: at::parallel_for is OpenMP pragmas inlined from ATen's headers (serial without
    # it); the libgomp.so.1 it links is the one torch has already loaded
    flags = ["-O3", "-fopenmp"] + ([f"-march=x86-64-{level}"] if level else [])
    try:
        cpp_extension.load(f"leanlm_cpu_{level or platform.machine()}", [str(SOURCE)],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: keep the reference
        log.warning("the C++ CPU attention kernel could not be built (%s); using the torch "
                    "reference", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return torch.ops.leanlm_cpu


def prepare(dtype: torch.dtype, device: torch.device | str) -> None:
    """Build the kernel now if a cache of ``dtype`` on ``device`` will use it."""
    if torch.device(device).type == "cpu" and dtype in DTYPES and kernels.mode() != "reference":
        ops()


def runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode` runs for these tensors (see the module docstring)."""
    if q.device.type != "cpu" or kernels.mode() == "reference" or torch.compiler.is_compiling():
        return False
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    return ops() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """One query per request: q [R, H, D] against ``seq_lens[r]`` keys of request r through row
    r of ``block_tables`` -> [R, H, D] (layout: :mod:`leanlm.kernels.paged_attention`)."""
    dev = q.device
    check_tensor("q", q, 3, DTYPES, dev)
    check_tensor("k_cache", k_cache, 3, (q.dtype,), dev)
    check_tensor("v_cache", v_cache, 3, (q.dtype,), dev)
    check_tensor("block_tables", block_tables, 2, paged_attention.INDEX, dev)
    r, heads, d = q.shape
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == d,
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
          f"[slots, kv_heads, {d}]")
    check(heads % k_cache.shape[1] == 0,
          f"{heads} query heads are not a multiple of {k_cache.shape[1]} K/V heads")
    check(seq_lens.shape == (r,) and block_tables.shape[0] == r,
          f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} must "
          f"describe {r} requests")
    lens = seq_lens.to(torch.int64).contiguous()
    if r:
        low, high = int(lens.min()), int(lens.max())
        check(low >= 1, f"every request needs at least one key, got seq_lens min {low}")
        check(high <= block_tables.shape[1] * block_size,
              f"seq_lens max {high} exceeds the {block_tables.shape[1]} blocks of {block_size} "
              "slots a block_tables row holds")
    native = ops()
    check(native is not None, "the C++ CPU attention kernel could not be built (see the log)")
    return native.paged_decode(q, k_cache, v_cache, block_tables.to(torch.int32).contiguous(), lens,
                               block_size, scale, window or -1)


@dataclass(frozen=True)
class Split:
    """A varlen paged batch (the arguments of :func:`paged_attention.reference`) cut once per
    step, for every layer: its one-query requests, which the kernel serves in one call, and the
    others (prefill chunks, draft verification), which the reference serves."""

    single_rows: torch.Tensor | None  # the one-query requests' rows of q (None: every request)
    single_tables: torch.Tensor  # [S, W] int32
    single_lens: torch.Tensor  # [S] int64
    many_rows: torch.Tensor | None  # the other requests' rows of q (None: no such request)
    many_tables: torch.Tensor
    many_lens: list[int]
    many_starts: list[int]  # offsets of their queries in q[many_rows]

    @classmethod
    def of(cls, block_tables: torch.Tensor, seq_lens: list[int], query_start: list[int],
           block_size: int) -> Split:
        counts = [b - a for a, b in itertools.pairwise(query_start)]
        single = [r for r, m in enumerate(counts) if m == 1]
        many = [r for r, m in enumerate(counts) if m > 1]
        lens = [seq_lens[r] for r in single]
        check(all(1 <= n <= block_tables.shape[1] * block_size for n in lens),
              f"seq_lens {lens} must be ≥ 1 and fit {block_tables.shape[1]} blocks of {block_size}")
        everyone = len(single) == len(seq_lens)
        starts = [0]
        for r in many:
            starts.append(starts[-1] + counts[r])
        return cls(
            single_rows=None if everyone else torch.tensor([query_start[r] for r in single]),
            single_tables=(block_tables if everyone else block_tables[single]).to(torch.int32).contiguous(),
            single_lens=torch.tensor(lens, dtype=torch.int64),
            many_rows=torch.cat([torch.arange(query_start[r], query_start[r + 1]) for r in many])
            if many else None,
            many_tables=block_tables[many], many_lens=[seq_lens[r] for r in many], many_starts=starts)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: Split,
              block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, H, D] of a varlen paged batch cut by ``split`` -> [T, H, D], where :func:`runs`:
    the one-query requests through the kernel in one call (q, caches and tables checked by the
    engine that made them), the others through the reference, which scores several queries in
    q's dtype as the model's own SDPA does."""
    native, window = ops(), window or -1
    if split.single_rows is None:
        return native.paged_decode(q, k_cache, v_cache, split.single_tables, split.single_lens,
                                   block_size, scale, window)
    out = torch.empty_like(q)
    if split.single_lens.numel():
        out[split.single_rows] = native.paged_decode(q[split.single_rows], k_cache, v_cache,
                                                     split.single_tables, split.single_lens, block_size,
                                                     scale, window)
    if split.many_rows is not None:
        out[split.many_rows] = paged_attention.reference(
            q[split.many_rows], k_cache, v_cache, split.many_tables, split.many_lens, split.many_starts,
            block_size, scale, None if window < 0 else window)
    return out
