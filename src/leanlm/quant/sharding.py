"""How quantized linears split for tensor parallelism: the layouts :mod:`leanlm.parallel` calls.

A linear y = x Wᵀ + b with W [N out, K in] splits two ways (Megatron-LM, Shoeybi et al. 2019):

- **by output rows** (column-parallel, the q/k/v/gate/up projections and the head): rank r keeps
  rows ``rows`` of W and b and computes its slice of y from the whole x. Nothing is shared
  across rows, so a quantized layer keeps those rows of every per-row tensor: the packed codes,
  ``scales``/``zeros`` [N, G], the bias; ``g_idx`` [K] (the group of each input column) is
  unchanged, act-order included. The layer stays an ordinary layer of N/p rows and every backend
  runs it (``int4pack`` needs N/p divisible by 16; a layer where it is not runs ``dequant``).
- **by input columns** (row-parallel, o/down): rank r keeps columns ``cols`` of W, multiplies its
  slice of x, and the partial products are summed across ranks (an all-reduce, done by the
  caller). A group of columns shares a scale and zero, so:

  * contiguous groups that start on this rank's first column (``group_size`` divides the
    offset; always true for per-channel ``group_size = -1``): the rank keeps its groups'
    columns of ``scales``/``zeros`` and renumbers ``g_idx`` from 0 — an ordinary layer, every
    backend runs it;
  * act-order ``g_idx`` (any column in any group) or groups that straddle two ranks: the rank
    keeps the whole ``scales``/``zeros`` [N, G] and the global group ids of its columns, as vLLM
    does for act-order GPTQ under row parallelism. ``int4pack`` and the decode GEMV need whole
    groups, so such a layer runs ``dequant`` on the CPU (``triton`` on CUDA reads ``g_idx`` as
    it is).

  The bias is added once: rank 0 keeps it, the others drop it, and the all-reduce sums it in.
  W8A8's dynamic per-token scale s_x = max_k |x_k| / 127 is a maximum over all K columns; each
  rank sees K/p of them, so the row-parallel shard takes ``amax_reduce`` (an all-reduce MAX over
  the ranks) and quantizes its columns with the global scale, exactly as the whole layer would.

These functions only cut tensors; the plan that chooses the slices and communicates is
:mod:`leanlm.parallel`. They run once, on a layer that every rank built in full.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.quant.linear import QuantLinear, W8A8Linear
from leanlm.quant.primitives import default_g_idx, num_groups

QUANTIZED = (QuantLinear, W8A8Linear)


def _bias(bias: torch.Tensor | None, index: slice | None) -> nn.Parameter | None:
    if bias is None:
        return None
    kept = bias.detach() if index is None else bias.detach()[index]
    return nn.Parameter(kept.clone(), requires_grad=False)


def shard_rows_(module: nn.Module, rows: slice) -> None:
    """Keep output rows ``rows`` of a quantized linear (a column-parallel shard), in place."""
    n = rows.stop - rows.start
    if isinstance(module, QuantLinear):
        codes = module.codes()[rows].clone()
        scales, zeros = module.scales[rows].clone(), module.zeros[rows].clone()
        bias = _bias(module.bias, rows)
        module.out_features = n
        module.load_codes(codes, scales, zeros, module.g_idx.clone())
        module.bias = bias
    elif isinstance(module, W8A8Linear):
        module.weight = module.weight[rows].clone()
        module.weight_scale = module.weight_scale[rows].clone()
        module.bias = _bias(module.bias, rows)
        module.out_features = n
    else:
        raise LeanLMError(f"cannot shard a {type(module).__name__} by rows: not a quantized linear")


def shard_columns_(module: nn.Module, cols: slice, keep_bias: bool,
                   amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Keep input columns ``cols`` of a quantized linear (a row-parallel shard), in place; the bias
    stays only where ``keep_bias``. ``amax_reduce`` makes W8A8's per-token scales global."""
    k0, k1 = cols.start, cols.stop
    if isinstance(module, QuantLinear):
        codes = module.codes()[:, cols].clone()
        g_idx = module.g_idx[cols]
        gs, full = module.group_size, module.in_features
        default = default_g_idx(full, gs, g_idx.device)[cols]
        aligned = gs == -1 or (k0 % gs == 0 and torch.equal(g_idx, default))
        if aligned:
            first = 0 if gs == -1 else k0 // gs
            groups = slice(first, first + num_groups(k1 - k0, gs))
            scales, zeros = module.scales[:, groups].clone(), module.zeros[:, groups].clone()
            g_idx = default_g_idx(k1 - k0, gs, g_idx.device)
        else:  # act-order or a straddling group: every group's scale, the global group ids
            scales, zeros = module.scales.clone(), module.zeros.clone()
        bias = _bias(module.bias, None) if keep_bias else None
        module.in_features = k1 - k0
        module.load_codes(codes, scales, zeros, g_idx.clone())
        module.bias = bias
    elif isinstance(module, W8A8Linear):
        module.weight = module.weight[:, cols].clone()
        module.bias = _bias(module.bias, None) if keep_bias else None
        module.in_features = k1 - k0
        module.amax_reduce = amax_reduce
    else:
        raise LeanLMError(f"cannot shard a {type(module).__name__} by columns: not a quantized linear")
