"""Post-training quantization: ``quantize_(model, config, calib)`` with one config per method.

Weight-only: :class:`RTNConfig`, :class:`GPTQConfig`, :class:`AWQConfig` (-> ``QuantLinear``).
Weight-activation: :class:`SmoothQuantConfig` (W8A8), :class:`LLMInt8Config` (outlier
decomposition). Checkpoints: :func:`save_quantized` / ``leanlm.load_model`` (GPTQ and AWQ formats).
"""

from leanlm.quant.api import WeightOnlyConfig, quantize_, register_method
from leanlm.quant.awq import AWQConfig
from leanlm.quant.calibration import calibration_tokens
from leanlm.quant.formats import save_quantized
from leanlm.quant.gptq import GPTQConfig
from leanlm.quant.linear import QuantLinear, W8A8Linear, quantized_linears
from leanlm.quant.llm_int8 import Int8OutlierLinear, LLMInt8Config
from leanlm.quant.rtn import RTNConfig
from leanlm.quant.smoothquant import SmoothQuantConfig

METHODS = ("gptq", "awq", "rtn", "smoothquant", "llm-int8")
CALIBRATED = ("gptq", "awq", "smoothquant")


def method_config(method: str, bits: int = 4, group_size: int = 128, sym: bool | None = None,
                  act_order: bool = False, static_groups: bool = False) -> object:
    """The config of a method by its command-line name (weight-only ones symmetric by default,
    except AWQ, as AutoGPTQ and AutoAWQ)."""
    from leanlm.errors import LeanLMError

    if method not in METHODS:
        raise LeanLMError(f"unknown method {method!r}: expected one of {METHODS}")
    weight_only = {"sym": True if sym is None else sym, "bits": bits, "group_size": group_size}
    if method == "gptq":
        return GPTQConfig(**weight_only, act_order=act_order, static_groups=static_groups)
    if method == "awq":
        return AWQConfig(**{**weight_only, "sym": bool(sym)})
    if method == "rtn":
        return RTNConfig(**weight_only)
    return SmoothQuantConfig() if method == "smoothquant" else LLMInt8Config()


__all__ = ["CALIBRATED", "METHODS", "AWQConfig", "GPTQConfig", "Int8OutlierLinear", "LLMInt8Config",
           "QuantLinear", "RTNConfig", "SmoothQuantConfig", "W8A8Linear", "WeightOnlyConfig",
           "calibration_tokens", "method_config", "quantize_", "quantized_linears",
           "register_method", "save_quantized"]
