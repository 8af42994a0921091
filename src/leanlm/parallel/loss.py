"""Loss parallelism: the fused chunked head + cross-entropy on a vocabulary-parallel head,
without ever gathering the logits (Megatron-LM's ``vocab_parallel_cross_entropy``, Shoeybi et
al. 2019 §3; torchtitan's ``loss_parallel``), kept chunked and fused as :mod:`leanlm.loss`.

Rank r of p holds rows V_r of the head W [V, d] (the plan's column-parallel head) and the whole
hidden states H [N, d] (gathered from sequence chunks under sequence parallelism). For a chunk of
rows it computes its logits Z_r = H W[V_r]ᵀ [c, V/p] and, with three per-row reductions over the
p ranks (c floats each; max, then the exponentials' sum and the target's logit together),

    M   = max_r max_j Z_r[:, j]
    lse = M + log Σ_r Σ_j exp(Z_r[:, j] − M)
    t   = Σ_r Z_r[i, y_i]  (only the rank holding y_i contributes)
    L   = (1/n) Σ_i (lse_i − t_i)

and, as :mod:`leanlm.loss` does, both gradients in the same pass: G_r = (softmax(Z)[:, V_r] −
onehot(y)[:, V_r]) / n, ∂L/∂W[V_r] = G_rᵀ H (this rank's rows, complete) and ∂L/∂H = Σ_r G_r W[V_r]
(a partial sum per rank, summed by the collective in front: Megatron's f backward — or, under
sequence parallelism, the reduce-scatter that also returns each rank its sequence chunk).
Communication: 2·N floats of all-reduce per step instead of all-gathering N·V logits, and
memory: one [c, V/p] fp32 chunk at a time instead of [N, V].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from leanlm.loss import CHUNK, CUDA_CHUNK, chunk_grads_, fused_loss_setup, scaled_grads
from leanlm.parallel.styles import TPShard, wait, whole_input


def _all_reduce(x: torch.Tensor, op: str, mesh: DeviceMesh) -> torch.Tensor:
    return wait(funcol.all_reduce(x.contiguous(), op, mesh))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, start: int,
                chunk: int, mesh: DeviceMesh) -> torch.Tensor:
        in_dtypes = (h.dtype, w.dtype)
        h, wc, valid, n, loss, grad_h, grad_w = fused_loss_setup(ctx, h, w, targets)
        local_vocab = w.shape[0]
        local_t = targets - start
        mine = valid & (local_t >= 0) & (local_t < local_vocab)  # targets in this rank's rows
        local_t = local_t.clamp(0, max(0, local_vocab - 1))
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, vc = h[s:s + chunk], valid[s:s + chunk]
                tc, mc = local_t[s:s + chunk], mine[s:s + chunk]
                z = (hc @ wc.t()).float()
                rows = torch.arange(z.shape[0], device=z.device)
                m = z.amax(-1) if local_vocab else torch.full_like(vc, -torch.inf, dtype=torch.float32)
                m = _all_reduce(m, "max", mesh)
                target = torch.where(mc, z[rows, tc] if local_vocab else 0.0, 0.0)
                sums = _all_reduce(torch.stack([(z - m[:, None]).exp().sum(-1), target]), "sum", mesh)
                lse = m + sums[0].log()
                loss += ((lse - sums[1]) * vc).sum()
                # this rank's columns of the softmax; the h gradient is partial (its vocabulary only)
                grad_h[s:s + chunk] = chunk_grads_(z, lse, (rows[mc], tc[mc]), vc / n, hc, wc, grad_w)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.in_dtypes = in_dtypes
        return loss / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (*scaled_grads(ctx, grad_out), None, None, None, None)


def vocab_parallel_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                                 chunk: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``head(h)`` against ``targets`` [B, S] (-100 ignored) for a
    column-parallel (vocabulary-parallel) head: ``h`` is what the head's forward takes ([B, S, d]
    replicated, or [B, S/p, d] chunks under sequence parallelism). The same value on every rank.
    Installed as ``head.cross_entropy`` by the plan, where :func:`leanlm.loss.linear_cross_entropy`
    finds it."""
    shard: TPShard = head.tp_shard
    x = whole_input(shard, h)
    x = x.reshape(-1, x.shape[-1])
    chunk = chunk or (CUDA_CHUNK if x.device.type == "cuda" else CHUNK)
    return _VocabParallelCrossEntropy.apply(x, head.weight.to_local(), targets.reshape(-1),
                                           shard.index.start, chunk, shard.mesh)
