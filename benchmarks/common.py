"""Helpers shared by the benchmark scripts: random-weight checkpoints of preset shapes, timing.

Importing it applies the process-wide allocator setting that ``leanlm serve`` and ``leanlm
generate`` apply (:func:`leanlm.allocator.keep_freed_memory`), so the library runs here as under
those commands (``LEANLM_KEEP_FREED_MEMORY=0`` turns it off, as there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from leanlm import ModelConfig, Transformer, kernels, save_model
from leanlm.allocator import keep_freed_memory

keep_freed_memory()
CACHE = Path(__file__).resolve().parent.parent / "bench_out"


def random_checkpoint(preset: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A Hugging Face checkpoint of ``preset``'s shape with random weights (cached on disk)."""
    path = CACHE / f"{preset}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (path / "config.json").is_file():
        return path
    save_model(random_model(preset, dtype, seed), path)
    return path


def random_model(preset: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 **overrides: object) -> Transformer:
    """A ``preset``-shaped Transformer (with config ``overrides``) with random weights, built on
    meta and filled in ``dtype``."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset, **overrides))
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@contextlib.contextmanager
def unpacked_linears() -> Iterator[None]:
    """CPU inference through plain ``F.linear`` instead of leanlm's oneDNN-prepacked weights
    (``kernels/cpu_linear.py``): the baseline before prepacking, for before/after rows."""
    with kernels.prepacking(False):
        yield


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def copy_bandwidth() -> float:
    """Measured memory bandwidth in GB/s: bytes read + written by copying 256 MiB (median of 5)."""
    src = torch.ones(1 << 28, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats=5, warmup=2)
    return 2 * src.numel() / seconds / 1e9


def read_bandwidth() -> float:
    """Measured read bandwidth in GB/s now (not cached: it moves with the host's other tenants):
    bytes read by summing 512 MiB of fp32 (median of 5), what a kernel that streams its weights
    once can reach."""
    src = torch.ones(1 << 27, dtype=torch.float32)
    return src.numel() * 4 / median_time(lambda: src.sum(), repeats=5, warmup=2) / 1e9


def machine() -> str:
    """The CPU model, its ISA extensions that matter to the kernels, cores, torch threads,
    measured copy bandwidth, torch version: every benchmark prints it, because a ratio holds
    only on the machine it was measured on."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = " ".join(f for f in ISA if f in flags) or "?"
    return (f"{cpu} [{isa}], {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"copy {copy_bandwidth():.1f} GB/s, torch {torch.__version__}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, probe: str = "/models") -> subprocess.Popen:
    """Run an OpenAI-compatible server command; returns once ``url`` + ``probe`` answers (a
    server behind an API key: probe ``/health`` from its root)."""
    import httpx2 as httpx  # serving benchmarks only: the kernel and training ones run without it

    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; not a pipe, which could fill and block it)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600  # `leanlm serve --compile` compiles its graphs first (~1 min on 2 cores)
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}{probe}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not come up")
