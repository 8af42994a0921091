"""Attention backends behind one signature: ``meta.attend(layer_idx, sliding, q, k, v)``.

The model computes q, k, v for a layer (after rotary embedding) and hands them to the metadata
object built once per forward. The metadata owns everything that differs between backends: where
K/V live (nothing, a contiguous :class:`KVCache`, or — in the serving engine — a paged block
table) and which keys each query may see. This module holds the SDPA backend used for training,
scoring, prefill and the reference generator, and the paged backend of the serving engine
(:class:`PagedMetadata`: a flattened batch of requests whose K/V live in fixed-size blocks).

Masking. Query i at absolute position p_i may attend key j at position p_j iff
``0 <= p_j <= p_i`` and, for sliding-window layers, ``p_i - p_j < W`` (Mistral: each token sees
itself and the W-1 tokens before it). Padding is marked by position -1 (left padding in batched
generation); a padded query always sees its own slot so that no row of the softmax is empty
(an all-masked row would produce NaN, and ``0 * NaN`` would leak through the value matmul).
Packed training sequences (several documents in one row) add a document mask: a query sees only
keys of its own document (``SDPAMetadata.packed``). Common cases skip the mask: a fresh causal
prefill uses ``is_causal``, one decode token with no window and no padding attends to every
cached key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leanlm import kernels
from leanlm.kernels import kv_store, paged_attention


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
    """Per-forward state for the SDPA backend: rotary tables, masks and the optional cache."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    cache: KVCache | None
    start: int  # first cache slot written by this forward
    end: int
    full_mask: torch.Tensor | None  # bool [B, 1, S, T] or None
    full_causal: bool
    sliding_mask: torch.Tensor | None

    @classmethod
    def build(cls, positions: torch.Tensor, cache: KVCache | None, sliding_window: int | None,
              has_sliding: bool, contiguous: bool) -> SDPAMetadata:
        """``positions`` is [B, S] (-1 = padding); ``contiguous`` means no padding anywhere."""
        seq = positions.shape[1]
        if cache is not None:
            start, end = cache.reserve(seq)
            cache.pos[:, start:end] = positions
            cache.padded = cache.padded or not contiguous
            kv_pos = cache.pos[:, :end]
            no_pad = not cache.padded
        else:
            start, end = 0, seq
            kv_pos = positions
            no_pad = contiguous
        full_mask, full_causal = None, False
        if no_pad and (seq == 1 or start == 0):
            full_causal = seq > 1  # fresh causal prefill, or one token that sees every key
        else:
            full_mask = _mask(positions, kv_pos, start, None)
        sliding_mask = _mask(positions, kv_pos, start, sliding_window) if has_sliding else None
        return cls(None, None, cache, start, end, full_mask, full_causal, sliding_mask)

    @classmethod
    def packed(cls, documents: torch.Tensor, sliding_window: int | None,
               has_sliding: bool) -> SDPAMetadata:
        """Packed training sequences: causal within each document, nothing across documents.

        ``documents`` [B, S] holds each token's document index (non-decreasing along a row).
        """
        seq = documents.shape[1]
        idx = torch.arange(seq, device=documents.device)
        causal = idx[None, :] <= idx[:, None]
        same = documents[:, :, None] == documents[:, None, :]
        full = (causal & same).unsqueeze(1)
        sliding = None
        if has_sliding:
            near = (idx[:, None] - idx[None, :]) < (sliding_window or seq)
            sliding = full & near
        return cls(None, None, None, 0, seq, full, False, sliding)

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


@dataclass
class PagedKVCache:
    """Per-layer K/V slots [num_blocks * block_size, kv_heads, head_dim]; slot = block * size + offset.

    With ``int8`` storage each (slot, head) row also has an fp16 scale (``k_scale``/``v_scale``
    [slots, kv_heads]): x ≈ s · q with s = max|x| / 127 over the head dimension, the symmetric
    per-token, per-head scheme of vLLM's int8 KV cache. A head of 64 values then takes 66 bytes
    instead of 128 (bf16), 1.94x the tokens in the same memory.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    k_scale: list[torch.Tensor] | None = None
    v_scale: list[torch.Tensor] | None = None

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> PagedKVCache:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        make = lambda shape, dt: [torch.zeros(shape, dtype=dt, device=device) for _ in range(num_layers)]
        scales = (make(shape[:2], torch.float16), make(shape[:2], torch.float16)) \
            if dtype == torch.int8 else (None, None)
        return cls(make(shape, dtype), make(shape, dtype), block_size, *scales)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, heads, D] -> (int8 codes, fp16 scales [T, heads]) with x ≈ codes · scale."""
    scale = (x.float().abs().amax(-1) / 127).clamp(min=1e-8).to(torch.float16)
    codes = torch.round(x.float() / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


@dataclass
class PagedMetadata:
    """A varlen batch for the paged backend: Triton kernels on CUDA, their torch references elsewhere.

    The batch is one row of T tokens: request r owns queries ``query_start[r]:query_start[r+1]``
    at positions ``seq_lens[r] - m .. seq_lens[r] - 1`` and sees keys 0..seq_lens[r]-1 through row
    r of ``block_tables`` (padded: entries past ⌈seq_lens[r] / block_size⌉ are never read);
    ``slot_mapping[t]`` is where token t's K/V are written (see :mod:`leanlm.kernels.paged_attention`).
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] long
    query_start: list[int]  # R + 1 offsets into the batch
    seq_lens: list[int]  # keys per request after this step
    block_tables: torch.Tensor  # [R, max blocks] int32
    sliding_window: int | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    _lengths: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_lens, query_start) as int32 tensors on the cache's device, built once per step."""
        if self._lengths is None:
            dev = self.slot_mapping.device
            self._lengths = (torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
                             torch.tensor(self.query_start, dtype=torch.int32, device=dev))
        return self._lengths

    def attend(self, layer_idx: int, sliding: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, D], k/v [1, Hkv, T, D] -> [1, H, T, D]."""
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        q_t, k_t, v_t = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, heads, D]
        bs, scale = self.cache.block_size, q.shape[-1] ** -0.5
        window = self.sliding_window if sliding else None
        if self.cache.quantized:  # int8 K/V: the torch path (no int8 kernel yet)
            ks, vs = self.cache.k_scale[layer_idx], self.cache.v_scale[layer_idx]
            (kq, kscale), (vq, vscale) = quantize_kv(k_t), quantize_kv(v_t)
            kv_store.reference(ck, cv, kq, vq, self.slot_mapping)
            kv_store.reference(ks, vs, kscale, vscale, self.slot_mapping)
            out = paged_attention.reference(q_t, ck, cv, self.block_tables, self.seq_lens,
                                            self.query_start, bs, scale, window, (ks, vs))
        elif kernels.use_triton(q):
            kv_store.kv_store(ck, cv, k_t, v_t, self.slot_mapping)
            seq_lens, query_start = self.lengths()
            max_query = max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))
            out = paged_attention.paged_attention(q_t, ck, cv, self.block_tables, seq_lens, query_start,
                                                  bs, scale, max_query, max(self.seq_lens), window)
        else:
            kv_store.reference(ck, cv, k_t, v_t, self.slot_mapping)
            out = paged_attention.reference(q_t, ck, cv, self.block_tables, self.seq_lens,
                                            self.query_start, bs, scale, window)
        return out.transpose(0, 1)[None]


@dataclass
class DecodeMetadata:
    """A decode-only paged batch (one new token per request) whose every shape is fixed by a
    (batch, max_len) bucket: what the serving engine's compiled decode step traces, or captures
    in a CUDA graph. Padding rows write their K/V to a scratch slot and read it back (lens 1), so
    no mask is data-dependent. Traced by ``torch.compile`` it is torch ops (the batched
    reference); run eagerly where the kernels run (a CUDA graph's capture), the Triton KV store
    and split-KV decode kernel, launched with host-side shapes only."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [B] long, every slot valid
    block_tables: torch.Tensor  # [B, max_len // block_size]
    lens: torch.Tensor  # [B] keys per request after this step
    max_len: int
    sliding_window: int | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    def attend(self, layer_idx: int, sliding: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q [1, H, B, D], k/v [1, Hkv, B, D] -> [1, H, B, D]."""
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        q_t, k_t, v_t = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        window = self.sliding_window if sliding else None
        if not self.cache.quantized and kernels.use_triton(q):
            kv_store.kv_store(ck, cv, k_t, v_t, self.slot_mapping)
            rows = q_t.shape[0]
            starts = torch.arange(rows + 1, dtype=torch.int32, device=q.device)
            out = paged_attention.paged_attention(
                q_t, ck, cv, self.block_tables, self.lens, starts, self.cache.block_size,
                q.shape[-1] ** -0.5, 1, self.max_len, window)
            return out.transpose(0, 1)[None]
        scales = None
        if self.cache.quantized:
            (k_t, kscale), (v_t, vscale) = quantize_kv(k_t), quantize_kv(v_t)
            scales = (self.cache.k_scale[layer_idx], self.cache.v_scale[layer_idx])
            scales[0].index_copy_(0, self.slot_mapping, kscale)
            scales[1].index_copy_(0, self.slot_mapping, vscale)
        ck.index_copy_(0, self.slot_mapping, k_t.to(ck.dtype))
        cv.index_copy_(0, self.slot_mapping, v_t.to(cv.dtype))
        out = paged_attention.decode_reference(
            q_t, ck, cv, self.block_tables, self.lens, self.max_len, self.cache.block_size,
            q.shape[-1] ** -0.5, window, scales)
        return out.transpose(0, 1)[None]
