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
- ``silu_mul``: SiLU(gate) ⊙ up of the MLP's fused gate/up output;
- ``kv_store``: writing new K/V into their cache slots;
- ``rotary_store``: rotary of a step's q and k fused with the store of k and v (the paged decode
  path's one launch before attention).

Not Triton: ``cpu_linear`` is the model's ``nn.Linear``, which runs CPU inference on oneDNN's
prepacked weight layout (or, for bf16 on CPUs without bf16 instructions, leanlm's 64-row blocks);
``cpu_int8`` is oneDNN's int8 x int8 GEMM (VNNI/AMX) that W8A8 layers run on CPU; ``cpu_vnni`` the
int4/int8-weight GEMM on int8 activations (``LEANLM_INT8_ACTIVATIONS``); ``cpu_ops``
are C++ ops built on first use for CPU inference — the paged decode attention of
``cpu_attention``, RMSNorm, rotary, and GEMMs for int4 and bf16 weights — each one call where the
torch reference dispatches several; ``packing`` is the bit-stream layout of quantized codes.

Dispatch (:func:`use_triton`): the model, the paged attention backend and the quantized linear ask
here whether to launch a kernel. The mode is read once, from ``LEANLM_KERNELS`` at first use, and
changed for a block of code with :func:`kernel_mode` (tests, benchmarks):

- ``auto`` (default): the Triton kernel for CUDA tensors, the C++ op of ``cpu_ops`` for CPU
  tensors where one exists (and could be built), the torch reference elsewhere;
- ``reference``: always the torch reference;
- ``triton``: always the kernel — on CPU this needs Triton's interpreter (``TRITON_INTERPRET=1``,
  set before Triton is imported), which is how the tests run every kernel without a GPU.

Without Triton installed (``_triton.HAS_TRITON`` false) the references always run, and the core
still imports. The oneDNN prepacking of ``cpu_linear`` is a switch of its own
(``LEANLM_PREPACK=0`` or :func:`prepacking`), independent of the Triton mode; so is which GEMM
packed bf16 weights use (:func:`bf16_gemm`), whether an fp32 model's quantized layers may use
the bf16 CPU kernels (:func:`bf16_kernels`), whether 4/8-bit layers take int8 activations on VNNI
(:func:`int8_activations`), and whether an inference load fuses q/k/v and
gate/up into one linear each (by default on GPUs, and for the serving engine on the CPU too;
``LEANLM_FUSE=1``/``0`` or :func:`fusing`; :mod:`leanlm.fusion`).

Kernels have no backward: whenever autograd is recording through an input, the reference runs.
Under ``torch.compile`` the references are traced too: inductor fuses them into kernels of its own.
Each launcher checks shapes, dtypes and strides and raises :class:`LeanLMError` before launching.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from leanlm.errors import LeanLMError
from leanlm.kernels._triton import HAS_TRITON

MODES = ("auto", "reference", "triton")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_switches: dict[str, str | bool] = {}  # "mode", "prepack", "fuse" ..., once read or set


def mode_from_env() -> str:
    """``LEANLM_KERNELS`` (default ``auto``), checked."""
    value = os.environ.get("LEANLM_KERNELS", "auto")
    if value not in MODES:
        raise LeanLMError(f"LEANLM_KERNELS={value!r}: expected one of {MODES}")
    return value


def mode() -> str:
    """The kernel mode: read from the environment once, then as set by :func:`kernel_mode`."""
    if "mode" not in _switches:
        _switches["mode"] = mode_from_env()
    return str(_switches["mode"])


def bf16_kernels() -> bool:
    """Whether quantized layers may run torch's packed int4/int8 CPU kernels, which compute in
    bf16, for fp32 inputs too (``LEANLM_QUANT_BF16=1``; default off: an fp32 model's quantized
    layers dequantize and compute in fp32, so its results are fp32 results)."""
    if "bf16_kernels" not in _switches:
        _switches["bf16_kernels"] = os.environ.get("LEANLM_QUANT_BF16", "0") == "1"
    return bool(_switches["bf16_kernels"])


def allow_bf16_kernels(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``with allow_bf16_kernels(True): ...`` lets fp32 quantized layers use the bf16 kernels."""
    return _switched("bf16_kernels", enabled)


def int8_activations() -> bool:
    """Whether 4- and 8-bit CPU layers round their activations to int8 per group and multiply on
    VNNI (``LEANLM_INT8_ACTIVATIONS=1``, or :func:`quantizing_activations`; default off: it
    changes the numerics, :mod:`leanlm.kernels.cpu_vnni`). Read when a layer runs; a layer packs
    for it once."""
    if "int8_activations" not in _switches:
        _switches["int8_activations"] = os.environ.get("LEANLM_INT8_ACTIVATIONS", "0") == "1"
    return bool(_switches["int8_activations"])


def quantizing_activations(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``with quantizing_activations(True): ...`` runs 4/8-bit CPU layers on int8 activations."""
    return _switched("int8_activations", enabled)


def prepack() -> bool:
    """Whether CPU inference runs on oneDNN-prepacked weights (``LEANLM_PREPACK``, default on)."""
    if "prepack" not in _switches:
        _switches["prepack"] = os.environ.get("LEANLM_PREPACK", "1") != "0"
    return bool(_switches["prepack"])


BF16_GEMMS = ("auto", "leanlm", "onednn")


def bf16_gemm() -> str:
    """Which GEMM packed bf16 linears use on CPU (``LEANLM_BF16_GEMM``, or :func:`bf16_gemm_kernel`):
    ``onednn`` (its prepacked layout), ``leanlm`` (``cpu_ops.bf16_mm`` on 64-row blocks), or
    ``auto`` (default): leanlm's on AVX-512 CPUs without bf16 instructions, where oneDNN
    emulates bf16 (:mod:`leanlm.kernels.cpu_linear`), oneDNN's everywhere else."""
    if "bf16_gemm" not in _switches:
        value = os.environ.get("LEANLM_BF16_GEMM", "auto")
        if value not in BF16_GEMMS:
            raise LeanLMError(f"LEANLM_BF16_GEMM={value!r}: expected one of {BF16_GEMMS}")
        _switches["bf16_gemm"] = value
    return str(_switches["bf16_gemm"])


def bf16_gemm_kernel(value: str) -> contextlib.AbstractContextManager[None]:
    """``with bf16_gemm_kernel("leanlm"): ...`` packs bf16 linears for that GEMM in the block."""
    if value not in BF16_GEMMS:
        raise LeanLMError(f"bf16 GEMM {value!r}: expected one of {BF16_GEMMS}")
    return _switched("bf16_gemm", value)


def fuse(device: torch.device | str, serving: bool = False) -> bool:
    """Whether inference loads onto ``device`` fuse q/k/v and gate/up projections: ``LEANLM_FUSE``
    1 or 0 (or :func:`fusing`) everywhere; by default on GPUs, where it saves kernel launches,
    and for the serving engine on the CPU too, where a decode step of a small model is bound by
    the number of calls: the default model's step ran 1.19x / 1.15x / 1.05x faster fused at batch
    1 / 8 / 32 (benchmarks/RESULTS.md). Other CPU loads (``generate``, ``eval``) keep the parts,
    since the stacked copy raises a packed load's peak memory (llama-3.2-1b: 1.21x the checkpoint
    against 1.13x)."""
    if "fuse" not in _switches:
        env = os.environ.get("LEANLM_FUSE", "auto")
        _switches["fuse"] = "auto" if env not in ("0", "1") else env == "1"
    value = _switches["fuse"]
    return (serving or torch.device(device).type != "cpu") if value == "auto" else bool(value)


@contextlib.contextmanager
def _switched(name: str, value: str | bool) -> Iterator[None]:
    old = _switches.get(name)
    _switches[name] = value
    try:
        yield
    finally:
        if old is None:
            _switches.pop(name, None)
        else:
            _switches[name] = old


def kernel_mode(value: str) -> contextlib.AbstractContextManager[None]:
    """``with kernel_mode("reference"): ...`` runs the block in that mode (see the docstring)."""
    if value not in MODES:
        raise LeanLMError(f"kernel mode {value!r}: expected one of {MODES}")
    return _switched("mode", value)


def prepacking(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``with prepacking(False): ...`` runs CPU inference through plain ``F.linear``."""
    return _switched("prepack", enabled)


def fusing(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``with fusing(False): ...`` loads models with their q/k/v and gate/up linears apart (and
    ``fusing(True)`` fused, on the CPU too)."""
    return _switched("fuse", enabled)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernel (see the module docstring)."""
    chosen = mode()
    if chosen == "reference" or not HAS_TRITON or (chosen == "auto" and tensors[0].device.type != "cuda"):
        return False  # (the last: every CPU op of a decode step asks, and is answered at once)
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if tensors[0].device.type == "cuda":
        return True
    if chosen == "triton":
        if not interpreting():
            raise LeanLMError(f"kernel mode 'triton' on a {tensors[0].device.type} tensor needs "
                              "Triton's interpreter: set TRITON_INTERPRET=1 before starting Python")
        return True
    return False


def check(condition: bool, message: str) -> None:
    """A launcher's argument check: a clear error instead of a fault inside the kernel."""
    if not condition:
        raise LeanLMError(message)


def check_runnable(device: torch.device) -> None:
    """Triton is installed, and runs on CUDA, or anywhere under its interpreter."""
    check(HAS_TRITON, "Triton is not installed (pip install triton; Linux only)")
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

