"""Linear layers on oneDNN-prepacked weights, for inference on CPU.

A decode step multiplies every weight matrix by one row, or a few. On CPU, ``F.linear`` hands the
weight to oneDNN in its plain [out, in] layout, and in bf16 oneDNN first reorders it into its
blocked layout on every call: an extra read and write of the whole weight for a product that
reads it once. Reordering once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
weight freezing and Intel's extension do) and multiplying by the packed copy
(``torch.ops.mkldnn._linear_pointwise``) removes that. On 2 EPYC cores an 8192 x 2048 bf16
product of one row took 1.05 ms through ``F.linear`` and 0.24 ms packed; fp32, where ``F.linear``
goes to MKL, 2.8 ms and 1.0 ms; 256-row products gain 1.1x (bf16) and 2.5x (fp32). The results
are the same oneDNN kernels', so outputs agree with ``F.linear`` to rounding.

:class:`Linear` is ``nn.Linear`` taking that path when all of these hold, and ``F.linear``
otherwise:

- inference mode (``torch.inference_mode``: the serving engine, ``generate``, the perplexity and
  task evaluations): no autograd, and no training or calibration step is ever slowed or made to
  hold a second copy;
- a plain CPU tensor as weight (not a DTensor or other subclass) in bf16 or fp32, and not itself
  an inference tensor (its version counter is how a changed weight is noticed); an input of the
  same dtype; no autocast;
- not traced by ``torch.compile`` (inductor packs weights its own way), prepacking not switched
  off (``LEANLM_PREPACK=0``, :func:`leanlm.kernels.prepacking`), and oneDNN is available.

**bf16 on CPUs without bf16 instructions.** oneDNN's bf16 GEMM needs AVX512-BF16 or AMX. On an
AVX-512 CPU without them it emulates bf16 and runs 2–4x slower than its own fp32 GEMM at 8–32
rows (a 2-core Xeon without them: 960 x 320 at 8 rows, 120 µs bf16, 44 µs fp32). There a bf16
weight is packed instead into 64-row blocks, k-major ([⌈N/64⌉, K, 64], :func:`to_blocks`), for
leanlm's own GEMM (``cpu_ops.bf16_mm``): fp32 multiply-adds on the weight widened as it is read,
which is exact, so its results are fp32 products rounded once. The same 8-row product takes
39 µs, one row 22 µs against 36 (benchmarks/RESULTS.md, "A CPU without bf16 instructions").
``LEANLM_BF16_GEMM=leanlm|onednn`` (or :func:`leanlm.kernels.bf16_gemm_kernel`) picks one GEMM
on any CPU.

Two ways to hold the packed weight:

- **Packed only** (:meth:`Linear.pack_`, what ``load_model(..., pack=True)`` does for ``leanlm
  generate``, ``serve`` and ``eval``): the weight parameter *becomes* the packed tensor (an
  ``nn.Parameter`` in oneDNN's opaque layout, ``weight.is_mkldnn``, or the 3-D blocks above), so
  one copy of each weight is resident. The plain layout comes back on demand — either packing is
  lossless (:meth:`Linear.dense_weight`) — for whatever needs it: :meth:`Linear.unpack_` (a
  forward that cannot take the packed path, e.g. training, does it itself), the state dict (a
  plain copy per tensor, so saving works), copies and pickles (plain). What reads or writes
  ``weight`` itself unpacks first: ``quantize_`` and ``tensor_parallel_`` the whole model
  (``unpack_weights_``), merging an adapter the layers it merges into; DoRA and LoRA's
  initialisation read a plain copy.
- **A cache** beside a plain weight, for models not packed at load (a model being trained and
  evaluated in turns): made on the first forward in inference mode, made again whenever the
  weight changes (another tensor, or the same one modified in place), freed by the first forward
  outside inference mode. It costs a second copy, so a weight whose copy would leave less than
  1 GiB of the machine's available memory is not cached (it runs ``F.linear``). The cache is not
  part of the state dict, and copies and pickles drop it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.allocator import available_memory
from leanlm.kernels import cpu_ops

PACKABLE = (torch.bfloat16, torch.float32)
PLAIN = (nn.Parameter, torch.Tensor)
HEADROOM = 1 << 30  # bytes of available memory a packed copy must leave free
BLOCK = 64  # output rows per block of leanlm's bf16 layout


def blocked() -> bool:
    """Whether bf16 weights are packed into 64-row blocks for leanlm's GEMM rather than for
    oneDNN's (:func:`leanlm.kernels.bf16_gemm`; ``auto``: on AVX-512 CPUs without bf16
    instructions, with the C++ ops built and not in the reference kernel mode)."""
    choice = kernels.bf16_gemm()
    if choice != "auto":
        return choice == "leanlm"
    return (cpu_ops.x86_level() == "v4" and not cpu_ops.native_bf16() and kernels.mode() != "reference"
            and cpu_ops.ops() is not None)


def to_blocks(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] as [⌈N/64⌉, K, 64]: rows in blocks of 64 (the last zero-padded), each k-major."""
    n, k = w.shape
    pad = -n % BLOCK
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])
    return w.view(-1, BLOCK, k).transpose(1, 2).contiguous()


def from_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The plain [n, K] weight of :func:`to_blocks`' layout (a tensor of its own)."""
    w = blocks.transpose(1, 2).reshape(-1, blocks.shape[1])
    return w[:n].clone() if w.shape[0] != n else w


def is_packed_weight(w: torch.Tensor) -> bool:
    """Whether ``w`` is a linear's weight in a packed layout (oneDNN's, or 3-D blocks)."""
    return w.is_mkldnn or w.dim() == 3


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` in the layout its GEMM multiplies (:func:`blocked` decides for bf16)."""
    if w.dtype == torch.bfloat16 and blocked():
        return to_blocks(w)
    return torch.ops.mkldnn._reorder_linear_weight(w)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x wᵀ + bias for ``w`` [n, K] packed by :func:`pack_weight`."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    y = cpu_ops.bf16_mm(x.reshape(-1, x.shape[-1]), packed, bias, n)
    return y.view(*x.shape[:-1], n)


def packable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: a plain CPU bf16/fp32 tensor, oneDNN present."""
    return (type(weight) in PLAIN and not weight.is_mkldnn and weight.device.type == "cpu"
            and weight.dtype in PACKABLE and weight.dim() == 2 and torch.backends.mkldnn.is_available())


def _eligible(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a plain ``weight`` multiplies ``x`` through its cached packed copy."""
    # is_compiling first: under dynamo the whole test folds to False before anything is traced
    return (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled() and packable(weight)
            and x.dtype == weight.dtype and not weight.is_inference()
            and not torch.is_autocast_enabled("cpu") and kernels.prepack())


class Linear(nn.Linear):
    """``nn.Linear`` that runs CPU inference on a oneDNN-prepacked copy of its weight (see the
    module docstring); anything else — training, CUDA, fp16, compile — is ``F.linear``."""

    # ((data_ptr, version) of the weight packed, its packed copy or None where memory was short)
    _packed: tuple[tuple[int, int], torch.Tensor | None] | None = None

    @property
    def is_packed(self) -> bool:
        """Whether the weight parameter itself is packed (the only copy; see :meth:`pack_`)."""
        return is_packed_weight(self.weight)

    def dense_weight(self) -> torch.Tensor:
        """The weight in its plain [out, in] layout (a copy where it is packed)."""
        w = self.weight
        if w.is_mkldnn:
            return w.to_dense()
        return from_blocks(w, self.out_features) if w.dim() == 3 else w

    def pack_(self) -> bool:
        """Make the weight parameter the packed tensor and drop the plain one; returns whether it
        was packed (not for weights :func:`packable` refuses). The packed parameter does not
        require grad; :meth:`unpack_` restores a plain one that does (as it did before)."""
        w = self.weight
        if self.is_packed:
            return True
        if not packable(w):
            return False
        self._packed = None
        self._requires_grad = w.requires_grad
        self.weight = nn.Parameter(pack_weight(w.detach()), requires_grad=False)
        return True

    def unpack_(self) -> None:
        """Back to a plain weight parameter (a no-op when not packed)."""
        if self.is_packed:
            requires_grad = getattr(self, "_requires_grad", True)
            self.weight = nn.Parameter(self.dense_weight(), requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # (a parameter: each read is a module attribute lookup)
        if is_packed_weight(w):
            if _eligible_packed(w, x):  # the serving engine's decode steps: straight to the kernel
                return packed_linear(x, w, self.bias, self.out_features)
            self.unpack_()  # e.g. training after a packed load: the plain layout, on demand
            w = self.weight
        return self.linear(x, w, self.bias)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x wᵀ + bias through this module's packed copy of ``w``: ``forward`` passes its own
        parameters; a tensor-parallel shard (:mod:`leanlm.parallel`) passes its local ones."""
        if is_packed_weight(w):  # packed only (checked eligible by forward)
            return packed_linear(x, w, bias, self.out_features)
        if not _eligible(w, x):
            # (is_compiling first: a compiled graph must not guard on the copy eager steps make)
            if not torch.compiler.is_compiling() and self._packed is not None:
                self._packed = None  # e.g. training resumed after an evaluation: free the copy
            return F.linear(x, w, bias)
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # the stale copy goes before the new one is made
            fits = w.numel() * w.element_size() + HEADROOM <= available_memory()
            self._packed = (key, pack_weight(w.detach()) if fits else None)
        if self._packed[1] is None:  # no room for a copy of this weight: F.linear serves
            return F.linear(x, w, bias)
        return packed_linear(x, self._packed[1], bias, w.shape[0])

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_packed:  # the plain layout, one tensor at a time (saving, merging)
            destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.unpack_()  # loading writes into (or assigns) a plain weight
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's opaque tensors cannot be copied or pickled: copies are plain, and pack again
        state = self.__dict__.copy()
        state.pop("_packed", None)
        if self.is_packed:
            params = dict(state["_parameters"])
            params["weight"] = nn.Parameter(self.dense_weight(), requires_grad=False)
            state["_parameters"] = params
        return state


def _eligible_packed(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a packed-only weight can multiply ``x`` as it is (else it is unpacked first):
    no autograd through it, no autocast, prepacking not switched off, and not compiling a oneDNN
    weight (opaque to the compiler; 64-row blocks are traced as the C++ op that multiplies them)."""
    return ((weight.dim() == 3 or not torch.compiler.is_compiling()) and x.device.type == "cpu"
            and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.is_autocast_enabled("cpu") and kernels.prepack())
