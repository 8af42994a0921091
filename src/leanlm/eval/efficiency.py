"""What a compressed model costs to hold and to run: bytes in memory and on disk, peak memory
while generating, prefill and decode tokens/s at batch 1.

- memory: the bytes of the model's tensors (each storage once: tied weights count once; packed
  codes, scales, zeros and g_idx of quantized linears included; rotary tables excluded);
- disk: the ``*.safetensors`` files of a checkpoint;
- peak memory: the peak resident set of a fresh process that has loaded the checkpoint (bf16)
  while it generates, and how far generating raised it over the loaded model's
  (activations, KV cache, workspaces) — in its own process, so earlier allocations in this one
  do not hide it;
- speed: the median of the decode steps after a ``prompt``-token prefill, and that prefill
  (timed on its second run, so one-time packing and allocation are not counted).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanlm.attention import KVCache, SDPAMetadata


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


@torch.inference_mode()
def tokens_per_s(model: nn.Module, steps: int = 24, prompt: int = 128,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(decode, prefill) tokens/s at batch 1 (see the module docstring)."""
    tokens = torch.randint(0, min(1000, model.config.vocab_size), (1, prompt))  # type: ignore[union-attr]
    prefill = []

    def step(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        positions = torch.arange(cache.length, cache.length + tokens.shape[1])[None]
        attn = SDPAMetadata.cached(cache, positions, model.sliding_window)  # type: ignore[arg-type]
        return model(tokens, positions, attn, rows=slice(-1, None)).argmax(-1)

    for _ in range(2):
        cache = model.make_cache(1, prompt + steps + 4, dtype=dtype)  # type: ignore[operator]
        t0 = time.perf_counter()
        nxt = step(tokens, cache)
        prefill.append(time.perf_counter() - t0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = step(nxt, cache)
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times[2:])), prompt / prefill[-1]


_PEAK = """
import gc, os, sys, threading, time, torch
from leanlm.checkpoint import load_model
from leanlm.generate import generate
from leanlm.sampling import SamplingParams
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
torch.set_num_threads(1)
model = load_model(sys.argv[1], dtype="bfloat16").eval()
gc.collect()
base = rss()
peak, done = [base], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
thread = threading.Thread(target=sample)
thread.start()
generate(model, [[3 + i % (model.config.vocab_size - 3) for i in range(int(sys.argv[2]))]],
         SamplingParams(max_tokens=int(sys.argv[3]), ignore_eos=True, temperature=0.0))
done.set()
thread.join()
print(peak[0], peak[0] - base)
"""


def peak_generation_bytes(checkpoint: str | Path, prompt: int = 256, new_tokens: int = 64) -> tuple[int, int]:
    """(peak resident set while a fresh process that loaded ``checkpoint`` in bf16 generates,
    how far generating raised it over the loaded model's) — sampled every 0.5 ms from Linux's
    /proc (``ru_maxrss`` would not do: a forked child inherits its parent's high-water mark)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(checkpoint), str(prompt), str(new_tokens)],
                         capture_output=True, text=True, check=True, timeout=600)
    peak, added = map(int, out.stdout.split()[-2:])
    return peak, added
