"""Reference generation: a few prompts, one contiguous KV cache, every sampling option.

This is the oracle the serving engine is tested against, so it is written for clarity first and
speed second (it is still the decode path ``leanlm generate`` uses). Prompts of different lengths
are left-padded; padding gets position -1, which the attention mask hides (see attention.py), and
each row's positions count from its own first real token, so a batched row produces the same
tokens as the row alone (a seeded row draws from its own generator, seeded alike).

Sampling takes the engine's :class:`~leanlm.sampling.SamplingParams` and runs the one logits
pipeline of :mod:`leanlm.sampling` (penalties, temperature, top-k, top-p, min-p, the inverse-CDF
draw); a row ends as an engine request does (:func:`~leanlm.sampling.stops`). ``n``, ``logprobs``
and ``prompt_logprobs`` are the engine's (``leanlm.serve``): here they are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from leanlm.attention import SDPAMetadata
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.sampling import Row, SamplingParams, sample, stops
from leanlm.tokenizer import IncrementalDecoder, Tokenizer


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | None = None,
             on_token: Callable[[int, int], bool] | None = None,
             eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Generate continuations of token-id ``prompts``; returns the new token ids of each.

    ``on_token(row, token_id)`` is called for every new token; returning True stops that row.
    A row also stops at an eos token (``eos_token_ids``, by default the model's; not with
    ``ignore_eos``) or one of ``params.stop_token_ids`` once ``min_tokens`` are out; the stop
    token is not returned.
    """
    params = params or SamplingParams()
    if params.n != 1 or params.logprobs is not None or params.prompt_logprobs is not None:
        raise LeanLMError("generate() makes one sequence per prompt without logprobs: n, logprobs "
                          "and prompt_logprobs are the serving engine's (leanlm.serve.LLM)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LeanLMError("every prompt must have at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise LeanLMError(f"prompt is {longest} tokens, the model's context is {context}: "
                          f"shorten it to at most {context - 1} tokens")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise LeanLMError(f"prompt has a token id outside the vocabulary [0, {vocab})")
    if any(not 0 <= t < vocab for t in params.logit_bias):
        raise LeanLMError(f"logit_bias names a token id outside the vocabulary [0, {vocab})")
    max_new = min(params.max_tokens, context - longest)
    eos = tuple(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    device = model.embed_tokens.weight.device

    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
    padded = bool((lengths != longest).any())
    # each row's positions count from its own first real token; -1 marks its left padding
    positions = torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]
    positions = positions.masked_fill(positions < 0, -1)
    cache = model.make_cache(b, longest + max_new)
    seen = [list(p) for p in prompts]  # prompt + generated: the penalties' history
    rows = [Row(params, h, len(h), params.generator(device)) for h in seen]
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attn = SDPAMetadata.cached(cache, positions, model.sliding_window, padded)
        return model(tokens, positions, attn, rows=slice(-1, None))[:, -1].float()

    logits = step(tokens, positions)
    next_pos = lengths[:, None].clone()
    for _ in range(max_new):
        nxt = sample(logits, rows)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            seen[i].append(t)
            reason = stops(params, len(seen[i]) - len(prompts[i]), t, eos)
            if reason == "stop":
                done[i] = True
                continue
            outputs[i].append(t)
            if (on_token is not None and on_token(i, t)) or reason == "length" or len(outputs[i]) >= max_new:
                done[i] = True
        if all(done):
            break
        logits = step(nxt[:, None], next_pos)
        next_pos += 1
    return outputs


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str | list[dict[str, Any]],
                  params: SamplingParams | None = None, stream: Callable[[str], None] | None = None) -> str:
    """Generate from a text prompt (or chat messages); ``stream`` receives text deltas. Stops at
    the model's and the tokenizer's eos, and before any of ``params.stop`` strings."""
    cfg = params or SamplingParams()
    ids = tokenizer.encode_chat(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    decoder = IncrementalDecoder(tokenizer)
    text = ""
    held = 0  # chars emitted to ``stream`` so far; the tail may still begin a stop string
    keep_back = max((len(s) for s in cfg.stop), default=1) - 1
    stopped = False

    def emit(upto: int) -> None:
        nonlocal held
        if stream is not None and upto > held:
            stream(text[held:upto])
            held = upto

    def on_token(_: int, token: int) -> bool:
        nonlocal text, stopped
        text += decoder.push(token)
        cuts = [i for i in (text.find(s) for s in cfg.stop) if i != -1]
        if cuts:
            text, stopped = text[:min(cuts)], True
        emit(max(held, len(text) - keep_back))
        return stopped

    generate(model, [ids], cfg, on_token, sorted(eos))
    if not stopped:
        text += decoder.flush()
    emit(len(text))
    return text
