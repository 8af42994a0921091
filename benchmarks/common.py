"""Helpers shared by the benchmark scripts: random-weight checkpoints of preset shapes, timing."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from leanlm import ModelConfig, Transformer, save_model

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


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
