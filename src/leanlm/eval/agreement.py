"""How far a compressed model's predictions move from the full-precision model's.

Two measures, after Dettmers et al. ("The case for 4-bit precision") and Dutta et al. 2024
("Accuracy is not all you need"), which show that equal accuracy can hide many changed answers:

- mean next-token KL divergence on the same text windows (the GPTQ protocol's windows of
  ``perplexity.windows``): ``KL(P || Q) = Σ_v p(v) (log p(v) − log q(v))`` per predicted position,
  P the reference (full) model and Q the compressed one, averaged over positions. It is 0 for a
  model against itself and grows as the approximation coarsens;
- flips: the fraction of task questions whose predicted answer differs between the two models
  (answers that change from right to wrong and from wrong to right both count).
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.eval.perplexity import text_perplexity


def next_token_kl(reference: nn.Module, model: nn.Module, ids: torch.Tensor, seq_len: int,
                  batch_size: int = 8, max_windows: int = 0) -> float:
    """Mean KL(reference || model) of the next-token distributions over the windows of ``ids``
    (computed by :func:`~leanlm.eval.perplexity.text_perplexity`, beside the perplexity)."""
    return text_perplexity(model, ids, seq_len, None, batch_size, max_windows, reference).kl


def flip_rate(reference: list[int], predictions: list[int]) -> float:
    """The fraction of questions whose answer differs between two models' predictions."""
    if len(reference) != len(predictions):
        raise ValueError("the two prediction lists cover different questions")
    return sum(a != b for a, b in zip(reference, predictions, strict=True)) / len(reference)
