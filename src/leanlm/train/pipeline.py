"""Pipeline parallelism with ``torch.distributed.pipelining``: the one ``Transformer`` cut by
layers into ``pp · v`` stages, ``v`` per process, run by a GPipe, 1F1B or interleaved 1F1B schedule.

Stage s of n = pp · v keeps blocks [a_s, b_s) (the first stages one more when n does not divide
L), the first stage also the embedding(s), the last the final norm and the head; rank r runs the
stages r, r + pp, ..., r + (v-1)·pp (its *chunks*: v = 1 but for interleaved 1F1B). Every other
module is dropped before the model is materialised (built on the meta device, so a rank
allocates only its own layers), and dropped blocks become parameter-free :class:`Skip`
placeholders, so that a rank's stages are one model whose names stay the whole model's
(``layers.7.mlp.up_proj.weight`` on whichever rank holds it): DCP checkpoints are then written by
the ranks side by side and load under any other layout, and :func:`gathered_stages` unions them.

A step cuts each micro-batch [B, S] into m micro-batches of B/m sequences (GPipe, Huang et al.
2019, or 1F1B, PipeDream-Flush, Narayanan et al. 2021: the same gradients, a bubble of
(pp - 1)/(m + pp - 1) of the step either way, but 1F1B holds at most pp micro-batches' activations
instead of m). Interleaved 1F1B (Narayanan et al. 2021 §2.2) gives each rank v chunks of L/(pp·v)
layers: the bubble shrinks v-fold, to (pp - 1)/(v·m + pp - 1), for v times as many sends, since
every micro-batch now crosses pp·v - 1 stage boundaries instead of pp - 1. Between neighbouring
stages one [B/m, S, h] activation goes forward and its gradient back per micro-batch: 2·B·S·h
elements per step and stage boundary, against FSDP's all-gathers of the weights. Positions and
document ids go to every stage as keyword arguments (each stage builds its own attention metadata
and rotary tables), the targets to the last, whose loss function is the fused head +
cross-entropy, divided by m and by the accumulation steps.

Tied embeddings (the ``tiny`` recipe's): the first stage's embedding and the last stage's head are
two copies of one matrix, initialised alike; after backward their gradients are summed between
the two stages (Megatron-LM's embedding all-reduce, Narayanan et al. 2021 §2.2), so AdamW keeps
them equal, and the gradient norm counts the matrix once.

With dp > 1 the mesh is ("pp", "dp"): each stage is a group of dp ranks that FSDP2 shards it
over (torchtitan's PP × FSDP), each replica of the pipeline reads its own sequences, and the
schedule leaves FSDP's gradient reduce-scatter to the last micro-batch's backward.

With tp > 1 the mesh is ("pp", "dp", "tp") (dp = 1 for now) and each stage's layers are sharded
by the one tensor-parallel plan over its tp ranks (torchtitan's PP × TP); the stage boundary
connects tp rank t of stage s to tp rank t of stage s + 1 only (the "pp" group of a (dp, tp)
coordinate). The plan hands plain local tensors between blocks, so what crosses the boundary is
what a block boundary holds on that rank. Under sequence parallelism that is the rank's chunk
x[:, t·S/tp : (t+1)·S/tp, :] of the residual stream, and so it is sent: [B/m, S/tp, h] forward
and its gradient [B/m, S/tp, h] back, 2·B·S·h/tp elements per step and boundary from each of the
tp ranks — 2·B·S·h in all, the same as without TP, in tp parallel messages of 1/tp the size, and
no collective at the boundary (the next stage's first block all-gathers the sequence anyway;
its reduce-scatter backward makes each chunk's gradient whole before it is sent back).
Gathering the whole activation instead would send tp copies of the same [B/m, S, h]. Without
sequence parallelism every tp rank holds the whole replicated [B/m, S, h] (its gradient is
whole too: Megatron's f all-reduces it) and sends it, tp times the bytes. Token ids go whole to
every tp rank of the first stage (the vocabulary-parallel embedding reduce-scatters them into
chunks); the last stage's final norm output stays a chunk, which the vocabulary-parallel fused
loss (:mod:`leanlm.parallel.loss`) gathers along the sequence, and every tp rank of it returns
the same loss. The tied embedding and head are Shard(0) over the vocabulary alike on both
stages, so :func:`sum_tied_gradients_` all-reduces tp rank t's rows with tp rank t's rows.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leanlm.attention import SDPAMetadata, compute_dtype
from leanlm.errors import LeanLMError
from leanlm.loss import linear_cross_entropy
from leanlm.model import Transformer

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class Skip(nn.Module):
    """A block another stage runs: passes the hidden states through, holds nothing."""

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return x


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The blocks of ``stage`` among ``pp``: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def _stage_forward(self: Transformer, x: torch.Tensor, positions: torch.Tensor,
                   documents: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """Token ids (the first stage) or hidden states (the others) -> hidden states (the last stage:
    through the final norm; its loss function applies the head), through this rank's ``chunk``."""
    attn = SDPAMetadata.packed(documents, self.sliding_window)
    if self.embed_tokens is not None and chunk == 0:
        x, ctx = self.embed(x, positions, attn)
    else:
        ctx = self.layer_context(positions.clamp(min=0), attn, compute_dtype(x))
    for i in self.pp_chunks[chunk]:
        x = self.layers[i](x, ctx)
    last = self.norm is not None and chunk == len(self.pp_chunks) - 1
    return self.norm(x) if last else x


class Chunk(nn.Module):
    """One of a rank's interleaved stages: its model's ``chunk``-th run of layers. The model is
    referenced, not registered, so that its parameters keep their one owner and their names."""

    def __init__(self, model: Transformer, chunk: int) -> None:
        super().__init__()
        self.__dict__["model"] = model  # (outside nn.Module's registry: not a submodule)
        self.chunk = chunk

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        return _stage_forward(self.model, x, positions, documents, self.chunk)


def split_model_(model: Transformer, pp: int, stage: int, virtual: int = 1) -> Transformer:
    """Keep in ``model`` (on the meta device) only what rank ``stage`` of ``pp`` runs: the stages
    stage, stage + pp, ... of pp · ``virtual``; its forward becomes the first one's. Sets
    ``model.pp_stage`` = (stage, pp), ``model.pp_chunks`` (each stage's layers) and, on the last
    rank of a tied model, ``model.param_aliases`` (its head is initialised as the embedding)."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise LeanLMError("split_model_ takes a model built on the meta device")
    num = len(model.layers)
    model.pp_chunks = [stage_layers(num, pp * virtual, stage + k * pp) for k in range(virtual)]
    keep = {i for chunk in model.pp_chunks for i in chunk}
    for i in range(num):
        if i not in keep:
            model.layers[i] = Skip()
    if stage > 0:
        model.embed_tokens = None
        model.embed_positions = None
    if stage < pp - 1:
        model.norm = None
        model.lm_head = None
    elif model.config.tie_word_embeddings:
        model.param_aliases = {"lm_head.weight": "embed_tokens.weight"}
    model.pp_stage = (stage, pp)
    model.forward = types.MethodType(_stage_forward, model)
    return model


def tied_weight(model: nn.Module) -> nn.Parameter | None:
    """This stage's copy of a tied embedding / head matrix (None when untied or in between)."""
    stage, pp = model.pp_stage
    if not model.config.tie_word_embeddings:
        return None
    if stage == 0:
        return model.embed_tokens.weight
    return model.lm_head.weight if stage == pp - 1 else None


def sum_tied_gradients_(model: nn.Module) -> nn.Parameter | None:
    """Sum the tied embedding / head copies' gradients between the first and last stage (the local
    FSDP shards: both copies are sharded alike over the same dp ranks); returns the last stage's
    copy, which the gradient norm must not count a second time (None elsewhere)."""
    from torch.distributed.tensor import DTensor

    stage, pp = model.pp_stage
    tied = tied_weight(model)
    if tied is None:
        return None
    if tied.grad is None:
        tied.grad = torch.zeros_like(tied)
    if isinstance(tied.grad, DTensor) and tied.grad.placements != tied.placements:
        # (torch's vocabulary-parallel embedding leaves a Replicate() gradient on its Shard(0)
        # weight: cut to the weight's rows, a local slice, so that both stages add like shards)
        tied.grad = tied.grad.redistribute(placements=tied.placements)
    local = tied.grad.to_local() if isinstance(tied.grad, DTensor) else tied.grad
    dist.all_reduce(local, group=model.pp_tie_group)  # in place: the gradient's own storage
    return tied if stage == pp - 1 else None


def build_schedule(model: Transformer, pp_group: dist.ProcessGroup, device: torch.device,
                   micro_batch: int, seq_len: int, microbatches: int, kind: str, grad_accum: int,
                   compute: torch.dtype, seq_shards: int = 1) -> Any:
    """The stages of ``model`` (split by :func:`split_model_`) in a ``kind`` schedule cutting each
    [micro_batch, seq_len] batch into ``microbatches``; the last stage's loss is the fused head +
    cross-entropy / ``grad_accum`` (the vocabulary-parallel one on a tensor-parallel head). Shapes
    are given, not inferred at the first step (the residual stream is fp32; the last stage's
    output, the final norm's, in ``compute``); between stages it is this rank's 1/``seq_shards``
    of the sequence (sequence parallelism's chunk: see the module docstring)."""
    from torch.distributed import pipelining

    rank, pp = model.pp_stage
    num = pp * len(model.pp_chunks)
    shape = (micro_batch // microbatches, seq_len)
    # (hidden states that require grad: a stage sends back its input's gradient only for those)
    hidden = torch.empty(shape[0], seq_len // seq_shards, model.config.hidden_size, device=device,
                         requires_grad=True)
    stages = []
    for k in range(len(model.pp_chunks)):
        index = rank + k * pp
        inputs = torch.zeros(shape, dtype=torch.long, device=device) if index == 0 else hidden
        output = hidden.detach().to(compute).requires_grad_() if index == num - 1 else hidden
        # (one stage: the model itself, so that the schedule defers FSDP's reduce-scatter)
        module = Chunk(model, k) if kind == "interleaved" else model
        stages.append(pipelining.PipelineStage(module, index, num, device, input_args=(inputs,),
                                               output_args=(output,), group=pp_group))

    def loss_fn(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (run by the last stage;
        scale = microbatches * grad_accum  # given to all: a stage without one runs no backward)
        return linear_cross_entropy(h, model.lm_head, targets) / scale

    # scale_grads=False: the schedule would divide all the gradients, those of earlier
    # accumulation steps too, by the micro-batch count; the loss carries the scale instead
    if kind == "interleaved":
        return pipelining.ScheduleInterleaved1F1B(stages, n_microbatches=microbatches,
                                                  loss_fn=loss_fn, scale_grads=False)
    cls = pipelining.ScheduleGPipe if kind == "gpipe" else pipelining.Schedule1F1B
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def pipeline_step(schedule: Any, model: nn.Module, batch: Any) -> float:
    """One micro-batch through the pipeline (forward and backward of every stage); returns its
    share of the step's loss, the mean over its micro-batches / grad_accum, on the last stage
    (0 elsewhere)."""
    stage, pp = model.pp_stage
    b, t = batch.inputs.shape
    positions = batch.positions
    if positions is None:  # (no document masking: one document per row)
        positions = torch.arange(t, device=batch.inputs.device).expand(b, t)
    kwargs = {"positions": positions}
    if batch.documents is not None:
        kwargs["documents"] = batch.documents
    losses: list[torch.Tensor] = []
    # (the loader's inputs are views of [B, S+1] tokens: contiguous, as the stage's metadata says)
    args = (batch.inputs.contiguous(),) if stage == 0 else ()
    target = batch.targets if stage == pp - 1 else None
    schedule.step(*args, target=target, losses=losses, **kwargs)
    return float(sum(float(x.detach()) for x in losses))


def gathered_stages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (each rank's stages' whole tensors, gathered: their names
    are the whole model's, whichever chunks a rank holds; empty elsewhere)."""
    from torch.distributed.tensor import DTensor

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()  # (FSDP shards)
             for k, v in model.state_dict().items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(state, parts if rank == 0 else None, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else {}
