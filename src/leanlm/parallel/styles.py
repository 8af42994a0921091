"""The two parallel styles of the plan: :class:`ColumnParallel` and :class:`RowParallel`.

For y = x Wᵀ + b, W [N, K], over p ranks (Megatron-LM, Shoeybi et al. 2019):

- column-parallel: rank r keeps rows R_r of W and b and computes y[..., R_r] = x W[R_r]ᵀ + b[R_r]
  from the whole x; the output stays split (the next op — attention per head, SwiGLU per
  channel — needs only its own columns);
- row-parallel: rank r keeps columns C_r of W and multiplies x[..., C_r], the slice the
  column-parallel layer before it produced; y = Σ_r x[..., C_r] W[:, C_r]ᵀ + b is one
  all-reduce.

Megatron writes the pair's communication as two conjugate operators, here autograd functions
over plain local tensors (torch's functional collectives, out of place and traceable by
``torch.compile``): ``f`` (:func:`copy_to_tp`) in front of a column-parallel layer, identity
forward and all-reduce backward (each rank's ∂L/∂x covers its rows of W only); ``g``
(:func:`reduce_from_tp`) behind a row-parallel layer, all-reduce forward and identity backward.
So an attention block or an MLP costs one all-reduce forward and one backward. The head adds
:func:`gather_from_tp` (the logits' last dimension all-gathered, so that every rank — and the
sampler on it — sees the whole vocabulary; its own slice of the gradient backward). Under
sequence parallelism (``sequence_parallel=True``, :mod:`leanlm.parallel.sequence`) the pair
becomes :func:`gather_sequence` (all-gather along the sequence forward, reduce-scatter
backward) in front and :func:`scatter_sequence` (reduce-scatter forward, all-gather backward)
behind: the same bytes, with the residual stream between blocks split by sequence.

They are ``ParallelStyle``\\ s for ``parallelize_module`` like torch's ``ColwiseParallel`` and
``RowwiseParallel``, and shard an ``nn.Linear``'s parameters into the same DTensors (weight
``Shard(0)`` / ``Shard(1)``, bias ``Shard(0)`` / ``Replicate()``), so FSDP2 on another mesh
dimension composes with them as with torch's. They differ in where the communication happens:
torch's styles turn the module's input and output into DTensors in hooks and let DTensor
dispatch run the product; these run the product on the local shards and hand plain local
tensors in and out, with Megatron's f / g as the only collectives. That is what the rest of the
model needs: ``Attention`` views the local q/k/v as its local heads and the paged attention
backend works on local tensors; other forward hooks on the module — the adapters of
:mod:`leanlm.peft` — see local tensors too, so a LoRA adapter's partial output on a row-parallel
layer joins the base's partial output before the one all-reduce (S-LoRA's layout,
:meth:`leanlm.peft.lora.LoRA.shard_`); quantized layers, which are not ``nn.Linear`` and hold
integer buffers, shard by :mod:`leanlm.quant.sharding` and keep running their CPU kernels; and
CPU inference keeps its oneDNN-prepacked weights (:meth:`~leanlm.kernels.cpu_linear.Linear.linear`
on the local shard).

Each sharded module carries a :class:`TPShard` (``module.tp_shard``) and
``module.unsharded_features`` (its whole (in, out), what adapters attached later are built with).
Every rank must hold the same whole module before sharding: the styles cut locally and send
nothing (``src_data_rank=None`` in torch's terms).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils.hooks import RemovableHandle

from leanlm.errors import LeanLMError
from leanlm.kernels.cpu_linear import Linear
from leanlm.quant.sharding import QUANTIZED, shard_columns_, shard_rows_

SHARDABLE = (nn.Linear, *QUANTIZED)


# ---- collectives ----------------------------------------------------------------------------
def wait(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor (a functional collective's result is one that waits on first use)."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _all_reduce(x: torch.Tensor, op: str, mesh: DeviceMesh) -> torch.Tensor:
    return wait(funcol.all_reduce(x.contiguous(), op, mesh))


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, "sum", ctx.mesh), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return _all_reduce(x, "sum", mesh)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh, chunk: int, size: int) -> torch.Tensor:
        # ranks hold torch.chunk's pieces (ceil(size / p) each, the last ones shorter): pad each
        # to ``chunk`` so the pieces gather evenly, then drop the padding at the end
        ctx.mesh, ctx.chunk, ctx.local = mesh, chunk, x.shape[-1]
        pad = chunk - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad))
        out = wait(funcol.all_gather_single(x.contiguous(), x.dim() - 1, mesh))
        return out[..., :size]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        start = ctx.mesh.get_local_rank() * ctx.chunk
        return grad[..., start:start + ctx.local].contiguous(), None, None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return wait(funcol.all_gather_single(x.contiguous(), 1, mesh))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return wait(funcol.reduce_scatter_single(grad.contiguous(), "sum", 1, ctx.mesh)), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return wait(funcol.reduce_scatter_single(x.contiguous(), "sum", 1, mesh))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return wait(funcol.all_gather_single(grad.contiguous(), 1, ctx.mesh)), None


def gather_sequence(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sequence parallelism's ``g``-bar (Korthikanti et al. 2022): [B, S/p, ...] chunks -> the
    whole [B, S, ...] on every rank; backward, the ranks' partial gradients reduce-scattered
    back to each one's chunk (so it also sums the gradients, as Megatron's ``f`` does)."""
    return _GatherSequence.apply(x, mesh)


def scatter_sequence(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sequence parallelism's ``g``: the ranks' partial [B, S, ...] outputs summed and cut to
    this rank's [B, S/p, ...] chunk (a reduce-scatter); backward, the chunks' gradients
    all-gathered."""
    return _ScatterSequence.apply(x, mesh)


def copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Megatron's ``f``: x forward, the sum of the ranks' gradients backward."""
    return _CopyToTP.apply(x, mesh)


def reduce_from_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Megatron's ``g``: the sum of the ranks' partial outputs forward, the gradient as is backward."""
    return _ReduceFromTP.apply(x, mesh)


def gather_from_tp(x: torch.Tensor, mesh: DeviceMesh, chunk: int, size: int) -> torch.Tensor:
    """[..., local] pieces of a last dimension of ``size`` (``chunk`` per rank, torch.chunk's
    split) -> the whole [..., size] on every rank."""
    return _GatherFromTP.apply(x, mesh, chunk, size)


def grad_all_reduce(mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook for a parameter every rank holds whole but whose gradient each rank has
    only a partial sum of (a LoRA factor replicated beside a sharded one): their sum."""
    return lambda grad: _all_reduce(grad, "sum", mesh)


def amax_reduce(mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function W8A8's row-parallel shard applies to its per-token maxima: their maximum
    over the ranks."""
    return lambda amax: _all_reduce(amax, "max", mesh)


# ---- styles ---------------------------------------------------------------------------------


@dataclass
class TPShard:
    """What a sharded module keeps: ``split`` "rows" (column-parallel) or "columns"
    (row-parallel), the ``index`` of the whole weight's rows or columns this rank holds, the
    mesh, and the handle of its output hook (re-registered last when adapters arrive)."""

    split: str
    index: slice
    mesh: DeviceMesh
    chunk: int  # torch.chunk's piece size along the split dimension
    size: int  # the whole size along it
    replicas: int = 1  # consecutive ranks holding the same rows (K/V heads fewer than ranks)
    gather: bool = False
    sequence_parallel: bool = False  # the residual stream around it is split by sequence
    post: RemovableHandle | None = field(default=None, repr=False)


def chunk_index(size: int, parts: int, part: int) -> tuple[slice, int]:
    """``part``'s piece of ``size`` cut into ``parts`` as ``torch.chunk`` (and DTensor's Shard)
    cut it: ceil(size / parts) each, the last pieces shorter or empty."""
    chunk = math.ceil(size / parts)
    start = min(size, part * chunk)
    return slice(start, min(size, start + chunk)), chunk


def _dtensor(local: torch.Tensor, mesh: DeviceMesh, placement: Shard | Replicate,
             shape: tuple[int, ...], requires_grad: bool) -> nn.Parameter:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    t = DTensor.from_local(local.detach().clone().contiguous(), mesh, [placement], run_check=False,
                           shape=torch.Size(shape), stride=stride)
    return nn.Parameter(t, requires_grad=requires_grad)


def _local_forward_rows(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.to_local()
    b = self.bias.to_local() if self.bias is not None else None
    return self.linear(x, w, b) if isinstance(self, Linear) else F.linear(x, w, b)


def _local_forward_columns(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.to_local()  # the bias is added once, after the all-reduce (_post)
    return self.linear(x, w, None) if isinstance(self, Linear) else F.linear(x, w)


def whole_input(shard: TPShard, x: torch.Tensor) -> torch.Tensor:
    """The input a column-parallel layer multiplies: with sequence parallelism, the head's
    sequence chunks gathered (the blocks' layers get theirs gathered by their module,
    :class:`leanlm.parallel.sequence.GatherSequence`, once for q/k/v or gate/up); else, when
    gradients flow, Megatron's f."""
    if shard.sequence_parallel:
        return gather_sequence(x, shard.mesh) if shard.gather else x
    return copy_to_tp(x, shard.mesh) if torch.is_grad_enabled() and x.requires_grad else x


def _pre(module: nn.Module, args: tuple) -> tuple | None:
    """Runs first of the module's pre-hooks: refuse adapters that were not sharded; the whole
    input of a column-parallel layer (:func:`whole_input`)."""
    for name, a in getattr(module, "adapters", {}).items():
        if not getattr(a, "tp_sharded", False):
            raise LeanLMError(f"adapter {name!r} was attached to a tensor-parallel model after it was "
                              "sharded: call leanlm.parallel.shard_adapters_(model) before running it")
    shard: TPShard = module.tp_shard
    if (torch.is_grad_enabled() and shard.replicas > 1
            and any(p.requires_grad for p in module.parameters())):
        raise LeanLMError(f"gradients through K/V heads shared by {shard.replicas} tensor-parallel ranks "
                          "are not supported (the copies' gradients would need summing): run under "
                          "torch.inference_mode(), or use a tensor-parallel size that divides the K/V heads")
    if shard.split == "rows":
        x = whole_input(shard, args[0])
        return None if x is args[0] else (x, *args[1:])
    return None


def _post(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Runs last of the module's hooks (after the adapters'): the all-reduce of a row-parallel
    layer (+ its bias) or the all-gather of the head's logits."""
    shard: TPShard = module.tp_shard
    if shard.gather:
        return gather_from_tp(out, shard.mesh, shard.chunk, shard.size)
    out = scatter_sequence(out, shard.mesh) if shard.sequence_parallel else reduce_from_tp(out, shard.mesh)
    bias = module.bias
    if isinstance(bias, DTensor):  # an nn.Linear's; a quantized shard added it on rank 0
        out = out + bias.to_local().to(out.dtype)
    return out


def register_post(module: nn.Module) -> None:
    """(Re-)register the output hook so that it runs after every other forward hook."""
    shard: TPShard = module.tp_shard
    if shard.post is not None:
        shard.post.remove()
    if shard.gather or shard.split == "columns":
        shard.post = module.register_forward_hook(_post)


class _LocalStyle(ParallelStyle):
    split = ""

    def __init__(self, replicas: int = 1, gather: bool = False, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.replicas, self.gather, self.sequence_parallel = replicas, gather, sequence_parallel

    def index(self, module: nn.Module, mesh: DeviceMesh) -> tuple[slice, int, int]:
        size = module.out_features if self.split == "rows" else module.in_features
        parts = mesh.size() // self.replicas
        index, chunk = chunk_index(size, parts, mesh.get_local_rank() // self.replicas)
        return index, chunk, size

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, SHARDABLE):
            raise LeanLMError(f"cannot shard a {type(module).__name__}: the tensor-parallel plan shards "
                              "linear layers (nn.Linear, QuantLinear, W8A8Linear)")
        if hasattr(module, "tp_shard"):
            raise LeanLMError(f"this {type(module).__name__} is already sharded")
        index, chunk, size = self.index(module, device_mesh)
        whole = (module.in_features, module.out_features)
        if isinstance(module, QUANTIZED):
            self.shard_quantized(module, index, device_mesh)
        else:
            self.shard_linear(module, index, device_mesh)
        module.unsharded_features = whole
        module.tp_shard = TPShard(self.split, index, device_mesh, chunk, size, self.replicas, self.gather,
                                  self.sequence_parallel)
        module.register_forward_pre_hook(_pre, prepend=True)
        for a in getattr(module, "adapters", {}).values():
            shard_adapter(module, a)
        register_post(module)
        return module

    def shard_linear(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        raise NotImplementedError

    def shard_quantized(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        raise NotImplementedError


class ColumnParallel(_LocalStyle):
    """Column-parallel: this rank keeps output rows; plain local output, split on the last dim.

    ``replicas`` > 1 gives ``replicas`` consecutive ranks the same rows (GQA with fewer K/V heads
    than ranks: vLLM's ``QKVParallelLinear`` keeps on each rank the K/V head its query heads use).
    ``gather`` all-gathers the output so that every rank has the whole of it (the head's logits).
    ``sequence_parallel``: the input arrives whole (gathered by the module around, for a block's
    layers) or as sequence chunks that the layer gathers first (the head).
    An ``nn.Linear``'s weight becomes a ``Shard(0)`` DTensor whose whole tensor, with replicas, is
    the weight with each row block repeated ``replicas`` times.
    """

    split = "rows"

    def shard_linear(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        w = module.weight
        if isinstance(w, DTensor):  # tied to the vocab-parallel embedding, sharded alike
            if w.placements != (Shard(0),):
                raise LeanLMError(f"a tied head weight sharded as {w.placements}, expected Shard(0)")
        else:
            shape = (module.out_features * self.replicas, w.shape[1]) if self.replicas > 1 else tuple(w.shape)
            module.weight = _dtensor(w[index], mesh, Shard(0), shape, w.requires_grad)
            if module.bias is not None:
                b = module.bias
                module.bias = _dtensor(b[index], mesh, Shard(0), (shape[0],), b.requires_grad)
        module.forward = types.MethodType(_local_forward_rows, module)

    def shard_quantized(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        shard_rows_(module, index)


class RowParallel(_LocalStyle):
    """Row-parallel: this rank keeps input columns and takes its slice of the input; the partial
    outputs (adapters' included) are all-reduced into the whole output on every rank. An
    ``nn.Linear``'s weight becomes a ``Shard(1)`` DTensor and its bias a ``Replicate()`` one,
    added after the reduction. ``sequence_parallel``: the reduction is a reduce-scatter, each rank
    keeping its chunk of the sequence (the bias's gradient is then partial: see
    :class:`leanlm.parallel.sequence.SumGradients`)."""

    split = "columns"

    def shard_linear(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        w = module.weight
        module.weight = _dtensor(w[:, index], mesh, Shard(1), tuple(w.shape), w.requires_grad)
        if module.bias is not None:
            b = module.bias
            module.bias = _dtensor(b, mesh, Replicate(), tuple(b.shape), b.requires_grad)
            if self.sequence_parallel:  # added to S/p tokens: a partial gradient, summed after
                module.partial_grads = (mesh, ("bias",))  # backward (leanlm.parallel.sequence)
        module.forward = types.MethodType(_local_forward_columns, module)

    def shard_quantized(self, module: nn.Module, index: slice, mesh: DeviceMesh) -> None:
        shard_columns_(module, index, keep_bias=mesh.get_local_rank() == 0, amax_reduce=amax_reduce(mesh))


def shard_adapter(module: nn.Module, adapter: Any) -> None:
    """Cut ``adapter`` (on the sharded ``module``) like its module, once; the parameters it keeps
    whole get their gradients summed over the ranks (each computes a partial sum of them)."""
    if not getattr(adapter, "tp_sharded", False):
        shard: TPShard = module.tp_shard
        for p in adapter.shard_(shard.split, shard.index):
            p.register_hook(grad_all_reduce(shard.mesh))
        adapter.tp_sharded = True
