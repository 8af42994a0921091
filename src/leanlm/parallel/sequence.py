"""Sequence parallelism: the parts of the model that tensor parallelism leaves replicated — the
norms and the residual stream — split by sequence between the tp ranks (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.2.2; torchtitan's
``SequenceParallel`` + ``PrepareModuleInput``).

With tensor parallelism alone every rank holds the whole residual stream [B, S, h] and runs the
norms, the residual adds (and dropout) on all of it: the same work p times, and p copies of those
activations. Megatron's f / g pair around a block (identity forward, all-reduce of [B, S, h]
backward in front; all-reduce forward behind) becomes, with the stream cut into [B, S/p, h]
chunks, the conjugate pair g-bar / g:

    in front of q/k/v (gate/up):  all-gather along S forward,  reduce-scatter backward
    behind o_proj (down_proj):    reduce-scatter forward,      all-gather backward

An all-reduce is a reduce-scatter followed by an all-gather, so each block moves exactly what it
moved before — per attention block or MLP, forward and backward each, 2·(p-1)/p · B·S·h elements
per rank — while norms and residual adds run on S/p tokens and store S/p tokens of activations.
The vocabulary-parallel embedding's all-reduce becomes a reduce-scatter (its rows arrive split by
sequence); the head gathers the final norm's chunks before its column-parallel product.

Here the plan's styles hand plain local tensors around (:mod:`leanlm.parallel.styles`), so:

- :class:`GatherSequence` on ``self_attn`` and ``mlp``: one all-gather of the block input for
  q, k and v (gate and up) together; the column-parallel layers inside then take their input
  as is (its reduce-scatter backward already sums the ranks' gradients, Megatron's f's job);
- ``RowParallel(sequence_parallel=True)`` reduce-scatters instead of all-reducing;
- :class:`SumGradients` marks the parameters that every rank holds whole but whose gradient each
  rank computes only a partial sum of: a norm's weight (it saw S/p tokens), a row-parallel
  layer's bias (added to S/p tokens), and — with or without sequence parallelism — Qwen3's
  per-head q/k norms (each rank normalises only its own heads). :func:`sum_partial_gradients_`
  all-reduces them over the tp ranks after backward (Megatron's ``allreduce_layernorm_grads``),
  once per optimizer step, whatever wraps the model (FSDP2's sharded gradients included: every
  tp rank of a data-parallel shard holds the same slice).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle

from leanlm.errors import LeanLMError
from leanlm.parallel.styles import gather_sequence


def _gather_input(module: nn.Module, args: tuple) -> tuple:
    return (gather_sequence(args[0], module.sequence_mesh), *args[1:])


class GatherSequence(ParallelStyle):
    """The module's first argument arrives as [B, S/p, ...] sequence chunks and is all-gathered
    into the whole [B, S, ...] before its forward (reduce-scattered back in backward)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if hasattr(module, "sequence_mesh"):
            raise LeanLMError(f"this {type(module).__name__} already gathers its input's sequence")
        module.sequence_mesh = device_mesh
        module.register_forward_pre_hook(_gather_input)
        return module


class SumGradients(ParallelStyle):
    """Marks the module's own parameters ``names`` (those it has) as replicated on the tp ranks
    with partial gradients: :func:`sum_partial_gradients_` sums them. Forward is unchanged."""

    def __init__(self, names: tuple[str, ...] = ("weight", "bias")) -> None:
        super().__init__()
        self.names = names

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        have = tuple(n for n in self.names if getattr(module, n, None) is not None)
        for n in have:
            p = getattr(module, n)
            if isinstance(p, DTensor) and not p.placements[0].is_replicate():
                raise LeanLMError(f"{type(module).__name__}.{n} is sharded: only a replicated "
                                  "parameter has partial gradients to sum")
        module.partial_grads = (device_mesh, (*getattr(module, "partial_grads", (None, ()))[1], *have))
        return module


def sum_partial_gradients_(model: nn.Module) -> int:
    """All-reduce (sum) over the tp ranks the gradients :class:`SumGradients` marked; call after
    the last backward of a step, before the gradient norm. Returns how many were summed."""
    n = 0
    for module in model.modules():
        mesh, names = getattr(module, "partial_grads", (None, ()))
        for name in names:
            grad = getattr(module, name).grad
            if grad is None:
                continue
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, group=mesh.get_group())  # in place: the DTensor's own storage
            n += 1
    return n


def check_sequence_parallel(seq_len: int, tp: int, learned_positions: bool) -> str | None:
    """Why a run of ``seq_len`` tokens cannot be split by sequence over ``tp`` ranks (None if it can)."""
    if seq_len % tp:
        return (f"sequence parallelism splits each sequence between the {tp} tensor-parallel ranks: "
                f"seq_len {seq_len} is not divisible by {tp} (or set parallel.sequence_parallel=false)")
    if learned_positions:
        return ("sequence parallelism needs rotary positions: this model adds learned position "
                "embeddings to the whole sequence (set parallel.sequence_parallel=false)")
    return None

