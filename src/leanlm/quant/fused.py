"""How weight-only quantized layers fuse (:mod:`leanlm.fusion`): q/k/v, gate/up as one layer.

A :class:`~leanlm.quant.linear.QuantLinear` holds ŵ = s·(q - z) with codes ``qweight`` [N, K·b/8],
``scales`` and ``zeros`` [N, G] — every one per output row — and ``g_idx`` [K], the group of each
input column. Layers over one input with the same bits, group size and ``g_idx`` therefore stack
exactly: their codes, scales, zeros and biases concatenated along N, ``g_idx`` shared. That holds
for RTN, AWQ and GPTQ layers (2-8 bits), act-order included: GPTQ orders the columns of q/k/v (and
of gate/up) by the Hessian of the input they share, so their ``g_idx`` agree. Layers whose
``g_idx`` differ (another tool's checkpoint quantized them apart) are not fused: an int4 kernel
reads one group layout per layer. The fused layer prepares its own kernels (int4pack, int8pack,
the Triton GEMV's interleaved codes) on its first forward, as any loaded layer does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanlm.fusion import Fuser, register_fuser
from leanlm.quant.linear import QuantLinear


def concat(parts: Sequence[QuantLinear]) -> QuantLinear | None:
    """One layer stacking ``parts``; None where they differ in input layout (bits, group size,
    ``g_idx``), dtype, device, backend or in having a bias."""
    first = parts[0]
    key = lambda p: (p.in_features, p.bits, p.group_size, p.backend, p.scales.dtype, p.scales.device,
                     p.bias is None)
    if any(key(p) != key(first) or not torch.equal(p.g_idx, first.g_idx) for p in parts):
        return None
    for p in parts:
        p._restore_codes()  # a layer that ran int4pack/int8pack holds its codes there only
    one = QuantLinear(first.in_features, sum(p.out_features for p in parts), first.bits, first.group_size,
                      first.bias is not None, first.scales.dtype, "meta", first.backend)
    one.qweight = torch.cat([p.qweight for p in parts])
    one.scales = torch.cat([p.scales for p in parts])
    one.zeros = torch.cat([p.zeros for p in parts])
    one.g_idx = first.g_idx
    if first.bias is not None:
        one.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return one


def split(one: QuantLinear, sizes: Sequence[int]) -> list[nn.Module]:
    """Layers of ``sizes`` output features, each with state of its own."""
    one._restore_codes()
    sizes = list(sizes)
    biases = [None] * len(sizes) if one.bias is None else one.bias.detach().split(sizes)
    parts: list[nn.Module] = []
    for q, s, z, b in zip(one.qweight.split(sizes), one.scales.split(sizes), one.zeros.split(sizes),
                          biases, strict=True):
        part = QuantLinear(one.in_features, q.shape[0], one.bits, one.group_size, b is not None,
                           one.scales.dtype, "meta", one.backend)
        part.qweight, part.scales, part.zeros = q.clone(), s.clone(), z.clone()
        part.g_idx = one.g_idx.clone()
        if b is not None:
            part.bias = nn.Parameter(b.clone(), requires_grad=False)
        parts.append(part)
    return parts


register_fuser(QuantLinear, Fuser(concat, split, shared=("g_idx",)))
