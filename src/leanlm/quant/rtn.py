"""Round-to-nearest (RTN): the baseline every other weight-only method is measured against.

Each group of ``group_size`` input columns of each output row gets its own scale and zero point
from its min and max (:func:`~leanlm.quant.primitives.group_params`), and every weight is rounded
to the nearest code independently: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``. No data is
needed, and nothing corrects the rounding error, which is why GPTQ and AWQ beat it at 3-4 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.quant.api import Method, WeightOnlyConfig, register_method
from leanlm.quant.linear import QuantLinear
from leanlm.quant.primitives import default_g_idx, group_params, quantize_weight


@dataclass
class RTNConfig(WeightOnlyConfig):
    pass


def to_quant_linear(linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor, config: WeightOnlyConfig) -> QuantLinear:
    """The QuantLinear that replaces ``linear`` (its bias and dtype carried over)."""
    return QuantLinear.from_codes(codes, scales, zeros, g_idx, config.bits, config.group_size,
                                  bias=linear.bias, dtype=linear.weight.dtype, backend=config.backend)


def rtn_quantize(w: torch.Tensor, config: WeightOnlyConfig) -> tuple[torch.Tensor, ...]:
    """(codes, scales, zeros, g_idx) of ``w`` [N, K] by round-to-nearest."""
    w = w.detach().float()
    scales, zeros = group_params(w, config.bits, config.group_size, config.sym)
    g_idx = default_g_idx(w.shape[1], config.group_size, w.device)
    return quantize_weight(w, scales, zeros, config.bits, g_idx), scales, zeros, g_idx


@register_method("rtn", RTNConfig)
class RTN(Method):
    def quantize_linear(self, name: str, linear: nn.Linear) -> nn.Module:
        return to_quant_linear(linear, *rtn_quantize(linear.weight, self.config), self.config)
