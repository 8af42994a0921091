"""Post-training quantization: ``quantize_(model, config, calib)`` with one config per method.

Weight-only: :class:`RTNConfig`, :class:`GPTQConfig`, :class:`AWQConfig` (-> ``QuantLinear``).
Weight-activation: :class:`SmoothQuantConfig` (W8A8), :class:`LLMInt8Config` (outlier
decomposition), :class:`FP8Config` (E4M3 W8A8 -> ``Fp8Linear``). Checkpoints:
:func:`save_quantized` / ``leanlm.load_model`` (GPTQ, AWQ, w8a8 and compressed-tensors FP8).
Each method's handler is registered under its command-line name in :data:`REGISTRY`
(``gptq``, ``awq``, ``rtn``, ``smoothquant``, ``llm-int8``, ``fp8``); :func:`method_config` builds a
config by that name.
"""

from leanlm.quant import fused  # noqa: F401  (registers how QuantLinear layers fuse)
from leanlm.quant.api import (
    REGISTRY,
    MethodConfig,
    WeightOnlyConfig,
    method_config,
    quantize_,
    register_method,
)
from leanlm.quant.awq import AWQConfig
from leanlm.quant.calibration import calibration_tokens
from leanlm.quant.formats import save_quantized
from leanlm.quant.fp8 import FP8Config, Fp8Linear
from leanlm.quant.gptq import GPTQConfig
from leanlm.quant.linear import QuantLinear, W8A8Linear, quantized_linears
from leanlm.quant.llm_int8 import Int8OutlierLinear, LLMInt8Config
from leanlm.quant.rtn import RTNConfig
from leanlm.quant.smoothquant import SmoothQuantConfig

__all__ = ["REGISTRY", "AWQConfig", "FP8Config", "Fp8Linear", "GPTQConfig", "Int8OutlierLinear",
           "LLMInt8Config", "MethodConfig", "QuantLinear", "RTNConfig", "SmoothQuantConfig", "W8A8Linear",
           "WeightOnlyConfig",
           "calibration_tokens", "method_config", "quantize_", "quantized_linears", "register_method",
           "save_quantized"]
