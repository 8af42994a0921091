"""Triton kernels, one op per file, each beside the torch reference it must agree with.

FlashAttention (Dao et al. 2022) and Flash-Decoding (Dao et al. 2023) are the survey's
algorithm-hardware co-design methods: decode is memory-bound, so a step can take no less than
(bytes of weights + bytes of K/V read) / memory bandwidth, and the kernels here exist to get close
to that limit on a GPU:

- ``paged_attention``: attention over the serving engine's paged K/V — a split-KV decode kernel
  (Flash-Decoding) and a varlen prefill kernel;
- ``int4_gemm``: weight-only GEMM/GEMV on :class:`~leanlm.quant.linear.QuantLinear`'s packed codes,
  dequantized in registers (GPTQ's g_idx included);
- ``rmsnorm``: fused residual-add + RMSNorm;  ``rotary``: rotary embedding of q or k;
- ``kv_store``: writing new K/V into their cache slots.

Not Triton: ``cpu_linear`` is the model's ``nn.Linear``, which runs CPU inference on oneDNN's
prepacked weight layout (``LEANLM_KERNELS=reference`` turns it off too).

Dispatch (:func:`use_triton`): the model, the paged attention backend and the quantized linear ask
here whether to launch a kernel. ``LEANLM_KERNELS`` picks the mode:

- ``auto`` (default): the Triton kernel for CUDA tensors, the torch reference elsewhere;
- ``reference``: always the torch reference;
- ``triton``: always the kernel — on CPU this needs Triton's interpreter (``TRITON_INTERPRET=1``,
  set before Triton is imported), which is how the tests run every kernel without a GPU.

Kernels have no backward: whenever autograd is recording through an input, the reference runs.
Under ``torch.compile`` the references are traced too: inductor fuses them into kernels of its own.
Each launcher checks shapes, dtypes and strides and raises :class:`LeanLMError` before launching.
"""

from __future__ import annotations

import os

import torch

from leanlm.errors import LeanLMError

MODES = ("auto", "reference", "triton")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def mode() -> str:
    value = os.environ.get("LEANLM_KERNELS", "auto")
    if value not in MODES:
        raise LeanLMError(f"LEANLM_KERNELS={value!r}: expected one of {MODES}")
    return value


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernel (see the module docstring)."""
    chosen = mode()
    if chosen == "reference" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if tensors[0].device.type == "cuda":
        return True
    if chosen == "triton":
        if not interpreting():
            raise LeanLMError(f"LEANLM_KERNELS=triton on a {tensors[0].device.type} tensor needs "
                              "Triton's interpreter: set TRITON_INTERPRET=1 before starting Python")
        return True
    return False


def check(condition: bool, message: str) -> None:
    """A launcher's argument check: a clear error instead of a fault inside the kernel."""
    if not condition:
        raise LeanLMError(message)


def check_runnable(device: torch.device) -> None:
    """Triton runs on CUDA, or anywhere under its interpreter."""
    check(device.type == "cuda" or interpreting(),
          f"Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1); got a {device.type} tensor")


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...],
                 device: torch.device, last_contiguous: bool = True) -> None:
    """Rank, dtype, device and (by default) unit stride on the last dimension."""
    check(t.ndim == ndim, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if last_contiguous and t.shape[-1] > 1:
        check(t.stride(-1) == 1, f"{name} must have unit stride on its last dimension, "
                                 f"got strides {t.stride()}")

