"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): W8A8 with the activation outliers migrated into the weights.

Activations have a few channels with magnitudes far above the rest, so per-token int8
quantization of X loses the small channels; weights are easy to quantize. A per-channel scale

    s_j = max|X_j|^α / max|W_:,j|^(1-α)        (α = 0.5 by default, the paper's choice)

with Y = (X diag(s)⁻¹)(diag(s) W) moves part of the difficulty from X to W exactly in full
precision. max|X_j| comes from the calibration set; diag(s)⁻¹ is folded into the preceding
norm (as in the reference ``smooth_lm``: the q/k/v and the gate/up inputs), diag(s) into the
weights' columns. Every selected linear then becomes a :class:`~leanlm.quant.linear.W8A8Linear`:
int8 weights per output channel, int8 activations per token (dynamic), int32 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.quant.api import Method, MethodConfig, block_sublayers, register_method, set_module
from leanlm.quant.awq import apply_scale
from leanlm.quant.calibration import LayerInputs, capture_inputs
from leanlm.quant.linear import W8A8Linear


@dataclass
class SmoothQuantConfig(MethodConfig):
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LeanLMError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.cat([w.detach().float().abs() for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@register_method("smoothquant", SmoothQuantConfig)
class SmoothQuant(Method):
    calibrated = True
    quantizes_head = False
    propagate_quantized = False

    def quantize_block(self, block: nn.Module, inputs: LayerInputs, targets: set[str]) -> None:
        norm_fed = [s for s in block_sublayers(block) if s.prev is not None and s.prev.endswith("layernorm")]
        act_max: dict[str, torch.Tensor] = {}

        def reduce(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).float().abs().amax(0)
            act_max[name] = torch.maximum(act_max[name], m) if name in act_max else m

        readers = {s.names[0]: block.get_submodule(s.names[0]) for s in norm_fed}
        capture_inputs(readers, inputs, lambda x, meta: block(x, meta), reduce,
                       stop_after=norm_fed[-1].names[0])
        for s in norm_fed:
            fcs = [block.get_submodule(n).weight for n in s.names]
            apply_scale(block, s, smooth_scales(act_max[s.names[0]], fcs, self.config.alpha))
        for name in sorted(targets):
            set_module(block, name, W8A8Linear.from_linear(block.get_submodule(name)))
