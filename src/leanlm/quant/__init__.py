"""Post-training quantization: ``quantize_(model, config, calib)`` with one config per method.

Weight-only: :class:`RTNConfig`, :class:`GPTQConfig`, :class:`AWQConfig` (-> ``QuantLinear``).
Weight-activation: :class:`SmoothQuantConfig` (W8A8), :class:`LLMInt8Config` (outlier
decomposition). Checkpoints: :func:`save_quantized` / ``leanlm.load_model`` (GPTQ and AWQ formats).
"""

from leanlm.quant.api import WeightOnlyConfig, quantize_, register_method
from leanlm.quant.awq import AWQConfig
from leanlm.quant.calibration import calibration_tokens, default_texts, read_texts
from leanlm.quant.formats import save_quantized
from leanlm.quant.gptq import GPTQConfig
from leanlm.quant.linear import QuantLinear, W8A8Linear, quantized_linears
from leanlm.quant.llm_int8 import Int8OutlierLinear, LLMInt8Config
from leanlm.quant.rtn import RTNConfig
from leanlm.quant.smoothquant import SmoothQuantConfig

__all__ = ["AWQConfig", "GPTQConfig", "Int8OutlierLinear", "LLMInt8Config", "QuantLinear", "RTNConfig",
           "SmoothQuantConfig", "W8A8Linear", "WeightOnlyConfig", "calibration_tokens", "default_texts",
           "quantize_", "quantized_linears", "read_texts", "register_method", "save_quantized"]
