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

The packed copy is made on first use and made again whenever the weight changes (another tensor,
or the same one modified in place), so serving or generating on CPU holds one more copy of each
linear's weight; the first forward outside inference mode frees it. A weight whose copy would
leave less than 1 GiB of the machine's available memory is not packed (it runs ``F.linear``), so
a model that fits in memory once still serves where two copies would not. The copy is not part
of the state dict, and copies and pickles of the module drop it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.allocator import available_memory

PACKABLE = (torch.bfloat16, torch.float32)
PLAIN = (nn.Parameter, torch.Tensor)
HEADROOM = 1 << 30  # bytes of available memory a packed copy must leave free


def _eligible(weight: torch.Tensor, x: torch.Tensor) -> bool:
    # is_compiling first: under dynamo the whole test folds to False before anything is traced
    return (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
            and type(weight) in PLAIN and weight.device.type == "cpu" and weight.dtype in PACKABLE
            and x.dtype == weight.dtype
            and not weight.is_inference() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and kernels.prepack())


class Linear(nn.Linear):
    """``nn.Linear`` that runs CPU inference on a oneDNN-prepacked copy of its weight (see the
    module docstring); anything else — training, CUDA, fp16, compile — is ``F.linear``."""

    # ((data_ptr, version) of the weight packed, its packed copy or None where memory was short)
    _packed: tuple[tuple[int, int], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x wᵀ + bias through this module's packed copy of ``w``: ``forward`` passes its own
        parameters; a tensor-parallel shard (:mod:`leanlm.parallel`) passes its local ones."""
        if not _eligible(w, x):
            if self._packed is not None and not torch.compiler.is_compiling():
                self._packed = None  # e.g. training resumed after an evaluation: free the copy
            return F.linear(x, w, bias)
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # the stale copy goes before the new one is made
            fits = w.numel() * w.element_size() + HEADROOM <= available_memory()
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()) if fits else None)
        if self._packed[1] is None:  # no room for a copy of this weight: F.linear serves
            return F.linear(x, w, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[1], bias, "none", [], "")

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's opaque tensors cannot be copied or pickled: copies pack again on first use
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state
