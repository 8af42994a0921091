"""Perplexity: of a packed training stream (what the trainer and the model card report), and of
text under the protocol compressed models are compared with.

Training stream (:func:`stream_loss`): documents as ``<eos> text`` (``data/tokens.py``) cut into
non-overlapping windows of ``seq_len + 1`` tokens, each scored as a training sequence (document
masking included): ``L = -(1/N) Σ log p(x_{t+1} | x_{≤t} of the same document)``, ``ppl = e^L``.
Windows can be split over ranks; the (sum, count) pairs are summed by the caller.

Text (:func:`text_perplexity`), the GPTQ protocol (Frantar et al. 2023, after Dettmers et al.):
the texts are joined with "\\n\\n" and tokenized as one stream (no special tokens); the stream is
cut into ``N // seq_len`` non-overlapping windows (the remainder is dropped); every window is
scored from its first token, so each predicts its ``seq_len - 1`` later tokens, and the
perplexity is token-level: ``exp(Σ NLL / Σ predicted tokens)``. With a ``stride`` it is the
sliding-window variant of Hugging Face's "Perplexity of fixed-length models": windows of up to
``seq_len`` tokens start every ``stride`` tokens and score only the tokens not scored before (a
window's first token never: it has no context there), so with ``stride < seq_len`` every token
after the first is predicted once, with at least ``seq_len - stride`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.attention import SDPAMetadata
from leanlm.data.tokens import make_batch, window, windows_of
from leanlm.errors import LeanLMError


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
                attn = SDPAMetadata.packed(batch.documents, model.sliding_window)
                logits = model(batch.inputs, batch.positions, attn)
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


@dataclass
class Perplexity:
    nll: float  # summed over the scored tokens
    tokens: int  # scored (predicted) tokens
    windows: int
    kl: float | None = None  # mean next-token KL(reference || model) over the scored tokens

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def text_stream(texts: Iterable[str], tokenizer: object) -> torch.Tensor:
    """The GPTQ protocol's token stream: the texts joined with "\\n\\n", no special tokens."""
    ids = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)  # type: ignore[attr-defined]
    return torch.tensor(ids, dtype=torch.long)


def windows(num_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, scored) per window: tokens [start, end) go in, the last ``scored`` of them
    are predicted (the first token of the stream never is)."""
    if seq_len < 2:
        raise LeanLMError(f"seq_len must be at least 2, got {seq_len}")
    if num_tokens < seq_len:
        raise LeanLMError(f"the text has {num_tokens} tokens, fewer than one window of {seq_len} "
                          f"(use a shorter --seq-len or more text)")
    if stride is None:
        return [(i * seq_len, (i + 1) * seq_len, seq_len - 1) for i in range(num_tokens // seq_len)]
    if not 0 < stride <= seq_len:
        raise LeanLMError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        out.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


def spread(spans: list, k: int) -> list:
    """``k`` of the windows, evenly spaced over the stream (all of them for k = 0), so a subset
    still covers every part of a corpus whose domains follow one another."""
    if not k or k >= len(spans):
        return spans
    return [spans[int(i)] for i in np.linspace(0, len(spans) - 1, k).round()]


@torch.inference_mode()
def text_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                    batch_size: int = 8, max_windows: int = 0,
                    reference: nn.Module | None = None) -> Perplexity:
    """Token-level perplexity of the stream ``ids`` [N] (see the module docstring); with a
    ``reference`` model, the mean KL(reference || model) at the same positions too
    (``agreement.py``), from the same forward."""
    spans = spread(windows(len(ids), seq_len, stride), max_windows)
    device = next(model.parameters()).device
    total, count, kl = 0.0, 0, 0.0
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:  # windows of one length batch together (only a sliding last one differs)
        by_len.setdefault(span[1] - span[0], []).append(span)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            rows = torch.stack([ids[a:b] for a, b, _ in chunk]).to(device)
            logits = model(rows[:, :-1]).float()
            nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # [B, L-1]
            if reference is not None:
                logp = F.log_softmax(reference(rows[:, :-1]).float(), -1)
                div = (logp.exp() * (logp - F.log_softmax(logits, -1))).sum(-1)  # [B, L-1]
            for r, (_, _, scored) in enumerate(chunk):
                if scored:
                    total += float(nll[r, -scored:].sum())
                    kl += float(div[r, -scored:].sum()) if reference is not None else 0.0
                count += scored
    return Perplexity(total, count, len(spans), kl / count if reference is not None else None)
