"""Will this recipe fit? An estimate of training memory per process, checked before starting.

Per process, with P parameters, world size W, sequence T, micro-batch B, L layers, width h
and vocabulary V (bytes):

* states: fp32 weights (4P), fp32 grads (4P) and AdamW's two moments (8P); FSDP divides all
  three by W (ZeRO-3), DDP or one process keeps them whole;
* activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 1 without
  dropout and without the ``5·a·T/h`` attention-score term, which flash / memory-efficient SDPA
  never stores): ``34·T·B·h`` bytes per layer in bf16 (twice that in fp32); full AC keeps the
  block inputs ``2·T·B·h`` per layer plus one layer's worth; selective AC about half;
* the fused head + loss (``leanlm/loss.py``): one chunk of fp32 logits three times over, plus
  the fp32 head gradient ``4·V·h``.

It is an estimate (allocator slack and workspace come on top), so the check refuses only when the
estimate exceeds what is available; the message gives the numbers and the knobs to turn.
"""

from __future__ import annotations

import os

import torch

from leanlm.allocator import available_memory
from leanlm.errors import LeanLMError
from leanlm.loss import CHUNK
from leanlm.train.config import TrainConfig

GiB = 2**30


def estimate_bytes(cfg: TrainConfig, world: int) -> dict[str, float]:
    m = cfg.model
    p = m.num_parameters()
    # ``world``: the data-parallel ranks; FSDP shards states over them, TP over its ranks
    shard = (world if cfg.parallel.mode in ("fsdp", "auto") and world > 1 else 1) * cfg.parallel.tp
    states = 16 * p / shard
    t, b, h, layers = cfg.seq_len, cfg.micro_batch, m.hidden_size, m.num_layers
    per_layer = 34 * t * b * h * (1 if cfg.precision == "bf16" else 2)
    if cfg.ac == "full":
        acts = layers * 2 * t * b * h + per_layer
    elif cfg.ac == "selective":
        acts = layers * per_layer / 2
    else:
        acts = layers * per_layer
    head = 12 * min(t * b, CHUNK) * m.vocab_size + 4 * m.vocab_size * h
    return {"states": states, "activations": acts, "head and loss": head,
            "total": states + acts + head}


def available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return available_memory()


def check_fits(cfg: TrainConfig, world: int, device: torch.device) -> dict[str, float]:
    est = estimate_bytes(cfg, world)
    if not cfg.check_memory:
        return est
    procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = est["total"] * procs_here
    have = available_bytes(device)
    if need > have:
        parts = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in est.items() if k != "total")
        raise LeanLMError(
            f"this recipe needs about {need / GiB:.1f} GiB on {device.type} ({parts}"
            f"{f', x{procs_here} processes' if procs_here > 1 else ''}) but only {have / GiB:.1f} GiB "
            "is available: lower micro_batch or seq_len, set ac=full, shard with parallel=fsdp "
            "over more processes, or skip this check with check_memory=false")
    return est
