"""Weight-only quantized linear layers and the kernels that run them.

:class:`QuantLinear` replaces an ``nn.Linear`` after RTN, GPTQ or AWQ. Its state is the
canonical, format-neutral form of :mod:`leanlm.quant.primitives`: packed codes ``qweight``
[N, K·b/8] (uint8 bit stream along K), ``scales`` and integer ``zeros`` [N, G], ``g_idx`` [K]
and the optional ``bias``. Checkpoint formats (GPTQ, AWQ) are conversions of this state.

The forward picks a backend once per (device, M-regime), automatically:

- ``int4pack`` (CPU, 4 bits): torch's ``_weight_int4pack_mm_for_cpu`` with bf16 activations.
  It computes ``(q - 8)·s + m`` per group, so the zero point goes in as ``m = (8 - z)·s``. From
  ``cpu_ops.INT4_MIN_ROWS`` rows (a batched decode step, a prefill), leanlm's C++ kernel
  (:func:`leanlm.kernels.cpu_ops.int4pack_mm`) multiplies the same packing instead: torch's
  unpacks the weight again for every few rows, leanlm's once for all of them (in ``auto``; a
  forced ``int4pack`` is torch's kernel at every row count, as GPTQModel's CPU kernel runs it).
  Its groups are contiguous, so act-order weights are stored with their columns sorted by group
  (``perm``) and the input is gathered with the same permutation; K is padded to a whole group,
  N (in leanlm's packing, :func:`int4pack`) to whole blocks of 64 rows.
  Once that packing exists it is the only copy of the codes (``qweight`` is emptied and rebuilt
  from it for ``state_dict``, device/dtype moves and the other backends), so an int4 layer costs
  0.5 byte per weight in memory, not 1.
- ``vnni`` (CPU with AVX512-VNNI, 4 or 8 bits, groups of a multiple of 16 or per channel;
  ``auto`` takes it only when :func:`leanlm.kernels.int8_activations` is on): the activations
  rounded to int8 per row and group (a per-channel weight's per 128/64/32 columns, its scale
  repeated) and the integer products on VNNI
  (:mod:`leanlm.kernels.cpu_vnni`), W4A8 1.5-2.4x the bf16-activation int4 kernels at 1-32 rows
  on 2 Xeon cores without AVX512-BF16. Its packing (VNNI's operand order) is then the one copy
  of the codes, as int4pack's is.
- ``int8pack`` (CPU, 8 bits, per-channel): ``_weight_int8pack_mm`` on ``q - 128`` with bf16
  activations; an asymmetric zero point becomes a rank-1 correction ``-(Σ_k x_k)·s·(z - 128)``.
  Like ``int4pack``, its ``q - 128`` is then the one copy of the codes (1 byte per weight).
- ``triton`` (CUDA; 2/4/8 bits), for M ≤ ``TRITON_MAX_M`` rows: decode-shaped calls run
  :mod:`leanlm.kernels.quant_gemv` on an interleaved copy of the codes made once per layer (its
  chunk layout: K a multiple of 32·32/b; act-order columns sorted by group and the input gathered
  to match; the copy costs another b/8 byte per weight, beside ``qweight``, which the larger-M
  kernel reads); otherwise
  :mod:`leanlm.kernels.quant_gemm`, which reads ``qweight`` as it is and dequantizes in registers
  (act-order through ``g_idx``).
- ``dequant``: ŵ = s·(q - z) in the activation dtype, then a dense GEMM. This is what runs for
  large M past torch's packed kernels (long prefills: M ≥ ``KERNEL_MAX_M`` rows; leanlm's int4
  GEMM has no such limit), for shapes the kernels refuse, and when autograd needs the gradient
  of the input (QLoRA: adapters on a quantized base).
- ``reference``: the same in fp32 (tests compare the others against it).

``backend=`` forces one; a forced kernel that cannot run this layer raises a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.errors import LeanLMError
from leanlm.kernels import cpu_int8, cpu_ops, cpu_vnni, quant_gemm, quant_gemv
from leanlm.kernels.packing import pack_codes, packed_bytes, pad_codes, unpack_codes
from leanlm.quant.primitives import default_g_idx, dequantize_weight, num_groups

BACKENDS = ("auto", "triton", "int4pack", "vnni", "int8pack", "dequant", "reference")
# Rows below which a packed CPU kernel beats dequantize + bf16 GEMM. Measured on an 8192 x 2048
# layer, 2 cores: the kernels cost ~0.10 (int4) / ~0.12 (int8) ms per row against 0.044 for bf16
# GEMM, and dequantizing the layer costs ~30 ms, so they cross near 600 and 375 rows.
KERNEL_MAX_M = {"int4pack": 512, "int8pack": 256}
# Rows up to which the Triton kernels run on CUDA; past it dequantize + cuBLAS. Measured on an H200
# (benchmarks/bench_kernels.py, RESULTS.md) on a 4096x11008 int4 g128 layer: the in-register
# dequantizing dot kernel took 0.21 ms at M=16 (dequantize + matmul: 0.50 ms) and 0.56 ms at M=64
# (dequantize + matmul: 0.50 ms).
TRITON_MAX_M = 16


class QuantLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ = s·(q - z) held as packed integer codes."""

    quantized = True  # (checkpoint.save_model refuses quantized models by this mark)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise LeanLMError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        g = num_groups(in_features, group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, packed_bytes(in_features, bits),
                                                    dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=dtype, **kw))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.uint8, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw),
                                 requires_grad=False) if bias else None
        self._kernels: dict[str, tuple] = {}

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, group_size: int, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> QuantLinear:
        n, k = codes.shape
        m = cls(k, n, bits, group_size, bias is not None, dtype, codes.device, backend)
        m.load_codes(codes, scales, zeros, g_idx, bias)
        problem = None if backend == "auto" else m.kernel_problem(backend)
        if problem:
            raise LeanLMError(f"backend {backend!r} cannot run a [{n}, {k}] layer: {problem}")
        return m

    def load_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.qweight = pack_codes(pad_codes(codes.to(torch.uint8), self.bits), self.bits)
        self.scales = scales.to(self.scales.dtype).contiguous()
        self.zeros = zeros.to(torch.uint8).contiguous()
        self.g_idx = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.scales.dtype), requires_grad=False)
        self._kernels.clear()

    def codes(self) -> torch.Tensor:
        if self.qweight.numel() == 0 and "int8pack" in self._kernels:  # held by the kernel only
            return self._kernels["int8pack"][0].view(torch.uint8) ^ 0x80  # q - 128 back to q
        held = next((b for b in ("int4pack", "vnni") if b in self._kernels), None)
        if self.qweight.numel() == 0 and held is not None:
            packed, _, perm, pad, _ = self._kernels[held]
            k = self.in_features + pad
            codes = (cpu_vnni.unpack(packed, packed.shape[0], k, self.bits) if held == "vnni"
                     else int4pack_codes(packed, packed.shape[0], k))
            codes = codes[:self.out_features, :self.in_features]
            return codes if perm is None else codes[:, torch.argsort(perm)]
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def _restore_codes(self) -> None:
        """Rebuild ``qweight`` from the kernel's packing before the kernel tensors go away."""
        if self.qweight.numel() == 0 and any(b in self._kernels for b in ("int4pack", "vnni", "int8pack")):
            self.qweight = pack_codes(pad_codes(self.codes(), self.bits), self.bits)

    def _g_idx(self) -> torch.Tensor | None:
        """``g_idx``, or None where it is the default k // group_size (broadcast, no gather)."""
        if "contiguous" not in self._kernels:
            default = default_g_idx(self.in_features, self.group_size, self.g_idx.device)
            self._kernels["contiguous"] = (torch.equal(self.g_idx, default),)
        return None if self._kernels["contiguous"][0] else self.g_idx

    def _gemv_words(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The decode GEMV's interleaved copy of the codes (:mod:`leanlm.kernels.quant_gemv`) and
        the column order it expects the input in, made once; None where the layout does not fit
        (K or groups off its chunks). Act-order codes are stored with their columns sorted by
        group, as for int4pack, and the input is gathered with the same permutation."""
        if "gemv" not in self._kernels:
            k, made = self.in_features, None
            if quant_gemv.supports(k, self.bits, self.group_size) and (
                    self._g_idx() is None or self._contiguous_groups()):
                perm, qweight = None, self.qweight
                if self._g_idx() is not None:
                    perm = torch.argsort(self.g_idx.long(), stable=True)
                    qweight = pack_codes(self.codes()[:, perm], self.bits)
                made = (quant_gemv.interleave(qweight, self.bits, k), perm)
            self._kernels["gemv"] = (made,)
        return self._kernels["gemv"][0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales, self.zeros, self._g_idx(), dtype,
                                 self.group_size)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._restore_codes()  # so that the loaded qweight meets a buffer of its shape
        self._kernels.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight.numel() == 0:  # the canonical codes, whatever the kernel holds
            destination[prefix + "qweight"] = pack_codes(pad_codes(self.codes(), self.bits), self.bits)

    def _apply(self, fn, recurse: bool = True):  # nn.Module signature
        self._restore_codes()
        self._kernels.clear()  # derived kernel tensors follow the module via re-preparation
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")

    # ---- backends -----------------------------------------------------------------------------
    def kernel_problem(self, backend: str) -> str | None:
        """Why ``backend`` cannot run this layer on its current device (None if it can)."""
        n, g = self.out_features, self.group_size
        if backend in ("dequant", "reference"):
            return None
        if backend == "triton":
            if self.bits not in quant_gemm.SUPPORTED_BITS:
                return f"triton runs {quant_gemm.SUPPORTED_BITS}-bit weights, this layer has {self.bits} bits"
            return None
        if self.qweight.device.type != "cpu":
            return f"{backend} is a CPU kernel; this layer is on {self.qweight.device}"
        if backend == "int4pack":
            if self.bits != 4:
                return f"int4pack runs 4-bit weights, this layer has {self.bits} bits"
            if g not in (32, 64, 128, 256):
                return f"int4pack needs group_size 32/64/128/256, this layer has {g}"
            if n % 16:
                return f"int4pack needs out_features divisible by 16, got {n}"
            if not self._contiguous_groups():
                return "int4pack needs every group to hold group_size columns (g_idx is irregular)"
            return None
        if backend == "vnni":
            if not cpu_vnni.available():
                return "vnni needs a CPU with AVX512-VNNI and leanlm's C++ ops built"
            if self.bits not in cpu_vnni.BITS:
                return f"vnni runs {cpu_vnni.BITS}-bit weights, this layer has {self.bits} bits"
            if (g == -1 and self.in_features % 16) or (g != -1 and g % 16):
                return f"vnni needs groups of a multiple of 16 columns; group_size {g}, K {self.in_features}"
            if g != -1 and not self._contiguous_groups():
                return "vnni needs every group to hold group_size columns (g_idx is irregular)"
            return None
        if backend == "int8pack":
            if self.bits != 8 or g != -1:
                return (f"int8pack runs 8-bit per-channel weights (group_size -1), this layer has "
                        f"{self.bits} bits, group_size {g}")
            if self.in_features % 16:  # torch's kernel returns garbage (or crashes) otherwise
                return f"int8pack needs in_features divisible by 16, got {self.in_features}"
            return None
        return f"unknown backend {backend!r}"

    def _contiguous_groups(self) -> bool:
        counts = torch.bincount(self.g_idx.long(), minlength=self.scales.shape[1])
        full = counts[:-1] == self.group_size
        return bool(full.all()) and int(counts[-1]) <= self.group_size

    def _choose(self, x2: torch.Tensor) -> str:
        """The backend for an input x2 [m, K]."""
        m = x2.shape[0]
        if self.backend == "auto" and torch.is_grad_enabled() and x2.requires_grad:
            return "dequant"  # differentiable in x (QLoRA); the packed kernels have no backward
        if self.backend == "auto" and m <= TRITON_MAX_M and kernels.use_triton(x2):
            if "triton" not in self._kernels:
                self._kernels["triton"] = (self.kernel_problem("triton") is None,)
            if self._kernels["triton"][0]:
                return "triton"
        if "kernel" not in self._kernels:  # which packed kernel can run this layer, decided once
            self._kernels["kernel"] = (self._kernel(),)
        kernel = self._kernels["kernel"][0]
        if self.backend != "auto":
            return self.backend
        # torch's packed CPU kernels compute in bf16: fp32 inputs only where the user allows it
        bf16 = _activation_dtype(x2) == torch.bfloat16 or kernels.bf16_kernels()
        if not bf16:
            return "dequant"
        if kernels.int8_activations() and cpu_ops.runs(x2):  # by request: the numerics change
            if "vnni?" not in self._kernels:
                self._kernels["vnni?"] = (self.kernel_problem("vnni") is None,)
            if self._kernels["vnni?"][0]:
                return "vnni"
        if kernel is None:
            return "dequant"
        # leanlm's int4 GEMM unpacks each weight tile once for all rows, so it beats dequantize +
        # GEMM at any M (2.4-4x at 256-2048 rows, 2 Xeon cores without AVX512-BF16); torch's
        # kernels unpack per few rows, and give way to it past KERNEL_MAX_M
        ours = (kernel == "int4pack" and m >= cpu_ops.INT4_MIN_ROWS and int4pack_layout_known()
                and cpu_ops.runs(x2))
        return kernel if ours or m < KERNEL_MAX_M[kernel] else "dequant"

    def _kernel(self) -> str | None:
        if self.backend != "auto":
            problem = self.kernel_problem(self.backend)  # also refuses a CPU kernel off the CPU
            if problem:
                raise LeanLMError(f"backend {self.backend!r} cannot run this layer: {problem}")
            return None
        return next((b for b in ("int4pack", "int8pack") if self.kernel_problem(b) is None), None)

    def _prepare(self, backend: str) -> tuple:
        if backend in self._kernels:
            return self._kernels[backend]
        codes = self.codes()
        if backend in ("int4pack", "vnni"):
            k, g, reps = self.in_features, self.group_size, 1
            if g == -1:  # per channel: vnni rounds activations per 128/64/32 columns, (s, m) repeated
                g = next((c for c in (128, 64, 32) if k % c == 0), k) if backend == "vnni" else k
                reps = k // g
            perm = None
            if not torch.equal(self.g_idx, torch.sort(self.g_idx, stable=True).values):
                perm = torch.argsort(self.g_idx.long(), stable=True)
                codes = codes[:, perm]
            pad = (-k) % g
            codes = F.pad(codes, (0, pad))  # the padded columns meet zero inputs
            s, h = self.scales.float(), 2 ** (self.bits - 1)
            sz = torch.stack([s, (h - self.zeros.float()) * s], -1).transpose(0, 1)  # [G, N, 2]
            sz = sz.repeat(reps, 1, 1)
            ours = int4pack_layout_known() or backend == "vnni"  # the layouts leanlm's kernels read
            if ours:  # whole blocks of 64 output rows; the padding rows have scale and offset 0
                rows = (-self.out_features) % 64
                codes = F.pad(codes, (0, 0, 0, rows))  # uint8: no int32 copy (4 B/weight)
                packed = cpu_vnni.pack(codes, self.bits) if backend == "vnni" else int4pack(codes)
                sz = F.pad(sz, (0, 0, 0, rows))
                self.qweight = self.qweight.new_empty(0)  # the packing is now the one copy
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2)
            sz = sz.to(torch.bfloat16).contiguous()
            if backend == "vnni":
                sz = cpu_vnni.block_scales(sz)
            self._kernels[backend] = (packed, sz, perm, pad, ours)
        elif backend == "int8pack":
            s = self.scales.float()[:, 0]
            zero = self.zeros.float()[:, 0] - 128
            corr = None if bool((zero == 0).all()) else (s * zero).to(torch.bfloat16)
            w8 = (codes.int() - 128).to(torch.int8).contiguous()
            self.qweight = self.qweight.new_empty(0)  # w8 is now the one copy (codes = w8 + 128)
            self._kernels[backend] = (w8, s.to(torch.bfloat16), corr)
        else:
            self._kernels[backend] = ()
        return self._kernels[backend]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        fast = self._kernels.get("direct")  # the serving engine's steps on CPU: straight to the kernel
        # (a decode step makes ~25 of these calls: each test here is one the kernel would need)
        if (fast is not None and self.backend == "auto" and x2.dtype == torch.bfloat16
                and x2.shape[0] >= fast[1] and fast[2] == kernels.int8_activations() and cpu_ops.direct(x2)):
            y = fast[0](x2 if x2.is_contiguous() else x2.contiguous(), *fast[3:])
            if y.shape[1] != self.out_features:  # the padding rows of the packing
                y = y[:, :self.out_features]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)
        backend = self._choose(x2)
        out_dtype = x.dtype
        bias = self.bias
        if backend == "triton":
            self._restore_codes()  # a layer that ran int4pack on the CPU holds its codes there
            dtype = _activation_dtype(x2)
            gemv = self._gemv_words() if x2.shape[0] <= quant_gemm.GEMV_MAX_M else None
            if gemv is not None:
                words, perm = gemv
                xg = x2 if perm is None else x2[:, perm]
                y = quant_gemv.quant_gemv(xg.to(dtype).contiguous(), words, self.scales, self.zeros,
                                          self.bits, self.group_size, self.bias)
            else:
                y = quant_gemm.quant_gemm(x2.to(dtype).contiguous(), self.qweight, self.scales, self.zeros,
                                          self._g_idx(), self.bits, self.group_size, self.bias)
            out_dtype, bias = dtype, None
        elif backend in ("int4pack", "vnni"):
            packed, sz, perm, pad, ours = self._prepare(backend)
            xb = x2.to(torch.bfloat16)
            if perm is not None:
                xb = xb[:, perm]
            if pad:
                xb = F.pad(xb, (0, pad))
            xb = xb.contiguous()
            # (kernel, from how many rows, int8 activations?, its arguments); auto only: a forced
            # int4pack is torch's kernel, whose roundings peers share
            direct = None
            if backend == "vnni":
                direct = (cpu_vnni.mm, 1, True, packed, sz, xb.shape[1] // sz.shape[1], self.bits)
            elif (ours and self.backend == "auto" and xb.shape[0] >= cpu_ops.INT4_MIN_ROWS
                  and cpu_ops.runs(xb)):  # unpacked once for all rows
                direct = (cpu_ops.int4pack_mm, cpu_ops.INT4_MIN_ROWS, False, packed, sz, self.group_size)
            if direct is not None:
                y = direct[0](xb, *direct[3:])
                if perm is None and not pad and self.backend == "auto":  # bf16 rows go here from now on
                    self._kernels["direct"] = direct
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.group_size, sz)
            y = y[:, :self.out_features]  # (the padding rows of leanlm's packing)
        elif backend == "int8pack":
            w8, s, corr = self._prepare(backend)
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(xb, w8, s)
            if corr is not None:
                y = y - xb.float().sum(-1, keepdim=True).to(torch.bfloat16) * corr
        elif backend == "reference":
            y = F.linear(x2.float(), self.dequantize(torch.float32))
            out_dtype = x.dtype
        else:
            dtype = _activation_dtype(x2)
            if torch.is_grad_enabled() and x2.requires_grad:  # QLoRA: keep no dequantized copy
                y = _DequantLinear.apply(x2.to(dtype), self, dtype)
            else:
                y = F.linear(x2.to(dtype), self.dequantize(dtype))
            out_dtype = dtype
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(out_dtype).reshape(*shape[:-1], self.out_features)


class _DequantLinear(torch.autograd.Function):
    """x ŵᵀ whose backward dequantizes ŵ again instead of saving it (the weight is frozen), so
    training adapters on a quantized base holds no full-precision weights between forward and
    backward — the recomputation QLoRA's kernels do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantize(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.layer.dequantize(ctx.dtype), None, None


def _activation_dtype(x2: torch.Tensor) -> torch.dtype:
    """The dtype a dequantizing backend computes in: autocast's, else x's own float dtype."""
    if torch.is_autocast_enabled(x2.device.type):
        return torch.get_autocast_dtype(x2.device.type)
    return x2.dtype if x2.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def int4pack(codes: torch.Tensor) -> torch.Tensor:
    """``_convert_weight_to_int4pack_for_cpu(codes, 2)`` for n % 64 == 0, computed in uint8: blocks
    of 64 output rows, each stored k-major as 32 bytes per input column whose low nibble is row j
    and high nibble row j + 32 of the block."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // 64, 64, k).transpose(1, 2)  # [n/64, k, 64]
    return (c[..., :32] | (c[..., 32:] << 4)).contiguous().view(n, k // 2)


def int4pack_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`int4pack`: codes [n, k] (uint8)."""
    b = packed.reshape(n // 64, k, 32)
    return torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(n, k)


@functools.cache
def int4pack_layout_known() -> bool:
    """Whether this torch build packs as :func:`int4pack` does (checked once on a probe); if
    not, layers use torch's packing and keep their own copy of the codes."""
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0))
    return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.int(), 2), int4pack(probe))


def absmax_int8(t: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q int8, scale fp32 [rows, 1]) with t ≈ q · scale; ``reduce``
    maps the row maxima to the ones to use (the global maxima of a row split across ranks)."""
    amax = t.float().abs().amax(-1, keepdim=True)
    scale = (amax if reduce is None else reduce(amax)).clamp(min=1e-8) / 127
    return torch.clamp(torch.round(t.float() / scale), -127, 127).to(torch.int8), scale


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) x int8 activations (per token, dynamic) -> int32 GEMM.

    y = (X_q W_qᵀ) ⊙ (s_x s_wᵀ) + b, with X_q = round(X / s_x), s_x = max_k |X_tk| / 127 per
    token, computed on the fly. The int8 x int8 -> int32 product runs in oneDNN's VNNI/AMX kernel
    on CPU (:mod:`leanlm.kernels.cpu_int8`, on a copy of the weight packed once: the int8
    ``weight`` buffer stays, for the state dict and for other devices), elsewhere in
    ``torch._int_mm``; both are exact integer products, so they agree bit for bit.
    """

    quantized = True
    # Set on a row-parallel shard (:mod:`leanlm.quant.sharding`): this rank holds some input
    # columns, and the per-token scale s_x must be the maximum over all of them, on every rank.
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (what was packed: the weight's and scales' data_ptr/version, oneDNN's copy, fp32 scales, zero points)
    _packed: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> W8A8Linear:
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, s = absmax_int8(w)
        m.weight, m.weight_scale = q, s[:, 0].to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # oneDNN's packed copy is not copied or pickled: packed again
        state.pop("_packed", None)
        return state

    def w8a8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """fp32 [M, N] result of the 8-bit GEMM for activations x2 [M, K] (scales applied)."""
        xq, xs = absmax_int8(x2, self.amax_reduce)
        if x2.device.type == "cpu" and cpu_int8.available():
            w = self.weight
            s = self.weight_scale
            key = (w.data_ptr(), w._version, tuple(w.shape), s.data_ptr(), s._version)
            if self._packed is None or self._packed[0] != key:
                self._packed = (key, cpu_int8.pack(w), self.weight_scale.float(),
                                torch.zeros(w.shape[0], dtype=torch.int64))
            _, packed, scale, zeros = self._packed
            return cpu_int8.int8_mm(xq, packed, scale, zeros) * xs
        if x2.shape[0] <= 16 and x2.device.type == "cuda":  # cuBLASLt int8 needs M > 16
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - x2.shape[0]))
        acc = torch._int_mm(xq, self.weight.t())[: x2.shape[0]]
        return acc.float() * xs * self.weight_scale.float()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self.w8a8_mm(x2)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that a quantization method put in place of an nn.Linear."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
