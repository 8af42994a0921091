"""W8A8: SmoothQuant's migration helps with activation outliers; LLM.int8() handles them exactly."""

from __future__ import annotations

import torch

from conftest import random_model
from leanlm.quant import LLMInt8Config, SmoothQuantConfig, W8A8Linear, quantize_
from leanlm.quant.api import set_module
from leanlm.quant.smoothquant import smooth_scales


def test_smooth_scales_follow_the_formula() -> None:
    act = torch.tensor([1.0, 100.0, 4.0])
    w = [torch.tensor([[1.0, 0.5, 2.0]]), torch.tensor([[-3.0, 0.1, 1.0]])]
    s = smooth_scales(act, w, 0.5)
    torch.testing.assert_close(s, torch.sqrt(act) / torch.sqrt(torch.tensor([3.0, 0.5, 2.0])))


def _err(model: torch.nn.Module, ref: torch.Tensor, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(tokens) - ref).norm() / ref.norm())


def test_smoothquant_beats_plain_w8a8_with_outliers() -> None:
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (8, 32))
    tokens = calib[:2]
    base = random_model("llama", outliers=20.0)
    with torch.no_grad():
        ref = base(tokens)
    plain = random_model("llama", outliers=20.0)
    for name, m in list(plain.named_modules()):
        if isinstance(m, torch.nn.Linear) and name.startswith("layers."):
            set_module(plain, name, W8A8Linear.from_linear(m))
    smooth = random_model("llama", outliers=20.0)
    quantize_(smooth, SmoothQuantConfig(alpha=0.5), calib, batch_size=4, progress=False)
    assert all(isinstance(smooth.get_submodule(n), W8A8Linear) for n, m in plain.named_modules()
               if isinstance(m, W8A8Linear))
    e_plain, e_smooth = _err(plain, ref, tokens), _err(smooth, ref, tokens)
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)
    assert e_smooth < 0.06


def test_llm_int8_outlier_decomposition_helps_a_model_with_outliers() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 16))
    base = random_model("llama", outliers=20.0)
    with torch.no_grad():
        ref = base(tokens)
    errs = []
    for threshold in (6.0, float("inf")):  # inf: no outlier columns, plain vector-wise int8
        model = random_model("llama", outliers=20.0)
        quantize_(model, LLMInt8Config(threshold=threshold), progress=False)  # no calibration
        errs.append(_err(model, ref, tokens))
    assert errs[0] < 0.7 * errs[1], errs
    assert errs[0] < 0.06
