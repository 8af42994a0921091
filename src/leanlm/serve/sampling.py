"""The batched sampler: every request that samples in a step, processed as one [R, V] tensor.

Per row, in this order (the reference generator's order, ``generate.process_logits``, with the
OpenAI penalties first):

1. presence / frequency penalties over the generated tokens and ``logit_bias``
   (logit_t −= presence·[count_t > 0] + frequency·count_t;  logit_t += bias_t);
2. repetition penalty (CTRL) over prompt and generated tokens: a seen token's logit is divided by
   the penalty when positive and multiplied when negative;
3. greedy rows (temperature < 1e-5) take the argmax here; the others are divided by their
   temperature, then cut by top-k, top-p (a token is dropped once the mass before it reaches
   top_p; the first always stays) and min-p (probability below min_p × the top one);
4. sampling by the exponential race: token = argmax_t p_t / E_t with E_t ~ Exp(1) i.i.d., which
   draws t with probability p_t (vLLM's sampler; it lets each row use its own seeded generator
   while the arithmetic stays batched).

Every per-row parameter is a column vector, and each stage runs only when some row needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanlm.serve.request import SamplingParams


@dataclass
class Row:
    """What the sampler needs of one request."""

    params: SamplingParams
    token_ids: Sequence[int]  # prompt + generated (for the repetition penalty)
    num_prompt_tokens: int
    generator: torch.Generator | None


def _padded(lists: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([list(x) + [pad] * (width - len(x)) for x in lists], device=device)


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Stages 1 and 2 (in place on a copy)."""
    r, v = logits.shape
    dev = logits.device
    ps = [row.params for row in rows]
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        outs = _padded([row.token_ids[row.num_prompt_tokens:] for row in rows], v, dev)
        ones = torch.ones_like(outs, dtype=torch.float)
        counts = torch.zeros(r, v + 1, device=dev).scatter_add_(1, outs, ones)
        counts = counts[:, :v]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        logits = logits - pres * (counts > 0) - freq * counts
    for i, p in enumerate(ps):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=dev)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=dev, dtype=logits.dtype)
    if any(p.repetition_penalty != 1.0 for p in ps):
        seen = _padded([row.token_ids for row in rows], v, dev)
        pen = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        ext = torch.cat([logits, torch.zeros(r, 1, device=dev)], 1)
        score = ext.gather(1, seen)
        score = torch.where(score < 0, score * pen, score / pen)
        logits = ext.scatter(1, seen, score)[:, :v]
    return logits


def probabilities(logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy tokens [R], sampling distribution [R, V]) after stages 1-3."""
    v = logits.shape[1]
    dev = logits.device
    logits = apply_penalties(logits.clone(), rows)
    tokens = logits.argmax(-1)
    ps = [row.params for row in rows]
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in ps], device=dev)[:, None]
    logits = logits / temp
    top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in ps], device=dev)
    top_p = torch.tensor([p.top_p for p in ps], device=dev)[:, None]
    if bool((top_k < v).any()) or bool((top_p < 1).any()):
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        kth = sorted_logits.gather(1, (top_k - 1)[:, None])
        drop = logits < kth
        if bool((top_p < 1).any()):  # over what top-k left, as the reference does
            probs = sorted_logits.masked_fill(sorted_logits < kth, float("-inf")).softmax(-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= top_p
            drop |= torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    min_p = torch.tensor([p.min_p for p in ps], device=dev)[:, None]
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return tokens, logits.softmax(-1)


def sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Token ids [R] for float32 logits [R, V] of the rows' requests."""
    if all(row.params.greedy for row in rows):  # decided on the host: no transfer, no sync
        return apply_penalties(logits.clone(), rows).argmax(-1)
    greedy = torch.tensor([row.params.greedy for row in rows], device=logits.device)
    tokens, probs = probabilities(logits, rows)
    noise = torch.empty_like(probs)
    shared = [i for i, row in enumerate(rows) if row.generator is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return torch.where(greedy, tokens, (probs / noise).argmax(-1))


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
