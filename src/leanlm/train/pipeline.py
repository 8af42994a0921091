"""Pipeline parallelism with ``torch.distributed.pipelining``: the one ``Transformer`` cut by
layers into ``pp`` stages, one per process, run by a GPipe or 1F1B schedule.

Stage s keeps blocks [a_s, b_s) (the first stages one more when pp does not divide L), the first
stage also the embedding(s), the last the final norm and the head; every other module is dropped
before the model is materialised (built on the meta device, so a stage allocates only its own
layers), and dropped blocks become parameter-free :class:`Skip` placeholders so that every name
stays the whole model's (``layers.7.mlp.up_proj.weight`` on whichever stage holds it): DCP
checkpoints are then written by the stages side by side and load under any other layout.

A step cuts each micro-batch [B, S] into m micro-batches of B/m sequences (GPipe, Huang et al.
2019, or 1F1B, PipeDream-Flush, Narayanan et al. 2021: the same gradients, a bubble of
(pp - 1)/(m + pp - 1) of the step either way, but 1F1B holds at most pp micro-batches' activations
instead of m). Between neighbouring stages one [B/m, S, h] activation goes forward and its
gradient back per micro-batch: 2·B·S·h elements per step and stage boundary, against FSDP's
all-gathers of the weights. Positions and document ids go to every stage as keyword arguments
(each stage builds its own attention metadata and rotary tables), the targets to the last, whose
loss function is the fused head + cross-entropy, divided by m and by the accumulation steps.

Tied embeddings (the ``tiny`` recipe's): the first stage's embedding and the last stage's head are
two copies of one matrix, initialised alike; after backward their gradients are summed between
the two stages (Megatron-LM's embedding all-reduce, Narayanan et al. 2021 §2.2), so AdamW keeps
them equal, and the gradient norm counts the matrix once.

With dp > 1 the mesh is ("pp", "dp"): each stage is a group of dp ranks that FSDP2 shards it
over (torchtitan's PP × FSDP), each replica of the pipeline reads its own sequences, and the
schedule leaves FSDP's gradient reduce-scatter to the last micro-batch's backward.
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

SCHEDULES = ("gpipe", "1f1b")


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
                   documents: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids (first stage) or hidden states (the others) -> hidden states (the last stage:
    through the final norm; its loss function applies the head)."""
    attn = SDPAMetadata.packed(documents, self.sliding_window)
    if self.embed_tokens is not None:
        x, ctx = self.embed(x, positions, attn)
    else:
        ctx = self.layer_context(positions.clamp(min=0), attn, compute_dtype(x))
    for layer in self.layers:
        x = layer(x, ctx)
    return self.norm(x) if self.norm is not None else x


def split_model_(model: Transformer, pp: int, stage: int) -> Transformer:
    """Keep in ``model`` (on the meta device) only what ``stage`` of ``pp`` runs; its forward
    becomes the stage's. Sets ``model.pp_stage`` = (stage, pp) and, on the last stage of a tied
    model, ``model.param_aliases`` (its head is initialised as the embedding)."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise LeanLMError("split_model_ takes a model built on the meta device")
    keep = stage_layers(len(model.layers), pp, stage)
    for i in range(len(model.layers)):
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
    local = tied.grad.to_local() if isinstance(tied.grad, DTensor) else tied.grad
    dist.all_reduce(local, group=model.pp_tie_group)  # in place: the gradient's own storage
    return tied if stage == pp - 1 else None


def build_schedule(model: Transformer, pp_group: dist.ProcessGroup, device: torch.device,
                   micro_batch: int, seq_len: int, microbatches: int, kind: str, grad_accum: int,
                   compute: torch.dtype) -> Any:
    """The stage of ``model`` (split by :func:`split_model_`) in a ``kind`` schedule cutting each
    [micro_batch, seq_len] batch into ``microbatches``; the last stage's loss is the fused head +
    cross-entropy / ``grad_accum``. Shapes are given, not inferred at the first step (the
    residual stream is fp32; the last stage's output, the final norm's, in ``compute``)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage, pp = model.pp_stage
    shape = (micro_batch // microbatches, seq_len)
    # (hidden states that require grad: a stage sends back its input's gradient only for those)
    hidden = torch.empty(*shape, model.config.hidden_size, device=device, requires_grad=True)
    inputs = torch.zeros(shape, dtype=torch.long, device=device) if stage == 0 else hidden
    output = hidden.detach().to(compute).requires_grad_() if stage == pp - 1 else hidden
    pipe_stage = PipelineStage(model, stage, pp, device, input_args=(inputs,), output_args=(output,),
                               group=pp_group)
    def loss_fn(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (run by the last stage;
        scale = microbatches * grad_accum  # given to all: a stage without one runs no backward)
        return linear_cross_entropy(h, model.lm_head, targets) / scale

    cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    # scale_grads=False: the schedule would divide all the gradients, those of earlier
    # accumulation steps too, by the micro-batch count; the loss carries the scale instead
    return cls(pipe_stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


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
    args = (batch.inputs,) if stage == 0 else ()
    target = batch.targets if stage == pp - 1 else None
    schedule.step(*args, target=target, losses=losses, **kwargs)
    return float(sum(float(x) for x in losses))


def gathered_stages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (each stage's whole tensors, gathered; empty elsewhere)."""
    from torch.distributed.tensor import DTensor

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()  # (FSDP shards)
             for k, v in model.state_dict().items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(state, parts if rank == 0 else None, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else {}
