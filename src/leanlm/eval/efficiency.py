"""What a compressed model costs to hold and to run: bytes in memory and on disk, peak memory
while generating, prefill and decode tokens/s at batch 1.

- memory: the bytes of the model's tensors (each storage once: tied weights count once; packed
  codes, scales, zeros and g_idx of quantized linears included; rotary tables excluded);
- disk: the ``*.safetensors`` files of a checkpoint;
- peak generation memory: the process's resident set, sampled every millisecond by a thread
  while ``generate`` runs, minus the resident set before (activations, KV cache, workspaces);
- speed: the median of the decode steps after a ``prompt``-token prefill, and that prefill
  (timed on its second run, so one-time packing and allocation are not counted).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or type(t) not in (torch.Tensor, nn.Parameter):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def disk_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@torch.no_grad()
def tokens_per_s(model: nn.Module, steps: int = 24, prompt: int = 128,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(decode, prefill) tokens/s at batch 1 (see the module docstring)."""
    tokens = torch.randint(0, 1000, (1, prompt))
    prefill = []
    for _ in range(2):
        cache = model.make_cache(1, prompt + steps + 4, dtype=dtype)  # type: ignore[operator]
        t0 = time.perf_counter()
        nxt = model(tokens, cache=cache, last_only=True).argmax(-1)
        prefill.append(time.perf_counter() - t0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = model(nxt, cache=cache, last_only=True).argmax(-1)
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times[2:])), prompt / prefill[-1]


def peak_generation_bytes(model: nn.Module, prompt: int = 256, new_tokens: int = 64) -> int:
    """Peak resident-set growth while generating ``new_tokens`` after a ``prompt``-token prompt."""
    from leanlm.generate import GenerationConfig, generate

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        generate(model, [list(range(3, 3 + prompt))], cfg)
    finally:
        done.set()
        thread.join()
    return max(0, peak[0] - base)
