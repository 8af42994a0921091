"""The serving engine's attention backend: K/V in fixed-size blocks of a preallocated pool (vLLM's
PagedAttention, Kwon et al. 2023), and the batches that read and write them.

:class:`PagedKVCache` holds, per layer, K and V of ``num_blocks * block_size`` token slots; a
request's block table lists its blocks, so token p of the request lives in slot
``table[p // block_size] * block_size + p % block_size``. :class:`PagedMetadata` is a varlen batch
(every scheduled token of every request flattened into one row, prefill chunks and decodes
mixed), :class:`DecodeMetadata` a decode-only batch of padded tables (what the compiled decode
step traces or captures). Both implement the model's attention signature
(``meta.attend(layer_idx, sliding, q, k, v)``, :mod:`leanlm.attention`) with the Triton kernels
of :mod:`leanlm.kernels.paged_attention` and :mod:`leanlm.kernels.kv_store` on CUDA, the C++
decode kernel of :mod:`leanlm.kernels.cpu_attention` for the one-query requests of a CPU batch,
and the torch references elsewhere. Where the kernels run on a float cache, ``fuses_rotary`` is true: the
model hands q and k over unrotated with their rotary tables, and one launch of
:mod:`leanlm.kernels.rotary_store` rotates q and k and stores k and v (a layer's rotary of q, of
k and its KV store in one kernel); elsewhere the model rotates them as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm import kernels
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.kernels import cpu_attention, cpu_ops, kv_store, paged_attention, rotary_store
from leanlm.kernels.rotary import reference as rope_reference
from leanlm.parallel import local_kv_heads

# --kv-cache-dtype: int8 codes with a scale per token and head, or FP8 E4M3 values (vLLM's
# ``fp8``/``fp8_e4m3`` with its default scale of 1: |x| <= 448 and a relative error <= 2^-4 for
# K/V in E4M3's normal range, no scales stored). "auto" is the model's dtype.
KV_CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of ``--kv-cache-dtype name`` for a model computing in ``model_dtype``."""
    if name != "auto" and name not in KV_CACHE_DTYPES:
        raise LeanLMError(f"kv_cache_dtype {name!r}: expected auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES.get(name, model_dtype)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                       tensor_parallel_size: int = 1) -> int:
    """K and V bytes of one block over all layers on one rank (int8: plus an fp16 scale per token
    and head)."""
    per_head = config.head_dim * dtype.itemsize + (2 if dtype == torch.int8 else 0)
    return 2 * config.num_layers * block_size * local_kv_heads(config, tensor_parallel_size) * per_head


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
        cpu_ops.prepare(dtype, device)  # build the C++ CPU ops now, not on a request
        return cls(make(shape, dtype), make(shape, dtype), block_size, *scales)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def torch_path(self) -> bool:
        """Whether attention must run the torch references: no Triton kernel reads int8 or FP8 K/V."""
        return self.quantized or self.k[0].dtype == torch.float8_e4m3fn

    def storable(self, x: torch.Tensor) -> torch.Tensor:
        """K/V rows as this cache stores them (FP8: clamped to E4M3's range, which has no inf)."""
        return x.clamp(-FP8_MAX, FP8_MAX) if self.k[0].dtype == torch.float8_e4m3fn else x


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, heads, D] -> (int8 codes, fp16 scales [T, heads]) with x ≈ codes · scale."""
    scale = (x.float().abs().amax(-1) / 127).clamp(min=1e-8).to(torch.float16)
    codes = torch.round(x.float() / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


Tables = tuple[torch.Tensor, torch.Tensor]  # the model's rotary cos/sin [1, 1, T, D]


def fuses_rotary(cache: PagedKVCache, q: torch.Tensor) -> bool:
    """Whether a paged batch rotates q/k itself: where the kernels run on a float cache."""
    return not cache.torch_path and kernels.use_triton(q)


def rotated(q: torch.Tensor, k: torch.Tensor, tables: Tables | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [1, heads, T, D] rotated by the reference (for a caller that passed tables where the
    batch does not fuse rotary), or as they are without tables."""
    if tables is None:
        return q, k
    return rope_reference(q, *tables), rope_reference(k, *tables)


def store(ck: torch.Tensor, cv: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
          v_t: torch.Tensor, slot_mapping: torch.Tensor, tables: Tables | None) -> torch.Tensor:
    """The kernel path's K/V store of q_t, k_t, v_t [T, heads, D]: with rotary tables, fused with
    the rotary of q and k (one launch); returns q (rotated when tables are given)."""
    if tables is None:
        kv_store.kv_store(ck, cv, k_t, v_t, slot_mapping)
        return q_t
    cos, sin = tables
    return rotary_store.rotary_store(q_t, k_t, v_t, cos[0, 0], sin[0, 0], ck, cv, slot_mapping)


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
    _lengths: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _split: cpu_attention.Split | None = field(default=None, repr=False)
    _stored: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _cpu_rotary: bool | None = field(default=None, repr=False)

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_lens, query_start) as int32 tensors on the cache's device, built once per step."""
        if self._lengths is None:
            dev = self.slot_mapping.device
            self._lengths = (torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
                             torch.tensor(self.query_start, dtype=torch.int32, device=dev))
        return self._lengths

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slots, rows): where the step's cached tokens go and which rows they are (None: every
        row; a negative slot is a token not cached), once per step for every layer."""
        if self._stored is None:
            keep = self.slot_mapping >= 0
            every = bool(keep.all())
            self._stored = (self.slot_mapping.long() if every else self.slot_mapping[keep].long(),
                            None if every else keep)
        return self._stored

    def split(self) -> cpu_attention.Split:
        """The batch cut for the CPU decode kernel, once per step."""
        if self._split is None:
            self._split = cpu_attention.Split.of(self.block_tables, self.seq_lens, self.query_start,
                                                 self.cache.block_size)
        return self._split

    def fuses_rotary(self, q: torch.Tensor) -> bool:
        """Where the kernels run on a float cache; on the CPU, for a step of one query per
        request whose every token is cached (its C++ decode kernel rotates and stores them)."""
        if self._cpu_rotary is None:
            self._cpu_rotary = (not self.cache.torch_path and cpu_attention.runs(q, self.cache.k[0])
                                and self.split().single_rows is None and self.stored()[1] is None)
        return self._cpu_rotary or fuses_rotary(self.cache, q)

    def attend_qkv(self, layer_idx: int, sliding: bool, qkv: torch.Tensor, heads: int,
                   rotary: Tables) -> torch.Tensor | None:
        """The fused q/k/v projection's output [1, T, (H + 2 Hkv) D] (unrotated) -> the attention
        output [1, T, H D], where the CPU's decode kernel takes the step (see :meth:`fuses_rotary`);
        else None."""
        if not (self.fuses_rotary(qkv) and self._cpu_rotary):
            return None
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        window = self.sliding_window if sliding else None
        return cpu_attention.rotary_decode_qkv(qkv[0], heads, *rotary, ck, cv, self.stored()[0], self.split(),
                                               self.cache.block_size, ck.shape[-1] ** -0.5, window)[None]

    def attend(self, layer_idx: int, sliding: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, rotary: Tables | None = None) -> torch.Tensor:
        """q [1, H, T, D], k/v [1, Hkv, T, D] -> [1, H, T, D] (q/k unrotated when ``rotary``
        tables come with them)."""
        fused = rotary is not None and self.fuses_rotary(q)
        if not fused:
            q, k = rotated(q, k, rotary)
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
        elif self.cache.torch_path:  # FP8 K/V: upcast as they are read
            kv_store.reference(ck, cv, self.cache.storable(k_t), self.cache.storable(v_t), self.slot_mapping)
            out = paged_attention.reference(q_t, ck, cv, self.block_tables, self.seq_lens,
                                            self.query_start, bs, scale, window)
        elif kernels.use_triton(q):
            q_t = store(ck, cv, q_t, k_t, v_t, self.slot_mapping, rotary if fused else None)
            seq_lens, query_start = self.lengths()
            max_query = max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))
            out = paged_attention.paged_attention(q_t, ck, cv, self.block_tables, seq_lens, query_start,
                                                  bs, scale, max_query, max(self.seq_lens), window)
        elif fused:  # the C++ decode kernel, rotating and storing the step's q/k/v as it goes
            cos, sin = rotary
            out = cpu_attention.rotary_decode(q_t, k_t, v_t, cos[0, 0], sin[0, 0], ck, cv, self.stored()[0],
                                              self.split(), bs, scale, window)
        else:  # the C++ decode kernel where it runs (cpu_attention), else the torch reference
            slots, keep = self.stored()
            kv_store.write_rows(ck, slots, k_t if keep is None else k_t[keep])
            kv_store.write_rows(cv, slots, v_t if keep is None else v_t[keep])
            if cpu_attention.runs(q_t, ck):
                out = cpu_attention.attention(q_t, ck, cv, self.split(), bs, scale, window)
            else:
                out = paged_attention.reference(q_t, ck, cv, self.block_tables, self.seq_lens,
                                                self.query_start, bs, scale, window)
        return out.transpose(0, 1)[None]


@dataclass
class DecodeMetadata:
    """A decode-only paged batch (one new token per request), its tables padded to ``max_len``:
    what the serving engine's compiled decode step traces, or captures in a CUDA graph (whose
    every shape a (batch, max_len) bucket fixes; padding rows write their K/V to a scratch slot and
    read it back (lens 1), so no mask is data-dependent). Traced by ``torch.compile`` on the CPU it
    is the C++ decode op (:meth:`attend_qkv`) where that runs, else torch ops (the batched
    reference); run eagerly where the kernels run (a CUDA graph's capture), the Triton KV store
    and split-KV decode kernel, launched with host-side shapes only."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [B] long, every slot valid
    block_tables: torch.Tensor  # [B, max_len // block_size]
    lens: torch.Tensor  # [B] keys per request after this step
    max_len: int
    sliding_window: int | None = None

    def fuses_rotary(self, q: torch.Tensor) -> bool:
        return fuses_rotary(self.cache, q)

    def attend_qkv(self, layer_idx: int, sliding: bool, qkv: torch.Tensor, heads: int,
                   rotary: Tables) -> torch.Tensor | None:
        """:meth:`PagedMetadata.attend_qkv` for this batch: the CPU's C++ decode kernel (an op in
        the compiled graph), where it runs on this cache; else None."""
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if self.cache.torch_path or not cpu_attention.runs(qkv, ck):
            return None
        window = self.sliding_window if sliding else None
        return cpu_ops.ops().rotary_decode_qkv(
            qkv[0], heads, *rotary, ck, cv, self.slot_mapping, self.block_tables, self.lens,
            self.cache.block_size, ck.shape[-1] ** -0.5, -1 if window is None else window)[None]

    def attend(self, layer_idx: int, sliding: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, rotary: Tables | None = None) -> torch.Tensor:
        """q [1, H, B, D], k/v [1, Hkv, B, D] -> [1, H, B, D] (q/k unrotated when ``rotary``
        tables come with them)."""
        kernel = self.fuses_rotary(q)  # the kernels run (and then rotary is fused too)
        if not kernel:
            q, k = rotated(q, k, rotary)
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        q_t, k_t, v_t = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        window = self.sliding_window if sliding else None
        if kernel:
            q_t = store(ck, cv, q_t, k_t, v_t, self.slot_mapping, rotary)
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
        kv_store.write_rows(ck, self.slot_mapping, self.cache.storable(k_t))
        kv_store.write_rows(cv, self.slot_mapping, self.cache.storable(v_t))
        out = paged_attention.decode_reference(
            q_t, ck, cv, self.block_tables, self.lens, self.max_len, self.cache.block_size,
            q.shape[-1] ** -0.5, window, scales)
        return out.transpose(0, 1)[None]
