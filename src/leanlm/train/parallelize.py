"""Apply the training techniques to the one model, in place, in a fixed order: AC, compile, FSDP/DDP.

The order is torchtitan's (``parallelize_llama``) and each step depends on the previous one:

1. **Activation checkpointing** (Chen et al. 2016; Korthikanti et al. 2022) wraps blocks so
   their activations are recomputed in backward instead of stored. ``full`` wraps every
   ``ac_every``-th block: a block then keeps only its input, so activation memory falls from
   O(L·(34·h + 5·a·s)·s·b) bytes to O(L·h·s·b) plus one block's worth. ``selective`` is
   op-level selective AC: matmul and attention outputs are saved (expensive to recompute),
   element-wise ops (norms, activations, rotary) are recomputed (cheap, but memory-hungry).
2. **torch.compile** per block (the blocks are identical, so one graph serves all), after AC so
   the checkpoint region is traced with it, before FSDP so FSDP's hooks stay outside the graph.
3. **Data parallelism.** FSDP2 (``fully_shard``; Zhao et al. 2023, the PyTorch FSDP paper, and
   ZeRO, Rajbhandari et al. 2020) shards each block's parameters, gradients and optimizer state
   over the ranks; the root call shards the rest (embeddings, final norm, head). With
   ``reshard_after_forward=True`` parameters are freed after each block's forward and gathered
   again for backward (ZeRO-3); ``False`` keeps them until backward (ZeRO-2: less communication,
   more memory). ``MixedPrecisionPolicy`` casts gathered parameters to bf16 for compute and
   reduces gradients in fp32, while the sharded fp32 parameters stay the optimizer's master copy.
   ``CPUOffloadPolicy`` keeps shards and optimizer state in host memory (GPU runs). DDP is
   FSDP2's ``replicate`` (the module stays in place, names unchanged): full replicas, gradients
   all-reduced per block as its backward finishes. Either way ``Transformer.loss`` is registered
   as a forward method, so the root's all-gathers and gradient hooks wrap it as they wrap
   ``forward``.

All of it works on gloo (CPU) and nccl (GPU) under ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.train.config import TrainConfig

# ops whose outputs selective AC keeps: matmuls and attention (recomputing them costs FLOPs)
_SAVE_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _sac_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_context() -> tuple[object, object]:
    return create_selective_checkpoint_contexts(_sac_policy)


def apply_ac(model: Transformer, mode: str, every: int = 1) -> None:
    """Wrap blocks with activation checkpointing (``full`` or op-level ``selective``)."""
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if i % every:
            continue
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_sac_context)
        model.layers[i] = wrapped


def apply_compile(model: Transformer) -> None:
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None,
               reshard_after_forward: bool, cpu_offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=mp, offload_policy=offload)
    # the root holds embeddings, final norm and the (possibly tied) head; its parameters are
    # needed again right at the start of backward, so it is never resharded after forward
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)


def apply_ddp(model: Transformer, mesh: DeviceMesh) -> None:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    for block in model.layers:  # each block's gradients are all-reduced as soon as they are ready
        replicate(block, mesh=mesh)
    replicate(model, mesh=mesh)


def parallel_mode(cfg: TrainConfig, world: int) -> str:
    mode = cfg.parallel
    if mode == "auto":
        mode = "fsdp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise LeanLMError(f"parallel=none with {world} processes would train {world} separate "
                          "models: use parallel=ddp or parallel=fsdp")
    if cfg.cpu_offload and mode != "fsdp":
        raise LeanLMError("cpu_offload needs parallel=fsdp")
    return mode


def parallelize(model: Transformer, cfg: TrainConfig, mesh: DeviceMesh | None, world: int,
                materialize: Callable[[Transformer], None]) -> str:
    """AC, then compile, then FSDP or DDP; returns the data-parallel mode used.

    ``model`` is on the meta device; ``materialize`` allocates and initializes it. FSDP shards
    first and materializes only the local shards; DDP replicates already initialized weights.
    """
    mode = parallel_mode(cfg, world)
    if cfg.cpu_offload and (mesh is None or mesh.device_type != "cuda"):
        raise LeanLMError("cpu_offload moves FSDP shards from the GPU to host memory: it needs "
                          "device=cuda")
    apply_ac(model, cfg.ac, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if mode == "fsdp":
        if mesh is None:
            raise LeanLMError("parallel=fsdp needs torch.distributed (run under torchrun)")
        apply_fsdp(model, mesh, torch.bfloat16 if cfg.precision == "bf16" else None,
                   cfg.reshard_after_forward, cfg.cpu_offload)
        materialize(model)
    else:
        materialize(model)
        if mode == "ddp":
            assert mesh is not None
            apply_ddp(model, mesh)
    register_fsdp_forward_method(model, "loss")  # (nothing to do without FSDP/replicate)
    return mode
