"""Speculative decoding's verification of draft tokens against the target's logits, through the
one logits pipeline of :mod:`leanlm.sampling` (which the engine's batched sampler also is)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanlm.sampling import Row, probabilities


def verify_drafts(logits: torch.Tensor, row: Row, drafts: Sequence[int]) -> list[int]:
    """Speculative decoding's verification (Leviathan et al. 2023; Chen et al. 2023) of drafts
    d_1..d_k proposed deterministically (q = one-hot, as prompt lookup proposes), from the target's
    logits at the last real token and at each draft ([k + 1, V]).

    Greedy: keep d_j while it is the target's argmax; the first mismatch is replaced by the
    target's token. Sampling: keep d_j with probability p_j(d_j); on rejection draw from the
    residual max(0, p_j − q_j) ∝ p_j without d_j. If every draft is kept, one more token is drawn
    from p_k. The output is distributed exactly as sampling the target token by token."""
    greedy, probs = probabilities(logits, [row] * (len(drafts) + 1))
    out: list[int] = []
    for j, d in enumerate(drafts):
        if row.params.greedy:
            out.append(int(greedy[j]))
            if out[-1] != d:
                return out
            continue
        p = probs[j]
        if float(torch.rand((), generator=row.generator, device=p.device)) < float(p[d]):
            out.append(d)
            continue
        residual = p.clone()
        residual[d] = 0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=row.generator)))
        return out
    last = probs[-1]
    out.append(int(greedy[-1]) if row.params.greedy
               else int(torch.multinomial(last, 1, generator=row.generator)))
    return out
