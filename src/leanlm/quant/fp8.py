"""FP8 W8A8: E4M3 weights per output channel, E4M3 activations per token (dynamic).

The scheme vLLM and TensorRT-LLM deploy first on Hopper (Micikevicius et al., "FP8 Formats for
Deep Learning", 2022; vLLM's ``Fp8LinearMethod`` and compressed-tensors' ``FP8_DYNAMIC``, what
llm-compressor writes). E4M3 has 4 exponent and 3 mantissa bits, no infinities, and a largest
finite value of 448. For y = x Wᵀ + b, W [N, K]:

    s_w[n] = max_k |W[n, k]| / 448                 (once, at quantization)
    W_q    = e4m3(W / s_w)                          (round to nearest even, |W_q| <= 448)
    s_x[t] = max_k |x[t, k]| / 448                 (per token, on the fly)
    x_q    = e4m3(x / s_x)
    y      = (x_q W_qᵀ) ⊙ (s_x s_wᵀ) + b

A product of two E4M3 values is exact in fp32, so ``x_q W_qᵀ`` accumulated in fp32 is the
kernel's only rounding besides the two casts. No calibration: round-to-nearest in a floating
format keeps a relative error of at most 2⁻⁴ per element whatever the magnitude, which is why
FP8 needs neither GPTQ's error feedback nor SmoothQuant's outlier migration at 8 bits.

On a CUDA GPU of compute capability 8.9 or more (Ada, Hopper) the GEMM is ``torch._scaled_mm``
with row-wise scales (cuBLASLt / CUTLASS FP8 tensor cores; K and N multiples of 16). Elsewhere
— CPU, older GPUs, odd shapes — it is the same arithmetic in fp32 (``x_q`` and ``W_q`` upcast
exactly, the scales applied after the product): a reference, not a fast path. On CPU
``torch._scaled_mm`` exists but runs 60x slower than a bf16 matmul, and fp8 is not a CPU
inference format; it is here so that a checkpoint made for a GPU can be evaluated anywhere.

:class:`Fp8Linear` is a :class:`~leanlm.quant.linear.W8A8Linear` with an E4M3 ``weight`` and an
fp32 ``weight_scale`` [N]: the tensor-parallel shards (:mod:`leanlm.quant.sharding`: rows of W
and s_w; columns of W, with the per-token maxima all-reduced so every rank uses the global s_x)
and the module plumbing are W8A8's. Checkpoints are compressed-tensors ``float-quantized``
(:mod:`leanlm.quant.formats`), which vLLM serves as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from leanlm.quant.api import Method, MethodConfig, register_method
from leanlm.quant.linear import W8A8Linear

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def absmax_fp8(t: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (q E4M3, scale fp32 [rows, 1]) with t ≈ q · scale; ``reduce`` maps the row maxima
    to the ones to use (the global maxima of a row split across tensor-parallel ranks)."""
    amax = t.float().abs().amax(-1, keepdim=True)
    scale = (amax if reduce is None else reduce(amax)).clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_mm_supported(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` runs this product on FP8 tensor cores."""
    return (x2.is_cuda and torch.cuda.get_device_capability(x2.device) >= (8, 9)
            and x2.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0)


@dataclass
class FP8Config(MethodConfig):
    """FP8 (E4M3) W8A8 with per-channel weight and dynamic per-token activation scales."""


class Fp8Linear(W8A8Linear):
    """E4M3 weights (per output channel) x E4M3 activations (per token, dynamic) (see the module
    docstring). ``weight`` [N, K] E4M3 and ``weight_scale`` [N] fp32 keep their dtypes through
    ``model.to(dtype)``; the bias follows the model."""

    _FIXED = ("weight", "weight_scale")  # buffers whose dtype a model-wide cast must not change

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.weight = torch.zeros(out_features, in_features, dtype=E4M3, device=device)
        self.weight_scale = torch.ones(out_features, dtype=torch.float32, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        m.weight, scale = absmax_fp8(w)
        m.weight_scale = scale[:, 0]
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight W_q ⊙ s_w that the layer multiplies by."""
        return self.weight.float() * self.weight_scale[:, None]

    def _apply(self, fn, recurse: bool = True):  # nn.Module signature (.to, .cuda, .bfloat16 ...)
        fixed = {k: self._buffers.pop(k) for k in self._FIXED}
        try:
            super()._apply(fn, recurse)
        finally:  # the device follows the call, the dtype does not
            device = fn(torch.empty(0, device=fixed["weight"].device)).device
            self._buffers.update({k: v.to(device) for k, v in fixed.items()})
        return self

    def w8a8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        xq, xs = absmax_fp8(x2, self.amax_reduce)
        ws = self.weight_scale.float()[None, :]
        if scaled_mm_supported(x2, self.weight):
            return torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16
                                    ).float()
        return (xq.float() @ self.weight.float().t()) * xs * ws


@register_method("fp8", FP8Config)
class FP8(Method):
    def quantize_linear(self, name: str, linear: nn.Linear) -> nn.Module:
        return Fp8Linear.from_linear(linear)
