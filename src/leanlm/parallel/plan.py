"""The one tensor-parallel plan of the ``Transformer``, for serving and for training.

``tensor_parallel_(model, mesh)`` shards the model in place over a 1-D :class:`DeviceMesh` of p
ranks with ``parallelize_module`` (torchtitan's ``parallelize_llama`` and gpt-fast's ``apply_tp``
are the pattern):

    embed_tokens          vocab-parallel: rows of E split, each rank looks up the ids it holds
                          (zeros elsewhere), one all-reduce (torch's RowwiseParallel)
    q_proj, k_proj, v_proj, gate_proj, up_proj      column-parallel (ColumnParallel)
    o_proj, down_proj                               row-parallel (RowParallel)
    lm_head               column-parallel over the vocabulary, logits all-gathered to every rank

Column-then-row is Megatron-LM's split (Shoeybi et al. 2019): attention is independent per head
and SwiGLU per intermediate channel, so q/k/v (gate/up) split by heads (channels) need no
communication until o_proj (down_proj), whose partial products one all-reduce sums — one per
attention block and one per MLP. Rank r holds query heads [r·H/p, (r+1)·H/p) and ``Attention``
runs with H/p local heads. K/V heads follow the query heads that read them:

- Hkv ≥ p (Hkv divisible by p): rank r holds K/V heads [r·Hkv/p, (r+1)·Hkv/p) — exactly those
  its query heads use, since query head j reads K/V head j // (H/Hkv);
- Hkv < p (p divisible by Hkv): each K/V head is replicated on p/Hkv consecutive ranks, and rank
  r holds K/V head r // (p/Hkv), the one all its query heads read (vLLM's ``QKVParallelLinear``).

So each rank allocates K/V for :func:`local_kv_heads` heads — what a serving engine's paged cache
(and ``model.make_cache``) must be built with; ``model.layers[i].self_attn.num_kv_heads`` says the
same once the model is sharded. Every rank computes the same residual stream; norms, rotary
tables and learned positions are replicated.

Quantized linears shard with the layouts of :mod:`leanlm.quant.sharding`; LoRA adapters with
S-LoRA's (Sheng et al. 2023; :meth:`leanlm.peft.lora.LoRA.shard_`). Adapters may be attached
before sharding (the plan cuts them) or after (whole, e.g. by ``load_adapter`` from a peft
directory, as a server loads them on demand; then :func:`shard_adapters_` cuts them, and a
forward before that raises). Multi-adapter routing (:func:`leanlm.peft.api.routed`) works
unchanged: it picks tokens (dim -2), which every rank holds all of, and each adapter acts on its
rank's slice of the features.

Training: an ``nn.Linear``'s weights are ``Shard(0)`` / ``Shard(1)`` DTensors, as torch's styles
make them, so FSDP2 over another dimension of the mesh composes; Megatron's f / g make the
gradients those of the unsharded model (the replicated LoRA factors' too, all-reduced; Qwen3's
per-head q/k norms, whose gradient each rank has for its heads only, are summed by
:func:`~leanlm.parallel.sequence.sum_partial_gradients_` after backward). Two options for
training (``leanlm.train.parallelize`` turns both on):

- ``sequence_parallel=True`` (:mod:`leanlm.parallel.sequence`; Korthikanti et al. 2022): the
  residual stream and the norms split by sequence, [B, S/p, h] per rank; the embedding
  reduce-scatters instead of all-reducing, ``self_attn`` and ``mlp`` all-gather their input once,
  o_proj / down_proj reduce-scatter, the head gathers the final norm's chunks; norm weights (and
  row-parallel biases) get their partial gradients summed after backward. The same bytes move as
  without it; norms and residual adds store and compute S/p tokens. Needs S divisible by p and
  rotary positions.
- ``loss_parallel=True`` (:mod:`leanlm.parallel.loss`): ``model.loss`` runs the fused chunked
  cross-entropy on each rank's vocabulary shard of the head, with per-row max / sum all-reduces
  instead of all-gathering [N, V] logits. ``model(...)`` still returns whole logits.

A pipeline stage (:mod:`leanlm.train.pipeline`: no embedding after the first stage, no head
before the last, parameter-free blocks for the other stages' layers) is sharded alike: the plan
applies to the modules it holds.

Refused before anything changes, in one line (:class:`LeanLMError`): heads or the MLP width not
divisible by p, K/V heads that neither divide nor are divided by p, a mesh that is not 1-D (pass
``mesh["tp"]`` of a larger mesh), DoRA and non-LoRA adapters on sharded layers, layers of another
type. With Hkv < p an ``nn.Linear``'s K/V weights are DTensors over the K/V weight with each head
repeated p/Hkv times, right for inference; gradients through them would have to be summed over
the copies, and a forward with gradients raises instead.
"""

from __future__ import annotations

import os
import types
from fnmatch import fnmatch

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel, parallelize_module

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.model import Attention, Transformer
from leanlm.parallel.loss import vocab_parallel_cross_entropy
from leanlm.parallel.sequence import GatherSequence, SumGradients
from leanlm.parallel.styles import (
    SHARDABLE,
    ColumnParallel,
    RowParallel,
    register_post,
    shard_adapter,
)


def tp_problem(config: ModelConfig, tp: int) -> str | None:
    """Why ``config`` cannot be split over ``tp`` ranks (None if it can)."""
    h, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    if tp < 1:
        return f"tensor parallel size must be at least 1, got {tp}"
    if h % tp:
        return f"tensor parallel size {tp} does not divide the model's {h} attention heads"
    if kv % tp and tp % kv:
        return (f"tensor parallel size {tp} neither divides the model's {kv} key/value heads nor is a "
                f"multiple of them")
    if inter % tp:
        return f"tensor parallel size {tp} does not divide the model's MLP width {inter}"
    return None


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise a one-line :class:`LeanLMError` if ``config`` cannot be split over ``tp`` ranks —
    callable before any model is built (a launcher's argument check)."""
    problem = tp_problem(config, tp)
    if problem:
        raise LeanLMError(problem)


def local_kv_heads(config: ModelConfig, tp: int) -> int:
    """K/V heads each of ``tp`` ranks holds and caches: Hkv/tp, or 1 (a replica) when Hkv < tp."""
    check_tensor_parallel(config, tp)
    return max(1, config.num_kv_heads // tp)


def tp_mesh(size: int | None = None) -> DeviceMesh:
    """A 1-D mesh named "tp" over ``size`` ranks (default: the whole world) of this process's
    device type; ``torch.distributed`` must be initialised (``init_device_mesh`` does it under
    torchrun)."""
    if size is None:
        initialised = torch.distributed.is_initialized()
        size = torch.distributed.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (size,), mesh_dim_names=("tp",))


def tp_plan(config: ModelConfig, tp: int, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The plan for ``parallelize_module``: module name pattern -> style (the embedding apart)."""
    kv_replicas = max(1, tp // config.num_kv_heads)
    sp = sequence_parallel
    plan: dict[str, ParallelStyle] = {
        "layers.*.self_attn.q_proj": ColumnParallel(sequence_parallel=sp),
        "layers.*.self_attn.k_proj": ColumnParallel(replicas=kv_replicas, sequence_parallel=sp),
        "layers.*.self_attn.v_proj": ColumnParallel(replicas=kv_replicas, sequence_parallel=sp),
        "layers.*.self_attn.o_proj": RowParallel(sequence_parallel=sp),
        "layers.*.mlp.up_proj": ColumnParallel(sequence_parallel=sp),
        "layers.*.mlp.down_proj": RowParallel(sequence_parallel=sp),
        "lm_head": ColumnParallel(gather=True, sequence_parallel=sp),
    }
    if config.gated_mlp:
        plan["layers.*.mlp.gate_proj"] = ColumnParallel(sequence_parallel=sp)
    if config.qk_norm:  # per-head norms: each rank sees its own heads
        plan["layers.*.self_attn.q_norm"] = plan["layers.*.self_attn.k_norm"] = SumGradients()
    if sp:
        plan["layers.*.self_attn"] = plan["layers.*.mlp"] = GatherSequence()
        for norm in ("layers.*.input_layernorm", "layers.*.post_attention_layernorm", "norm"):
            plan[norm] = SumGradients()
    return plan


def _planned(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, nn.Module]:
    linear = [p for p, style in plan.items() if isinstance(style, (ColumnParallel, RowParallel))]
    return {n: m for n, m in model.named_modules() if any(fnmatch(n, p) for p in linear)}


def _preflight(model: Transformer, mesh: DeviceMesh, plan: dict[str, ParallelStyle],
               sequence_parallel: bool) -> None:
    """Every reason not to shard, found before anything is sharded."""
    if mesh.ndim != 1:
        raise LeanLMError(f"tensor_parallel_ takes a 1-D mesh (the tensor-parallel dimension, e.g. "
                          f"mesh['tp']); got a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)}")
    check_tensor_parallel(model.config, mesh.size())
    if sequence_parallel and model.embed_positions is not None:
        raise LeanLMError("sequence parallelism needs rotary positions: this model adds learned "
                          "position embeddings to the whole sequence")
    if getattr(model, "tp_mesh", None) is not None:
        raise LeanLMError("the model is already sharded for tensor parallelism")
    for name, module in _planned(model, plan).items():
        if not isinstance(module, SHARDABLE):
            raise LeanLMError(f"{name} is a {type(module).__name__}: the tensor-parallel plan shards "
                              "nn.Linear, QuantLinear and W8A8Linear layers")
        for aname, adapter in getattr(module, "adapters", {}).items():
            problem = adapter.shard_problem()
            if problem:
                raise LeanLMError(f"adapter {aname!r} on {name}: {problem}")


def _wait_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return funcol.wait_tensor(out)


def tensor_parallel_(model: Transformer, mesh: DeviceMesh, sequence_parallel: bool = False,
                     loss_parallel: bool = False) -> Transformer:
    """Shard ``model`` in place over the 1-D ``mesh`` (see the module docstring); returns it.

    Every rank must have built the same whole model (the same checkpoint or seed), adapters
    included: each keeps its own slices and nothing is sent. Afterwards ``model(...)`` takes and
    returns the same tensors as before on every rank (logits over the whole vocabulary), and
    ``model.tp_mesh`` is ``mesh``. ``sequence_parallel`` and ``loss_parallel`` are the training
    options of the module docstring (a model built on the meta device may be sharded too).
    """
    model.unfuse_projections_()  # the plan shards q/k/v and gate/up each by heads / columns
    model.unpack_weights_()  # weights packed for CPU inference are sharded in their plain layout
    tp = mesh.size()
    plan = tp_plan(model.config, tp, sequence_parallel)
    _preflight(model, mesh, plan, sequence_parallel)
    embed_out = Shard(1) if sequence_parallel else Replicate()  # (a reduce-scatter by sequence)
    if model.embed_tokens is not None:  # (a pipeline stage after the first has none)
        parallelize_module(model.embed_tokens, mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=embed_out),
                           src_data_rank=None)
        model.embed_tokens.register_forward_hook(_wait_output)  # a plain tensor, not an async one
        if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
            model.lm_head.weight = model.embed_tokens.weight  # both Shard(0) over the vocabulary
    # each pattern spelled out as the modules it names: a pipeline stage holds some of them (no
    # head before the last stage, parameter-free Skip blocks), which parallelize_module would warn of
    names = [n for n, _ in model.named_modules()]
    plan = {n: style for k, style in plan.items() for n in names if fnmatch(n, k)}
    parallelize_module(model, mesh, plan, src_data_rank=None)
    if loss_parallel and hasattr(model.lm_head, "tp_shard") and isinstance(model.lm_head, nn.Linear):
        model.lm_head.cross_entropy = types.MethodType(vocab_parallel_cross_entropy, model.lm_head)
    kv = local_kv_heads(model.config, tp)
    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads, m.num_kv_heads = m.num_heads // tp, kv
    model.tp_mesh = mesh
    return model


def shard_adapters_(model: nn.Module) -> None:
    """Shard the adapters attached to a sharded model since it was sharded (S-LoRA's layout) and
    keep each layer's all-reduce / all-gather after them. Adapters must be whole (built on the
    sharded model, e.g. by ``load_adapter``, which builds them with the layers' whole shapes)."""
    shards = {n: m for n, m in model.named_modules() if hasattr(m, "tp_shard")}
    for name, module in shards.items():  # all-or-nothing: look at every adapter first
        for aname, adapter in getattr(module, "adapters", {}).items():
            problem = None if getattr(adapter, "tp_sharded", False) else adapter.shard_problem()
            if problem:
                raise LeanLMError(f"adapter {aname!r} on {name}: {problem}")
    for module in shards.values():
        adapters = getattr(module, "adapters", {})
        for adapter in adapters.values():
            shard_adapter(module, adapter)
        if adapters:
            register_post(module)
