"""Held-out loss and perplexity of a packed token stream: the number the trainer and the model
card report, and what ``leanlm eval`` recomputes from a saved checkpoint.

The stream (documents as ``<eos> text``, see ``train/data.py``) is cut into non-overlapping
windows of ``seq_len + 1`` tokens; each window is scored as one training sequence would be
(document masking included), and the loss is the mean next-token negative log-likelihood over
every scored token: ``L = -(1/N) Σ log p(x_{t+1} | x_{≤t} of the same document)``, ``ppl = e^L``.
Windows can be split over ranks; the (sum, count) pairs are summed by the caller.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.train.data import make_batch, window, windows_of


def autocast_context(device: torch.device, precision: str) -> object:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def stream_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, eos_id: int,
                batch_size: int = 8, max_windows: int = 0, document_masking: bool = True,
                precision: str = "fp32", rank: int = 0, world: int = 1,
                device: torch.device | None = None) -> tuple[float, int]:
    """(sum of NLL, token count) over this rank's share of the first ``max_windows`` windows."""
    device = device or next(model.parameters()).device
    n = windows_of(tokens, seq_len)
    if max_windows:
        n = min(n, max_windows)
    # every rank runs the same number of forwards (FSDP gathers parameters collectively);
    # slots past the end re-score window 0 and are not counted
    per_rank = -(-n // world)
    mine = [rank + k * world for k in range(per_rank)]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(mine), batch_size):
            ids = mine[i:i + batch_size]
            rows = np.stack([window(tokens, j if j < n else 0, seq_len) for j in ids])
            batch = make_batch(rows, eos_id, document_masking).to(device)
            with autocast_context(device, precision):
                logits = model(batch.inputs, positions=batch.positions, documents=batch.documents)
            nll = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                  reduction="none").view(len(ids), -1).sum(1)
            keep = torch.tensor([j < n for j in ids], device=nll.device)
            total += float(nll[keep].sum())
            count += int(keep.sum()) * seq_len
    finally:
        model.train(was_training)
    return total, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
