"""Attention backends behind one signature: ``meta.attend(layer_idx, sliding, q, k, v)``.

The model computes q, k, v for a layer (after rotary embedding) and hands them to the metadata
object its caller built once for the forward (the model never changes it). The metadata owns
everything that differs between backends: where K/V live (nothing, a contiguous
:class:`KVCache`, or — in the serving engine — a paged block table) and which keys each query
may see. This module holds the SDPA backend used for training,
scoring, prefill and the reference generator; the serving engine's paged backend (a flattened
batch of requests whose K/V live in fixed-size blocks) is :mod:`leanlm.serve.paged`.

Masking. Query i at absolute position p_i may attend key j at position p_j iff
``0 <= p_j <= p_i`` and, for sliding-window layers, ``p_i - p_j < W`` (Mistral: each token sees
itself and the W-1 tokens before it). Padding is marked by position -1 (left padding in batched
generation); a padded query always sees its own slot so that no row of the softmax is empty
(an all-masked row would produce NaN, and ``0 * NaN`` would leak through the value matmul).
Packed training sequences (several documents in one row) add a document mask: a query sees only
keys of its own document (``SDPAMetadata.packed``). Common cases skip the mask: a fresh causal
prefill uses ``is_causal``, one decode token with no window and no padding attends to every
cached key. A sliding-window mask is built only when the model has a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class KVCache:
    """Contiguous per-layer K/V buffers [batch, kv_heads, max_len, head_dim] plus key positions."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # slots [0, length) are filled
        self.padded = False  # some slot holds padding (position -1)

    def reserve(self, n: int) -> tuple[int, int]:
        """Claim the next ``n`` slots; returns (start, end)."""
        start = self.length
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens > capacity {self.max_len}")
        self.length = start + n
        return start, start + n


@dataclass
class SDPAMetadata:
    """Per-forward state of the SDPA backend, built by the caller: the masks and the optional cache.

    ``causal`` (training, scoring, a fresh prefill), ``cached`` (the reference generator: append to
    a :class:`KVCache`) and ``packed`` (several documents in one training row) are the builders.
    """

    cache: KVCache | None
    start: int  # first cache slot written by this forward
    end: int
    full_mask: torch.Tensor | None  # bool [B, 1, S, T] or None
    full_causal: bool
    sliding_mask: torch.Tensor | None

    @classmethod
    def causal(cls, positions: torch.Tensor, sliding_window: int | None = None,
               padded: bool = False) -> SDPAMetadata:
        """Each row attends causally over its own tokens. ``positions`` [B, S] are absolute; with
        ``padded``, -1 marks left padding (the mask hides it), else they count 0, 1, ... per row."""
        return cls._build(positions, None, sliding_window, padded)

    @classmethod
    def cached(cls, cache: KVCache, positions: torch.Tensor, sliding_window: int | None = None,
               padded: bool = False) -> SDPAMetadata:
        """These tokens' K/V are appended to ``cache`` (their slots are claimed now) and each
        attends to every earlier cached key of its row and to its own row's new ones causally."""
        return cls._build(positions, cache, sliding_window, padded)

    @classmethod
    def _build(cls, positions: torch.Tensor, cache: KVCache | None, sliding_window: int | None,
               padded: bool) -> SDPAMetadata:
        seq = positions.shape[1]
        if cache is not None:
            start, end = cache.reserve(seq)
            cache.pos[:, start:end] = positions
            cache.padded = cache.padded or padded
            kv_pos = cache.pos[:, :end]
            no_pad = not cache.padded
        else:
            start, end = 0, seq
            kv_pos = positions
            no_pad = not padded
        full_mask, full_causal = None, False
        if no_pad and (seq == 1 or start == 0):
            full_causal = seq > 1  # fresh causal prefill, or one token that sees every key
        else:
            full_mask = _mask(positions, kv_pos, start, None)
        sliding_mask = _mask(positions, kv_pos, start, sliding_window) if sliding_window else None
        return cls(cache, start, end, full_mask, full_causal, sliding_mask)

    @classmethod
    def packed(cls, documents: torch.Tensor, sliding_window: int | None = None) -> SDPAMetadata:
        """Packed training sequences: causal within each document, nothing across documents.

        ``documents`` [B, S] holds each token's document index (non-decreasing along a row).
        """
        seq = documents.shape[1]
        idx = torch.arange(seq, device=documents.device)
        causal = idx[None, :] <= idx[:, None]
        same = documents[:, :, None] == documents[:, None, :]
        full = (causal & same).unsqueeze(1)
        sliding = None
        if sliding_window:
            sliding = full & ((idx[:, None] - idx[None, :]) < sliding_window)
        return cls(None, 0, seq, full, False, sliding)

    def fuses_rotary(self, q: torch.Tensor) -> bool:
        """Whether :meth:`attend` takes q/k unrotated with their rotary tables: never here (the
        model rotates them; the serving engine's paged batches fuse it on CUDA)."""
        return False

    def attend(self, layer_idx: int, sliding: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, H, S, D]."""
        if self.cache is not None:
            ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
            ck[:, :, self.start:self.end] = k
            cv[:, :, self.start:self.end] = v
            k, v = ck[:, :, :self.end], cv[:, :, :self.end]
        mask = self.sliding_mask if sliding else self.full_mask
        if q.shape[2] == 1:
            return decode_attention(q, k, v, mask)
        causal = False if sliding else self.full_causal
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=gqa)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row: softmax(q kᵀ/√d) v with the query heads of a KV group batched together.

    Computed in fp32 whatever the cache dtype: on CPU, bf16 SDPA for one query over 300 keys
    takes ~6x longer than this (bf16 matmuls of these small shapes are slow without native bf16
    units), and fp32 is also the more exact result.
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scores = (q.view(b, hkv, h // hkv, d).float() @ k.float().transpose(-1, -2)) * d**-0.5
    if mask is not None:  # [B, 1, 1, T] broadcasts over (kv head, group)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype).view(b, h, 1, d)


def _mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, S, T] mask (True = may attend) from absolute positions."""
    qp = q_pos[:, :, None]
    kp = kv_pos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= (qp - kp) < window
    seq, total = q_pos.shape[1], kv_pos.shape[1]
    own = torch.arange(total, device=q_pos.device)[None, :] == (
        start + torch.arange(seq, device=q_pos.device))[:, None]
    return (allowed | own[None]).unsqueeze(1)
