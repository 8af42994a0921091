"""Apply the training techniques to the one model, in place, in a fixed order: TP, AC, compile, FSDP/DDP.

The processes form a mesh ("dp", "tp") of dp × tp ranks, or ("pp", "dp") / ("pp", "dp", "tp") of
pipeline stages (:func:`mesh_shape` checks it against the world size and the model before
anything is built; stages compose with FSDP over dp or with TP over tp, not yet with both). The
order is torchtitan's (``parallelize_llama``) and each step depends on the previous one:

(-1) **Pipeline stages** (:mod:`leanlm.train.pipeline`): the meta-device model cut to this
   stage's layers, so that everything after applies to (and allocates) only those: a stage's tp
   ranks shard its layers alone (torchtitan's PP × TP).

0. **Tensor + sequence parallelism** over the "tp" dimension (Megatron-LM, Shoeybi et al. 2019;
   Korthikanti et al. 2022): the one plan of :mod:`leanlm.parallel`, with sequence parallelism
   and the vocabulary-parallel fused loss. Per block and per step each rank moves, forward and
   backward, 2 × 2·(p-1)/p · b·s·h elements (attention and MLP: all-gather + reduce-scatter, or
   all-reduce without SP), plus the embedding's and the head's gathers and the loss's 2·b·s
   floats; FSDP over "dp" moves 3 × (dp-1)/dp of the parameters (two all-gathers, one
   reduce-scatter) of its 1/tp share. TP goes first so that FSDP shards the DTensors it makes
   (FSDP2 composes them into 2-D shards) and AC / compile wrap the sharded blocks. After
   backward :func:`clip_grad_norm` sums the replicated parameters' partial gradients over "tp"
   and takes the global norm over every shard of every dimension.
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
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.parallel import check_sequence_parallel, sum_partial_gradients_, tensor_parallel_
from leanlm.parallel.plan import tp_problem
from leanlm.train.config import TrainConfig
from leanlm.train.pipeline import Skip, split_model_, sum_tied_gradients_

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
        if i % every or isinstance(block, Skip):  # (another pipeline stage's block)
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
        if isinstance(block, Skip):  # (another pipeline stage's block)
            continue
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


def mesh_shape(cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(pp, dp, tp) for ``world`` processes, or a one-line :class:`LeanLMError` saying what does
    not fit: the product, the model's heads / K/V heads / MLP width over tp, the sequence over
    tp (sequence parallelism), the layers over pp. Needs no model and no process group."""
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tp, p.pp
    dp = p.dp or world // (tp * pp)
    if dp * tp * pp != world or dp < 1:
        raise LeanLMError(f"parallel.dp·tp·pp = {p.dp or '(auto)'}·{tp}·{pp} does not make a mesh of the "
                          f"{world} processes: set parallel.dp, parallel.tp and parallel.pp so that their "
                          f"product is the world size")
    if tp > 1:
        problem = tp_problem(m, tp)
        if problem is None and m.num_kv_heads % tp:
            problem = (f"tensor parallel size {tp} does not divide the model's {m.num_kv_heads} key/value "
                       "heads (training cannot share a K/V head between ranks)")
        if problem is None and p.sequence_parallel:
            problem = check_sequence_parallel(cfg.seq_len, tp, m.positional == "learned")
        if problem:
            raise LeanLMError(f"parallel.tp={tp}: {problem}")
    if pp * p.pp_virtual > m.num_layers:
        stages = f"parallel.pp={pp}" + (f" × pp_virtual={p.pp_virtual} = {pp * p.pp_virtual}"
                                        if p.pp_virtual > 1 else "")
        raise LeanLMError(f"{stages} pipeline stages but the model has {m.num_layers} layers: "
                          "each stage needs at least one")
    if pp > 1:
        m_b = p.pp_microbatches or cfg.micro_batch
        problem = None
        if tp > 1 and dp > 1:
            problem = ("stages compose with tensor parallelism or with FSDP over dp ranks, not both yet "
                       "(set parallel.dp=1 or parallel.tp=1)")
        elif dp > 1 and p.mode == "ddp":
            problem = "pipeline stages compose with parallel=fsdp over the dp ranks, not with ddp"
        elif cfg.micro_batch % m_b:
            problem = f"parallel.pp_microbatches={m_b} does not divide micro_batch={cfg.micro_batch}"
        elif p.pp_schedule == "1f1b" and m_b < pp:
            problem = f"1F1B needs at least as many micro-batches as stages: parallel.pp_microbatches={m_b}"
        elif p.pp_schedule == "interleaved" and m_b % max(1, m_b // pp):  # (torch's rounds)
            problem = (f"interleaved 1F1B runs the micro-batches in max(1, m // pp) = {m_b // pp} rounds of "
                       f"equal size: parallel.pp_microbatches={m_b} is not divisible by {m_b // pp}")
        elif p.pp_schedule == "interleaved" and dp > 1:
            problem = "interleaved stages do not compose with FSDP over dp ranks yet (set parallel.dp=1)"
        elif cfg.eval_every:
            problem = "evaluation does not run through the pipeline yet: set eval_every=0"
        elif cfg.teacher or cfg.compile or cfg.init_from:
            problem = "distillation, compile and init_from do not run through the pipeline yet"
        if problem:
            raise LeanLMError(f"parallel.pp={pp}: {problem}")
    return pp, dp, tp


def parallel_mode(cfg: TrainConfig, world: int) -> str:
    _, dp, tp = mesh_shape(cfg, world)
    mode = cfg.parallel.mode
    if mode == "auto":
        mode = "fsdp" if dp > 1 else "none"
    if mode == "none" and dp > 1:
        raise LeanLMError(f"parallel=none with {dp} data-parallel ranks would train {dp} separate "
                          "models: use parallel=ddp or parallel=fsdp")
    if mode == "ddp" and tp > 1:
        raise LeanLMError("parallel.tp > 1 composes with parallel=fsdp (FSDP2 over the dp ranks), "
                          "not with parallel=ddp")
    if cfg.cpu_offload and mode != "fsdp":
        raise LeanLMError("cpu_offload needs parallel=fsdp")
    return mode


def _dim(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The "dp" or "tp" dimension of the run's mesh (a 1-D mesh is all "dp")."""
    names = mesh.mesh_dim_names or ("dp",)
    return mesh if mesh.ndim == 1 and names == (name,) else mesh[name]


def parallelize(model: Transformer, cfg: TrainConfig, mesh: DeviceMesh | None, world: int,
                materialize: Callable[[Transformer], None]) -> str:
    """TP, then AC, then compile, then FSDP or DDP; returns the data-parallel mode used.

    ``model`` is on the meta device; ``materialize`` allocates and initializes it. TP and FSDP
    shard first and materialize only the local shards; DDP replicates initialized weights.
    """
    mode = parallel_mode(cfg, world)
    pp, _, tp = mesh_shape(cfg, world)
    if cfg.cpu_offload and (mesh is None or mesh.device_type != "cuda"):
        raise LeanLMError("cpu_offload moves FSDP shards from the GPU to host memory: it needs "
                          "device=cuda")
    if pp > 1:
        assert mesh is not None
        pp_mesh = _dim(mesh, "pp")
        split_model_(model, pp, pp_mesh.get_local_rank(), cfg.parallel.pp_virtual)
        model.pp_group = pp_mesh.get_group()
        model.pp_tie_group = model.pp_group
        if pp > 2:  # the first and last stage of each replica (every rank creates every group)
            columns = mesh.mesh.reshape(pp, -1)
            for d in range(columns.shape[1]):
                group = torch.distributed.new_group([int(columns[0, d]), int(columns[-1, d])])
                if torch.distributed.get_rank() in (int(columns[0, d]), int(columns[-1, d])):
                    model.pp_tie_group = group
    if tp > 1:
        assert mesh is not None
        tensor_parallel_(model, _dim(mesh, "tp"), sequence_parallel=cfg.parallel.sequence_parallel,
                         loss_parallel=cfg.parallel.loss_parallel)
    apply_ac(model, cfg.ac, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if mode == "fsdp":
        if mesh is None:
            raise LeanLMError("parallel=fsdp needs torch.distributed (run under torchrun)")
        apply_fsdp(model, _dim(mesh, "dp"), torch.bfloat16 if cfg.precision == "bf16" else None,
                   cfg.reshard_after_forward, cfg.cpu_offload)
        materialize(model)
    else:
        materialize(model)
        if mode == "ddp":
            assert mesh is not None
            apply_ddp(model, _dim(mesh, "dp"))
    register_fsdp_forward_method(model, "loss")  # (nothing to do without FSDP/replicate)
    return mode


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """‖g‖₂ over every parameter's whole gradient, whatever mix of plain tensors and DTensors on
    whichever meshes holds them: each local shard's Σg² is summed over the mesh dimensions the
    gradient is sharded on, and not over those it is replicated on (so a replicated tensor counts
    once)."""
    from torch.distributed.tensor import DTensor

    sums: dict[tuple[int, tuple[int, ...]], list] = {}  # (mesh, sharded dims) -> [mesh, dims, Σg²]
    for p in params:
        g = p.grad
        if g is None:
            continue
        mesh, dims, local = None, (), g
        if isinstance(g, DTensor):
            mesh, local = g.device_mesh, g.to_local()
            if any(pl.is_partial() for pl in g.placements):
                raise LeanLMError(f"a gradient with pending reductions ({g.placements}) cannot be clipped")
            # (FSDP2's _StridedShard over a TP shard is not a Shard: anything not replicated is split)
            dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
        sq = local.detach().double().pow(2).sum()
        entry = sums.setdefault((id(mesh), dims), [mesh, dims, torch.zeros((), dtype=torch.float64,
                                                                            device=sq.device)])
        entry[2] = entry[2] + sq
    total = torch.zeros((), dtype=torch.float64)
    for mesh, dims, sq in sums.values():
        for dim in dims:
            torch.distributed.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq.cpu()
    return total.sqrt()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Finish the gradients and clip their global norm to ``max_norm`` (0: no clipping); returns the
    norm before clipping. A tensor-parallel model first gets its replicated parameters' partial
    gradients summed (:func:`~leanlm.parallel.sum_partial_gradients_`); its gradients mix plain
    tensors and DTensors of several meshes, whose norm :func:`global_grad_norm` takes. A pipeline
    stage first sums the tied embedding's two copies (:func:`sum_tied_gradients_`) and the norm
    is taken over all stages."""
    params = list(model.parameters())
    if getattr(model, "pp_stage", None) is not None:
        if getattr(model, "tp_mesh", None) is not None:  # (a tensor-parallel stage's norms)
            sum_partial_gradients_(model)
        copy = sum_tied_gradients_(model)
        sq = global_grad_norm([p for p in params if p is not copy]).square()
        torch.distributed.all_reduce(sq, group=model.pp_group)
        norm = sq.sqrt()
    elif getattr(model, "tp_mesh", None) is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    else:
        sum_partial_gradients_(model)
        norm = global_grad_norm(params)
    if max_norm:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch's clip_grad_norm_
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(torch.float32).item())
    return float(norm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: decay on matrices only, and one group per kind of tensor (plain, or
    DTensors of one mesh), since one fused kernel cannot mix them (tensor parallelism leaves
    norms plain beside sharded matrices; FSDP2 shards those over another mesh than these)."""
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for p in model.parameters():
        if p.requires_grad:  # (adapters: a few)
            decay = p.ndim >= 2
            key = (not decay, id(getattr(p, "device_mesh", None)))
            groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0})
            groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]
