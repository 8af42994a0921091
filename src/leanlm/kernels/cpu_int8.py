"""int8 × int8 → int32 GEMM on CPU through oneDNN, on weights prepacked once.

The W8A8 product (SmoothQuant, LLM.int8()'s dense part, llama.cpp's Q8_0 × Q8 dot products)

    y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] · q_w[n, k],   q_x, q_w ∈ [-127, 127]

is what VNNI's ``vpdpbusd`` (AVX512-VNNI, AVX-VNNI) and AMX's ``tdpbusd`` compute natively, with
unsigned 8-bit activations and signed 8-bit weights. ``torch._int_mm`` does not reach them on CPU
at decode shapes; oneDNN's quantized linear (``torch.ops.onednn.qlinear_prepack`` /
``qlinear_pointwise``, what Inductor's x86 quantization lowers to) does, on a weight reordered once
into its blocked layout. On 2 EPYC cores (Zen 4, AVX512-VNNI), one row times an 8192 × 2048
weight took 0.16 ms there against 0.43 ms for ``_weight_int8pack_mm`` (bf16 activations) and
0.52 ms for the prepacked bf16 product.

Signed activations go in as unsigned ones with zero point 128: ``q + 128`` is ``q``'s bit
pattern with the top bit flipped (``q.view(uint8) ^ 0x80``), one cheap op, and oneDNN subtracts
the zero point exactly (integer arithmetic). The scale of the activations is passed as 1 and
applied per row afterwards, so one call serves per-token scales, which oneDNN's per-tensor
activation scale could not.
"""

from __future__ import annotations

import torch

from leanlm import kernels


def available() -> bool:
    """Whether this torch has oneDNN's quantized linear (x86 CPU builds do) and prepacking is on."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and kernels.prepack())


def pack(w8: torch.Tensor) -> torch.Tensor:
    """oneDNN's layout of the int8 weight ``w8`` [N, K] (an opaque tensor: keep it, read nothing)."""
    return torch.ops.onednn.qlinear_prepack(w8.contiguous(), None)


def int8_mm(xq: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
            zeros: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, N] = (xq [M, K] int8) · (the packed int8 weight)ᵀ · ``w_scale`` [N] (fp32), per
    column; the caller multiplies rows by their activation scales. ``zeros`` is the weight's zero
    points (int64 zeros [N]; made here when not given)."""
    qx = xq.view(torch.uint8) ^ 0x80  # q + 128: unsigned, zero point 128
    if zeros is None:
        zeros = torch.zeros(w_scale.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed, w_scale, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def reference(xq: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The same in plain torch (the tests compare against it)."""
    return (xq.double() @ w8.double().t() * w_scale.double()).float()
