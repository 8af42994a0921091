"""leanlm's C++ CPU ops, built on first use: paged decode attention, RMSNorm, rotary embedding, and
GEMMs for a few rows (int4 weights; bf16 weights on CPUs without bf16 instructions).

A decode step of a small model on the CPU is bound by op count, not arithmetic: each torch op
costs microseconds of dispatch, and the references spend 6–8 ops on an RMSNorm or a rotary
embedding, and a gathered fp32 copy of every request's K/V on paged decode attention
(:mod:`leanlm.kernels.cpu_attention`). These ops do each in one call, with the references'
math and roundings (``csrc/``; the formulas are in each file's header):

- ``leanlm_cpu::paged_decode``: one query per request against its keys through the block table;
- ``leanlm_cpu::rotary_decode(_qkv)``: the same, rotating and storing the step's own q/k/v first
  (:mod:`leanlm.kernels.cpu_attention`);
- ``leanlm_cpu::rms_norm``: RMSNorm with the residual add (:mod:`leanlm.kernels.rmsnorm`);
- ``leanlm_cpu::rotary``: RoPE of q or k (:mod:`leanlm.kernels.rotary`);
- ``leanlm_cpu::int4pack_mm``: x times a 4-bit weight in torch's CPU int4pack layout;
- ``leanlm_cpu::bf16_mm``: x times a bf16 weight in 64-row blocks (:mod:`leanlm.kernels.cpu_linear`);
- ``leanlm_cpu::vnni_mm``: x rounded to int8 times a 4/8-bit weight on AVX512-VNNI
  (:mod:`leanlm.kernels.cpu_vnni`, ``LEANLM_INT8_ACTIVATIONS``);
- ``leanlm_cpu::argmax_rows``: torch.argmax(x, -1) of fp32 logits [R, V], vectorised (greedy sampling).

They are compiled with :mod:`torch.utils.cpp_extension` (a C++ compiler and ninja; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for the CPU's x86-64 level
(v4 = AVX-512, v3 = AVX2) under a name that carries it, so a cache shared by different machines
never runs code built for another ISA. If they cannot be built, the torch references run and
the log says so once. They run (:func:`runs`) in the ``auto`` kernel mode on CPU tensors in
fp32/bf16/fp16 outside autograd, and inside ``torch.compile`` too (each has a fake that gives its
output shapes, so a compiled graph calls it); ``LEANLM_KERNELS=reference`` (or
:func:`leanlm.kernels.kernel_mode`) turns them off. Parallel work goes to ATen's OpenMP pool.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from leanlm import kernels

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / name for name in (
    "paged_decode.cpp", "norm_rotary.cpp", "int4_gemm.cpp", "bf16_gemm.cpp", "argmax.cpp", "vnni_gemm.cpp")]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none to read)."""
    try:
        return frozenset(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def x86_level() -> str:
    """The highest x86-64 micro-architecture level this CPU has, from /proc/cpuinfo ("" if
    none can be told: another architecture, or no /proc)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "v4"
    if {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags:
        return "v3"
    return ""


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN's bf16 GEMMs
    need to run at full speed."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


_UNBUILT = object()
_ops: Any = _UNBUILT  # torch.ops.leanlm_cpu once built, None where it cannot be


def ops() -> Any | None:
    """``torch.ops.leanlm_cpu``, built and loaded on first call; None if it cannot be built.
    (A global read once built, not ``functools.cache``: ``torch.compile`` traces this call.)"""
    global _ops
    if _ops is _UNBUILT:
        _ops = _build()
    return _ops


def _build() -> Any | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.warning("no C++ compiler (%s) on PATH: leanlm's C++ CPU ops are not built, the torch "
                    "references run (install g++ for the fast CPU path)", compiler)
        return None
    if shutil.which("ninja") is None:  # the ninja package's binary, where its bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    level = x86_level()
    # -fopenmp: at::parallel_for is OpenMP pragmas inlined from ATen's headers (serial without
    # it); the libgomp.so.1 it links is the one torch has already loaded. -ffp-contract=off: no
    # a·b + c fused where the reference rounds a·b first (explicit FMAs stay FMAs)
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"] + ([f"-march=x86-64-{level}"] if level else [])
    log.info("loading leanlm's C++ CPU ops (compiled once per machine and source: ~30 s)")
    try:
        cpp_extension.load(f"leanlm_cpu_{level or platform.machine()}", [str(s) for s in SOURCES],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: keep the references
        log.warning("leanlm's C++ CPU ops could not be built (%s); using the torch references",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    _register_fakes()
    return torch.ops.leanlm_cpu


def _register_fakes() -> None:
    """Each op's output shapes from its inputs' (no data read), so that ``torch.compile`` traces
    the ops into its graph (the serving engine's compiled decode step) and calls them there."""
    fakes = {
        "paged_decode": lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format),
        "rotary_decode": lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format),
        "rotary_decode_qkv": lambda qkv, heads, cos, sin, k_cache, *_: qkv.new_empty(
            qkv.shape[0], heads * k_cache.shape[-1]),
        "rms_norm": lambda x, residual, *_: (torch.empty_like(x), x.new_empty(0) if residual is None
                                             else torch.empty_like(x)),
        # [B, S, H, D] transposed, as the op returns it
        "rotary": lambda x, *_: x.new_empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2),
        "int4pack_mm": lambda x, packed, *_: x.new_empty(x.shape[0], packed.shape[0]),
        "bf16_mm": lambda x, wb, bias, n: x.new_empty(x.shape[0], n),
        "vnni_mm": lambda x, packed, *_: x.new_empty(x.shape[0], packed.shape[0]),
        "argmax_rows": lambda x: x.new_empty(x.shape[0], dtype=torch.long),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"leanlm_cpu::{name}", fake)


def prepare(dtype: torch.dtype, device: torch.device | str) -> None:
    """Build the ops now (not on a request) if tensors of ``dtype`` on ``device`` will use them."""
    if torch.device(device).type == "cpu" and dtype in DTYPES and kernels.mode() != "reference":
        ops()


def runs(*tensors: torch.Tensor) -> bool:
    """Whether the C++ op runs for these tensors: CPU, one float dtype, no autograd through them,
    not switched off, and built."""
    # (called for every op of a decode step: the cheap tests first, no generators)
    x = tensors[0]
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in DTYPES or kernels.mode() == "reference":
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return ops() is not None


def direct(x: torch.Tensor) -> bool:
    """:func:`runs` for a layer that has run its C++ op on a tensor like ``x`` before (so the ops
    are built, and the dtype checked): only what can have changed since — a CPU tensor, the
    kernel mode, autograd through it, autocast. ~1 µs where :func:`runs` takes ~3."""
    return (x.is_cpu and kernels.mode() != "reference" and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.is_autocast_enabled("cpu"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) with s = x + residual (or x): :func:`leanlm.kernels.rmsnorm.reference`'s
    result in one op (where :func:`runs`)."""
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    y, s = ops().rms_norm(x, residual, weight.contiguous(), eps)
    return y, (x if residual is None else s)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of fp32 logits [R, V]: the C++ op where :func:`runs`, else torch's."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] and runs(x):
        return ops().argmax_rows(x if x.stride(1) == 1 else x.contiguous())
    return x.argmax(-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by cos/sin [B, 1, S, D]: :func:`leanlm.kernels.rotary.reference`'s
    result in one op (where :func:`runs`)."""
    return ops().rotary(x, cos, sin)


# Rows from which int4pack_mm beats torch's _weight_int4pack_mm_for_cpu (2 EPYC cores, 2026-12-07,
# layers of the default model and of a 1B model; benchmarks/bench_cpu_ops.py --int4): 0.75-1.2x
# at 1 row, 0.94-1.5x at 8, 1.2-1.6x at 32
INT4_MIN_ROWS = 8


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] bf16 times a 4-bit weight packed by :func:`leanlm.quant.linear.int4pack` (uint8
    [N, K/2], N a multiple of 64), ``sz`` [K/gs, N, 2] bf16 (scale, offset) as torch's
    ``_weight_int4pack_mm_for_cpu`` takes them: the weight is unpacked once per group tile for
    all M rows (csrc/int4_gemm.cpp), with AVX512-BF16 dot products where the CPU has them."""
    return ops().int4pack_mm(x, packed, sz, group_size, True)


def bf16_mm(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [M, K] bf16 times a bf16 weight [n, K] held in 64-row blocks [⌈n/64⌉, K, 64]
    (:func:`leanlm.kernels.cpu_linear.to_blocks`), plus ``bias``: fp32 multiply-adds on the
    weight widened as it is read (csrc/bf16_gemm.cpp) where :func:`runs`, else the same fp32
    product in torch; either rounds once to bf16."""
    if runs(x, blocks, *(() if bias is None else (bias,))):
        return ops().bf16_mm(x.contiguous(), blocks, bias, n)
    y = torch.matmul(x.float(), blocks.float()).transpose(0, 1).reshape(x.shape[0], -1)[:, :n]  # [M, N]
    return (y if bias is None else y + bias.float()).to(x.dtype)

