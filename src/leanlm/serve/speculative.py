"""Draft proposers for speculative decoding in the engine, and how many drafts to ask for.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"): a cheap
proposer guesses the next k tokens d_1..d_k, the target model scores all k + 1 positions in one
forward, and rejection sampling keeps a prefix of the guesses so that the output is distributed
exactly as the target's (:func:`verify_drafts`; greedy requests keep the matching prefix, so
their outputs are identical). Both proposers here are deterministic (a one-hot proposal q),
so draft d is kept with probability p(d) and on rejection the token is drawn from p without d.

Proposers:

- :func:`ngram_drafts`, prompt lookup (Saxena 2023): the tokens that followed the latest earlier
  occurrence of the last n tokens. Free, and strong on input-grounded tasks (code edits, RAG).
- :class:`DraftModelProposer`: a small model with the target's tokenizer proposes greedily. It
  keeps its own paged K/V cache indexed by the *target's* block tables (the scheduler allocates
  k lookahead slots per decoding request, so the draft's k - 1 fed-back guesses have slots), and
  remembers per request how far its K/V are valid: after verification, the accepted drafts' K/V
  stay, so each step the draft only catches up on the bonus token (plus the whole prompt the
  first time), then runs k - 1 batched single-token steps.

How many drafts (:func:`best_length`): with a per-token acceptance rate α and a draft costing c
target steps, k drafts yield E[tokens] = (1 − α^{k+1}) / (1 − α) per step at cost 1 + c·k, so
k* = argmax_k (1 − α^{k+1}) / ((1 − α)(1 + c·k)). α is estimated per request from its own
verifications (accepted / (accepted + rejections), with a prior), c is measured online. When the
running batch exceeds ``spec_disable_batch_size`` the step is compute-bound and speculation is
switched off (vLLM's ``disable_by_batch_size``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.sampling import Row, probabilities
from leanlm.serve.batch import PagedBatch
from leanlm.serve.compiled import CompiledDecode
from leanlm.serve.paged import PagedKVCache
from leanlm.serve.request import Request


def ngram_drafts(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the last n
    tokens (the longest n in [min_n, max_n] that occurs), or none."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        tail = list(tokens[-n:])
        for i in range(len(tokens) - n - 1, -1, -1):
            if list(tokens[i:i + n]) == tail:
                return list(tokens[i + n:i + n + k])
    return []


def best_length(alpha: float, cost: float, k_max: int) -> int:
    """The draft length in [1, k_max] with the most expected tokens per unit of step cost."""
    alpha = min(max(alpha, 0.0), 0.999)
    gain = lambda k: (1 - alpha ** (k + 1)) / ((1 - alpha) * (1 + cost * k))
    return max(range(1, k_max + 1), key=gain)


class AcceptanceTracker:
    """Per-request acceptance-rate estimates: α = (accepted + a0) / (accepted + rejected + a0 + r0)."""

    def __init__(self, prior_accepted: float = 1.0, prior_rejected: float = 1.0) -> None:
        self.prior = (prior_accepted, prior_rejected)
        self.counts: dict[str, list[int]] = {}

    def record(self, rid: str, proposed: int, accepted: int) -> None:
        c = self.counts.setdefault(rid, [0, 0])
        c[0] += accepted
        c[1] += accepted < proposed  # a verification stops at its first rejection

    def alpha(self, rid: str) -> float:
        a, r = self.counts.get(rid, (0, 0))
        return (a + self.prior[0]) / (a + r + self.prior[0] + self.prior[1])

    def forget(self, rids: set[str]) -> None:
        for rid in rids:
            self.counts.pop(rid, None)


CATCH_UP_ROWS = 8  # a draft step with at most this many tokens per request runs compiled


class DraftModelProposer:
    """Greedy drafts from a small model sharing the target's tokenizer, with its own paged K/V
    cache addressed through the target's block tables."""

    def __init__(self, draft: Transformer, target: ModelConfig, num_blocks: int, block_size: int,
                 compile: bool = False) -> None:
        d = draft.config
        if d.vocab_size != target.vocab_size:
            raise LeanLMError(f"the draft model's vocabulary ({d.vocab_size} tokens) differs from the "
                              f"target's ({target.vocab_size}): speculative decoding needs the same "
                              "tokenizer")
        self.model = draft.eval()
        self.device = device = draft.embed_tokens.weight.device
        self.cache = PagedKVCache.allocate(d.num_layers, num_blocks + compile, block_size, d.num_kv_heads,
                                           d.head_dim, draft.embed_tokens.weight.dtype, device)
        # decode-shaped steps through torch.compile (its last block: the scratch block): the k - 1
        # one-token steps, and the catch-up on the accepted drafts and the bonus token
        self.compiled = CompiledDecode(self.model, self.cache) if compile else None
        # per request: (tokens whose draft K/V were valid before the last proposal, its drafts)
        self.last: dict[str, tuple[int, list[int]]] = {}

    def forget(self, rids: set[str]) -> None:
        for rid in rids:
            self.last.pop(rid, None)

    def _valid(self, r: Request) -> int:
        """Leading tokens of ``r`` whose draft K/V are in the cache: up to the last proposal's
        start, plus the fed-back drafts the target accepted (at most num_tokens - 1, so the
        last token is always fed and its logits give the first draft)."""
        if r.request_id not in self.last:
            return 0
        n, drafts = self.last[r.request_id]
        kept = 0
        for want, got in zip(drafts[:-1], r.all_token_ids[n:], strict=False):
            if want != got:
                break
            kept += 1
        return min(n + kept, r.num_tokens - 1)

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], ks: Sequence[int],
                block_ids: Callable[[str], list[int]]) -> list[list[int]]:
        """k greedy drafts for each request (``ks[i]`` for ``requests[i]``, each ≥ 1): one
        forward over every request's uncached tokens, then k - 1 batched one-token steps."""
        if not requests:
            return []
        tables = [block_ids(r.request_id) for r in requests]
        batch = PagedBatch(self.cache.block_size)
        for r, table in zip(requests, tables, strict=True):
            start = self._valid(r)
            batch.add(r.all_token_ids[start:], start, table)
            batch.rows.append(len(batch.tokens) - 1)
        drafts: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))
        while True:
            # not a prompt: each token a decode row
            compiled = self.compiled if batch.max_tokens_per_request <= CATCH_UP_ROWS else None
            best = batch.logits(self.model, self.cache, compiled).argmax(-1).tolist()
            for i, t in zip(active, best, strict=True):
                drafts[i].append(t)
            active = [i for i in active if len(drafts[i]) < ks[i]]
            if not active:
                break
            # the next step feeds each active request its newest draft, one token each
            batch = PagedBatch(self.cache.block_size)
            for i in active:
                batch.add([drafts[i][-1]], requests[i].num_tokens + len(drafts[i]) - 1, tables[i])
            batch.rows = list(range(len(active)))
        for r, d in zip(requests, drafts, strict=True):
            self.last[r.request_id] = (r.num_tokens, d)
        return drafts


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
