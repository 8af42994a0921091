"""LLM.int8() (Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale", NeurIPS 2022): vector-wise int8 with mixed-precision decomposition of outlier features.

Per forward, the input feature dimensions where any |x| exceeds ``threshold`` (6.0) are
outliers; they are a handful of columns but would ruin a per-token int8 scale. So

    Y = X_O W_Oᵀ  +  dequant( int8(X_R) · int8(W)ᵀ )       O = outlier columns, R = the rest

where the first product runs in floating point and the second is the int8 GEMM with per-token
(rows of X) and per-output-channel (rows of W) absmax scales. As in bitsandbytes with int8
weights, W_O is the int8 weight dequantized (W is stored once, in int8). No calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.quant.api import Method, MethodConfig, register_method
from leanlm.quant.linear import W8A8Linear


@dataclass
class LLMInt8Config(MethodConfig):
    threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise LeanLMError(f"LLM.int8() threshold must be positive, got {self.threshold}")


class Int8OutlierLinear(W8A8Linear):
    threshold: float = 6.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        cols = (x2.abs() > self.threshold).any(0)
        if bool(cols.any()):
            idx = cols.nonzero().squeeze(1)
            w_out = self.weight[:, idx].float() * self.weight_scale.float()[:, None]
            y = F.linear(x2[:, idx].float(), w_out)
            y = y + self.w8a8_mm(x2.masked_fill(cols, 0))
        else:
            y = self.w8a8_mm(x2)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@register_method("llm-int8", LLMInt8Config)
class LLMInt8(Method):
    def quantize_linear(self, name: str, linear: nn.Linear) -> nn.Module:
        m = Int8OutlierLinear.from_linear(linear)
        m.threshold = self.config.threshold
        return m
