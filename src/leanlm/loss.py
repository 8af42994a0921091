"""Fused, chunked linear + cross-entropy: the output head and the loss without full-size logits.

For hidden states H [N, d], head W [V, d] and targets y, the mean next-token loss is

    L = (1/n) Σ_i [ logsumexp(H_i Wᵀ) - (H_i Wᵀ)_{y_i} ]        (n = number of counted targets)

and its gradient with respect to the logits Z = H Wᵀ is G = (softmax(Z) - onehot(y)) / n, so
∂L/∂H = G W and ∂L/∂W = Gᵀ H. Materialising Z in fp32 costs N·V·4 bytes (134 MB for 4096
tokens × 8192 vocabulary, and three times that with softmax and its gradient) and several passes
over memory. Computing the loss *and both gradients in the forward pass*, one chunk of rows at a
time, keeps each chunk's logits cache-resident and never stores them (the approach of Liger
Kernel's FusedLinearCrossEntropy, Hsu et al. 2024, and of "Cut Your Losses in Large-Vocabulary
Language Models", Wijmans et al. 2024); backward only scales the saved gradients by the
incoming gradient (a scalar). Matmuls run in the autocast / parameter dtype, the softmax in fp32.

Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the
student matches a teacher's next-token distributions, softened by a temperature T,

    L = (1 − w)·CE(z_s, y) + w·T²·(1/n) Σ_i KL(softmax(z_t,i / T) ‖ softmax(z_s,i / T))

(T² keeps the gradient's scale independent of T). A draft model for speculative decoding
distilled from its target accepts more of its guesses (Zhou et al. 2024, "DistillSpec").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.attention import compute_dtype
from leanlm.kernels.cpu_linear import Linear

IGNORE_INDEX = -100
CHUNK = 256  # rows per chunk: measured fastest on CPU (each fp32 chunk of logits stays in cache)
# rows per chunk on CUDA: every chunk adds its bf16 weight gradient into the fp32 [V, d] sum, a
# full read and write of it (1 GB for a 128k x 2048 head), so a GPU wants few, large chunks
CUDA_CHUNK = 4096


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        in_dtypes = (h.dtype, w.dtype)
        h, wc, valid, n, loss, grad_h, grad_w = fused_loss_setup(ctx, h, w, targets)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, tc, vc = h[s:s + chunk], targets[s:s + chunk].clamp(min=0), valid[s:s + chunk]
                z = (hc @ wc.t()).float()
                lse = torch.logsumexp(z, dim=-1)
                rows = torch.arange(z.shape[0], device=z.device)
                loss += ((lse - z[rows, tc]) * vc).sum()
                grad_h[s:s + chunk] = chunk_grads_(z, lse, (rows, tc), vc / n, hc, wc, grad_w)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.in_dtypes = in_dtypes
        return loss / n

    @staticmethod
    def backward(ctx: object, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (*scaled_grads(ctx, grad_out), None, None)


def fused_loss_setup(ctx: Any, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple:
    """What the fused losses' forward starts from: h and w in the compute dtype, the valid-target
    mask and its count n, a zero fp32 loss, ∂loss/∂h's buffer and ∂loss/∂w's fp32 accumulator
    (None when w needs no gradient)."""
    dtype = compute_dtype(h)
    h, wc = h.to(dtype), w.to(dtype)
    valid = targets != IGNORE_INDEX
    n = valid.sum().clamp(min=1).to(torch.float32)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
    return h, wc, valid, n, loss, torch.empty_like(h), grad_w


def chunk_grads_(z: torch.Tensor, lse: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor],
                 weight: torch.Tensor, hc: torch.Tensor, wc: torch.Tensor,
                 grad_w: torch.Tensor | None) -> torch.Tensor:
    """One chunk's ∂loss/∂h (returned) and ∂loss/∂w (added into ``grad_w``) from its fp32 logits
    ``z`` (overwritten: softmax − one-hot at ``targets`` = (rows, columns), each row ⋅ ``weight``)."""
    z.sub_(lse[:, None]).exp_()  # softmax, in place
    z[targets] -= 1.0
    z.mul_(weight[:, None])
    g = z.to(hc.dtype)
    if grad_w is not None:
        grad_w += (g.t() @ hc).float()
    return g @ wc


def scaled_grads(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of the fused losses: the gradients saved by forward, times ``grad_out``."""
    grad_h, grad_w = ctx.saved_tensors
    h_dtype, w_dtype = ctx.in_dtypes
    gh = (grad_h * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None
    gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
    return gh, gw


def linear_cross_entropy(h: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``head(h)`` against ``targets`` (``-100`` = ignored).

    Fused and chunked (``chunk`` rows; by default ``CHUNK``, or ``CUDA_CHUNK`` on CUDA) for a
    plain bias-free ``nn.Linear`` (the model's ``Linear`` included) head when gradients are
    wanted; any other head (quantized, with adapters), or no-grad scoring, takes the plain path.
    A head that brings its own fused loss (``head.cross_entropy(h, targets, chunk)``: a
    vocabulary-parallel head, :mod:`leanlm.parallel.loss`) computes it when gradients are wanted.
    """
    own = getattr(head, "cross_entropy", None)
    if own is not None and torch.is_grad_enabled():
        return own(h, targets, chunk)
    hooked = bool(head._forward_hooks or head._forward_pre_hooks)  # e.g. a LoRA on lm_head
    if (type(head) in (nn.Linear, Linear) and head.bias is None and not hooked and torch.is_grad_enabled()
            and not getattr(head, "is_packed", False)):  # a packed head (CPU inference) runs its own forward
        chunk = chunk or (CUDA_CHUNK if h.device.type == "cuda" else CHUNK)
        return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), head.weight, targets.reshape(-1), chunk)
    logits = head(h).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    """(1 − w)·cross-entropy + w·T²·KL(teacher ‖ student) per counted target, from logits
    [..., V] of both models at the same positions (``targets == -100`` are not counted)."""
    valid = targets != IGNORE_INDEX
    s, t = student[valid].float(), teacher[valid].float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="sum") * temperature**2 / max(1, s.shape[0])
    if weight == 1.0:
        return kl
    return (1 - weight) * F.cross_entropy(s, targets[valid]) + weight * kl
