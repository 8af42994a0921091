"""Reference generation: a few prompts, one contiguous KV cache, every sampling option.

This is the oracle the serving engine is tested against, so it is written for clarity first and
speed second (it is still the decode path ``leanlm generate`` uses). Prompts of different lengths
are left-padded; padding gets position -1, which the attention mask hides (see attention.py), and
each row's positions count from its own first real token, so a batched row produces the same
tokens as the row alone.

Logits processing follows ``transformers``' order so that seeded sampling is comparable:
repetition penalty (CTRL, Keskar et al. 2019: divide positive logits of already-seen tokens by
the penalty, multiply negative ones) -> temperature -> top-k -> top-p (nucleus, Holtzman et al.
2020: the smallest set whose probability mass reaches p) -> min-p (keep tokens with probability
at least min_p times the top token's) -> sample. Temperature 0 means greedy (argmax after the
penalty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from leanlm.allocator import keep_freed_memory
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, msg in checks:
            if not ok:
                raise LeanLMError(f"bad generation setting: {msg}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig) -> torch.Tensor:
    """logits [B, V] (float32) -> processed logits; removed tokens get -inf."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * cfg.repetition_penalty, score / cfg.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = drop_sorted.scatter(1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], cfg: GenerationConfig | None = None,
             on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Generate continuations of token-id ``prompts``; returns the new token ids of each.

    ``on_token(row, token_id)`` is called for every new token; returning True stops that row.
    A row also stops at a stop token id (the model's eos unless given), which is not returned.
    """
    cfg = cfg or GenerationConfig()
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
    max_new = min(cfg.max_new_tokens, context - longest)
    stop_ids = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else model.config.eos_token_ids)
    if cfg.ignore_eos:
        stop_ids = set()
    device = model.embed_tokens.weight.device
    if device.type == "cpu":
        keep_freed_memory()
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.seed() % 2**63))

    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
    padded = bool((lengths != longest).any())
    positions = None
    if padded:
        positions = torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]
        positions = positions.masked_fill(positions < 0, -1)
    cache = model.make_cache(b, longest + max_new)
    seen = None
    if cfg.repetition_penalty != 1.0:  # padding slots repeat the row's first token (no effect)
        seen = torch.stack([torch.tensor([p[0]] * (longest - len(p)) + p, device=device) for p in prompts])
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    next_pos = lengths.clone()
    logits = model(tokens, positions, cache, last_only=True)[:, -1].float()
    for _ in range(max_new):
        nxt = sample(process_logits(logits, seen, cfg), cfg, generator)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in stop_ids:
                done[i] = True
                continue
            outputs[i].append(t)
            if (on_token is not None and on_token(i, t)) or len(outputs[i]) >= max_new:
                done[i] = True
        if all(done):
            break
        if seen is not None:
            seen = torch.cat([seen, nxt[:, None]], dim=1)
        step_pos = next_pos[:, None] if padded else None
        logits = model(nxt[:, None], step_pos, cache, last_only=True)[:, -1].float()
        next_pos += 1
    return outputs


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str | list[dict[str, Any]],
                  cfg: GenerationConfig | None = None, stream: Callable[[str], None] | None = None) -> str:
    """Generate from a text prompt (or chat messages); ``stream`` receives text deltas."""
    cfg = cfg or GenerationConfig()
    ids = tokenizer.encode_chat(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    if cfg.stop_token_ids is None and tokenizer.eos_token_id is not None:
        eos = set(model.config.eos_token_ids) | {tokenizer.eos_token_id}
        cfg = replace(cfg, stop_token_ids=sorted(eos))
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

    generate(model, [ids], cfg, on_token)
    if not stopped:
        text += decoder.flush()
    emit(len(text))
    return text
