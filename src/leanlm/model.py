"""THE transformer: every supported family is this one module configured by a ModelConfig.

A pre-norm decoder-only transformer (Vaswani et al. 2017; Radford et al. 2019 for GPT-2's
pre-norm layout; Touvron et al. 2023 for Llama's RMSNorm + SwiGLU + RoPE):

    h_0     = E[x] (+ P[pos] for learned positions)
    a_l     = h_{l-1} + W_o · Attn(RoPE(W_q n(h)), RoPE(W_k n(h)), W_v n(h))     n = input norm
    h_l     = a_l + MLP(n'(a_l)),  MLP(x) = W_down (act(W_gate x) ⊙ W_up x)  or  W_down act(W_up x)
    logits  = W_out · norm(h_L)

RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + ε), computed in fp32 and cast back before the weight, as
Hugging Face does, so that bf16 results agree bit-for-bit in the common case. RoPE rotates pairs
(x_i, x_{i+d/2}) by angle p · θ^{-2i/d} (the "rotate_half" layout of HF checkpoints); the angle
table is computed in fp32 from the positions on every forward. Qwen3 applies RMSNorm over the
head dimension to q and k before RoPE. Grouped-query attention keeps ``num_kv_heads`` K/V heads,
each shared by ``num_heads / num_kv_heads`` query heads.

Module names follow the Hugging Face Llama layout (``layers.N.self_attn.q_proj`` …) for every
family, so quantization and PEFT target the same names everywhere; ``checkpoint.py`` maps GPT-2's
fused Conv1D names onto them. Every projection and the head is a
:class:`~leanlm.kernels.cpu_linear.Linear`: an ``nn.Linear`` that serves CPU inference from a
oneDNN-prepacked copy of its weight.

One forward, whatever the caller: ``model(tokens, positions, attn, rows)`` with ``attn`` the
attention metadata the caller built (:class:`~leanlm.attention.SDPAMetadata` ``.causal`` by
default, ``.cached`` for the reference generator, ``.packed`` for packed training, the serving
engine's paged batches) and ``rows`` the positions whose logits are wanted; ``model.loss(...)`` is
the training objective through the fused head + cross-entropy. The blocks receive a
:class:`LayerContext`: the caller's metadata and the rotary tables of these positions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import fusion, kernels
from leanlm.attention import KVCache, SDPAMetadata, compute_dtype
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.kernels import cpu_ops, rmsnorm, rotary, silu_mul
from leanlm.kernels.cpu_linear import Linear
from leanlm.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with ``residual``, (norm(x + residual), x + residual) — fused on CUDA."""
        out_dtype = compute_dtype(x)
        if out_dtype == x.dtype and kernels.use_triton(x, self.weight):
            y, s = rmsnorm.rms_norm(x, self.weight, self.eps, residual)
        elif out_dtype == x.dtype and cpu_ops.runs(x, self.weight, *([] if residual is None else [residual])):
            y, s = cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        else:
            y, s = rmsnorm.reference(x, self.weight, self.eps, residual)
            # Under autocast, hand the next matmuls their input dtype once, rather than have
            # autocast cast this output separately for each of q/k/v (or gate/up) and each backward.
            y = y.to(out_dtype)
        return y if residual is None else (y, s)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of q or k [B, H, S, D] (kernels: :mod:`leanlm.kernels.rotary` on CUDA,
    :mod:`leanlm.kernels.cpu_ops` on the CPU)."""
    if kernels.use_triton(x):
        return rotary.rotary(x, cos, sin)
    if cpu_ops.runs(x, cos, sin) and cos.shape[-1] == x.shape[-1]:
        return cpu_ops.rotary(x, cos, sin)
    return rotary.reference(x, cos, sin)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ^{-2i/d}, with Llama-3 or linear (position interpolation) scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    # llama3 (Meta's Llama 3.1 release): divide low frequencies by `factor`, keep high ones,
    # interpolate smoothly between the two wavelength thresholds.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LayerContext:
    """What every block of one forward shares: the caller's attention metadata (anything with
    ``attend(layer_idx, sliding, q, k, v)`` and ``fuses_rotary(q)``) and the rotary tables
    [B, 1, S, D] of the positions (None for learned positions). A backend whose ``fuses_rotary``
    is true receives q and k unrotated with ``attend(..., rotary=(cos, sin))`` and rotates them
    as it stores K/V (the serving engine's paged batches on CUDA: :mod:`leanlm.kernels.rotary_store`).
    A backend may also offer ``attend_qkv(layer_idx, sliding, qkv, heads, (cos, sin))``: the
    attention output [B, S, H·D] straight from a fused q/k/v projection's output [B, S, (H + 2
    Hkv)·D], or None where it does not take that step (the serving engine's CPU decode steps:
    :func:`leanlm.kernels.cpu_attention.rotary_decode_qkv`)."""

    attn: Any
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.q_proj = Linear(h, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = Linear(config.num_heads * d, h, bias=config.o_bias)
        self.q_norm = RMSNorm(d, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = fusion.fused(self, "qkv")
        if qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one product, split (views of its output)
            proj = qkv[0](x)
            whole = getattr(ctx.attn, "attend_qkv", None)  # the backend's whole step, where it has one
            if whole is not None and ctx.cos is not None and self.q_norm is None:
                out = whole(self.layer_idx, self.sliding, proj, self.num_heads, (ctx.cos, ctx.sin))
                if out is not None:
                    return self.o_proj(out)
            q, k, v = proj.split(qkv[1], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.cos is not None and ctx.attn.fuses_rotary(q):  # rotary in the backend's K/V store
            out = ctx.attn.attend(self.layer_idx, self.sliding, q, k, v, rotary=(ctx.cos, ctx.sin))
        else:
            if ctx.cos is not None:
                q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
            out = ctx.attn.attend(self.layer_idx, self.sliding, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias) if config.gated_mlp else None
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.activation = config.activation

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return F.silu(x)
        return F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def act_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) ⊙ up of the fused gate/up output [..., 2I]: one kernel for SiLU on CUDA."""
        if self.activation == "silu" and kernels.use_triton(gate_up):
            return silu_mul.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fusion.fused(self, "gate_up")
        if gate_up is not None:
            return self.down_proj(self.act_mul(gate_up[0](x)))
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx)
        if isinstance(self.post_attention_layernorm, RMSNorm):  # residual add fused into the norm
            n, x = self.post_attention_layernorm(h, residual=x)
        else:
            x = x + h
            n = self.post_attention_layernorm(x)
        return x + self.mlp(n)


@torch.no_grad()
def init_param_(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """The init rule: zeros for biases, ones for norm weights (1-D), normal(0, std) for matrices."""
    if name.endswith("bias"):
        p.zero_()
    elif p.ndim == 1:
        p.fill_(1.0)
    else:
        p.normal_(0.0, std, generator=generator)


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, without its random init when built on the meta device (as
    every load and training run builds the model): ``normal_`` of a meta tensor imports
    ``torch._dynamo``, 1.8 s of a 3 s model load."""
    emb = nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    if emb.weight.device.type != "meta":
        nn.init.normal_(emb.weight)
    return emb


def _pack(module: nn.Module, after: Callable[[torch.Tensor], None] | None) -> int:
    """Pack the linears of ``module`` (see :meth:`Transformer.pack_weights_`)."""
    n = 0
    # the largest first (the head): while one is repacked, its plain copy and its packed
    # copy are both resident, and that pair must not come on top of everything else
    linears = sorted((m for m in module.modules() if isinstance(m, Linear)), key=lambda m: -m.weight.numel())
    for linear in linears:
        plain = linear.weight
        if not linear.is_packed and linear.pack_():
            n += 1
            if after is not None:
                after(plain)
    return n


def _fuse_layer(layer: Block, after: Callable[[torch.Tensor], None] | None) -> int:
    """Fuse the q/k/v and gate/up of ``layer`` (see :meth:`Transformer.fuse_projections_`)."""
    return (fusion.fuse_(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv", after)
            + fusion.fuse_(layer.mlp, ("gate_proj", "up_proj"), "gate_up", after))


class Transformer(nn.Module):
    """The one model. ``model(tokens)`` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (embedding(config.max_position_embeddings, config.hidden_size)
                                if config.positional == "learned" else None)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        device = torch.empty(0).device  # where it is built (meta for loads and training runs)
        with torch.device("cpu"):  # python reference ops on meta tensors import torch._dynamo (~1.2 s)
            inv_freq = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        # what attention metadata builders take: the window where some layer slides, else None
        self.sliding_window = config.sliding_window if "sliding_attention" in config.layer_types else None

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        device = device or self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def _apply(self, fn, recurse: bool = True):  # nn.Module signature (.to, .cuda, .bfloat16 ...)
        super()._apply(fn, recurse)
        self.init_buffers(self.inv_freq.device)  # the rotary table stays fp32 in every dtype
        return self

    def tie_weights(self) -> None:
        # (not quantized; a pipeline's last stage has no embedding: its head is its own copy)
        if (self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear)
                and self.embed_tokens is not None):
            self.lm_head.weight = self.embed_tokens.weight

    def pack_weights_(self, after: Callable[[torch.Tensor], None] | None = None, fuse: bool = False) -> int:
        """Keep each linear's weight only in oneDNN's packed layout for CPU inference
        (:meth:`~leanlm.kernels.cpu_linear.Linear.pack_`); returns how many were packed.
        ``after(plain)`` is called with each plain weight once its packed copy exists (the loader
        hands its pages back to the file). A tied head is packed apart from the embedding, which
        keeps the plain tensor for its lookups: load with ``pack=True`` to keep that one in the
        file mapping instead of memory. ``fuse`` (the loader) fuses each layer's projections
        (:meth:`fuse_projections_`) just before packing it, after the head. :meth:`unpack_weights_`
        undoes the packing."""
        if not fuse:
            return _pack(self, after)
        # the head first, then a layer at a time: one layer's stacked plain copies are resident
        # beside the packed weights, not every layer's
        n = _pack(self.lm_head, after)
        for layer in self.layers:
            _fuse_layer(layer, after)
            n += _pack(layer, after)
        return n

    def unpack_weights_(self) -> None:
        """Plain weight parameters again (training, merging adapters, quantizing, sharding)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.unpack_()
        self.tie_weights()

    def fuse_projections_(self, after: Callable[[torch.Tensor], None] | None = None) -> int:
        """Make each layer's q/k/v one ``qkv`` linear and its gate/up one ``gate_up`` linear for
        inference (:mod:`leanlm.fusion`: plain and weight-only quantized layers; a packed model
        stays packed); returns how many groups were fused. ``after(plain)`` is called with each
        part's plain weight once the fused copy exists (the loader hands its pages back). Layers
        with adapters, tensor-parallel shards and quantized parts of different input layouts
        (act-order ``g_idx``) stay apart. The state dict keeps the Hugging Face names;
        :meth:`unfuse_projections_` (which training, quantizing, adapters and sharding need)
        undoes it."""
        return sum(_fuse_layer(layer, after) for layer in self.layers)

    def unfuse_projections_(self) -> int:
        """q/k/v and gate/up as separate linears again, equal to what was fused (packed ones
        stay packed); returns how many groups were split."""
        return sum(fusion.unfuse_(m) for m in self.modules() if fusion.groups(m))

    @contextlib.contextmanager
    def projections_unfused(self) -> Iterator[Transformer]:
        """``with model.projections_unfused(): ...`` runs the block on the separate linears
        (e.g. writing a checkpoint format that names each one) and fuses them again after."""
        fused = self.unfuse_projections_()
        try:
            yield self
        finally:
            if fused:
                self.fuse_projections_()

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init of every parameter with :func:`init_param_`."""
        for name, p in self.named_parameters():
            init_param_(name, p, std, generator)

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A K/V cache for the heads this process holds: all of them, or its share under tensor
        parallelism (``leanlm.parallel`` sets the attention layers' ``num_kv_heads``)."""
        w = self.embed_tokens.weight
        c = self.config
        kv_heads = self.layers[0].self_attn.num_kv_heads if len(self.layers) else c.num_kv_heads
        return KVCache(c.num_layers, batch, kv_heads, c.head_dim, max_len, dtype or w.dtype, w.device)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              attn: Any = None) -> tuple[torch.Tensor, LayerContext]:
        """The input of block 0 and the context every block uses (see ``forward``). Layer-by-layer
        calibration (``quant/``) runs the blocks one at a time on these."""
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        if attn is None:
            attn = SDPAMetadata.causal(positions, self.sliding_window)
        x = self.embed_tokens(tokens)
        pos = positions.clamp(min=0)
        if self.embed_positions is not None:
            if int(pos.max()) >= self.config.max_position_embeddings:
                raise LeanLMError(f"position {int(pos.max())} is past the model's context of "
                                  f"{self.config.max_position_embeddings} (learned positions)")
            return x + self.embed_positions(pos), LayerContext(attn)
        # rotate q/k in the dtype they come out of their projections in (bf16 under autocast),
        # so rotary does not promote them to fp32 only to be cast back for SDPA
        return x, self.layer_context(pos, attn, compute_dtype(x))

    def layer_context(self, positions: torch.Tensor, attn: Any, dtype: torch.dtype) -> LayerContext:
        """The blocks' context for ``positions`` (>= 0): ``attn`` and, with rotary positions, the
        cos/sin tables in ``dtype`` (a pipeline stage after the first builds it from the positions)."""
        if self.config.positional == "learned":
            return LayerContext(attn)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return LayerContext(attn, emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None])

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               attn: Any = None) -> torch.Tensor:
        """The last block's output [B, S, hidden] (the head reads it through the final norm)."""
        x, ctx = self.embed(tokens, positions, attn)
        for layer in self.layers:
            x = layer(x, ctx)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, attn: Any = None,
                rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V], or [B, R, V] for the positions ``rows`` picks.

        ``positions`` [B, S] are absolute positions (default 0..S-1; -1 marks left padding, which
        ``attn`` must know of). ``attn`` is the attention metadata built by the caller
        (default ``SDPAMetadata.causal(positions)``): ``SDPAMetadata.cached`` appends these K/V to
        a cache, ``SDPAMetadata.packed`` keeps packed documents apart, and the serving engine's
        paged metadata (``leanlm.serve.paged``) reads and writes its block pool (tokens [1, T]).
        """
        x = self.hidden(tokens, positions, attn)
        if rows is not None:
            x = x[:, rows]
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
             attn: Any = None) -> torch.Tensor:
        """The mean next-token cross-entropy of ``targets`` [B, S] (ignore index -100), through the
        fused chunked head + loss of ``loss.py``: no full-size logits are materialised."""
        return linear_cross_entropy(self.norm(self.hidden(tokens, positions, attn)), self.lm_head, targets)
