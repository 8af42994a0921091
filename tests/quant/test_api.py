"""quantize_: the registry, the filter, calibration data, and clear errors for bad input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import random_model, write_tokenizer
from leanlm.data.text import read_texts
from leanlm.errors import LeanLMError
from leanlm.quant import (
    REGISTRY,
    AWQConfig,
    GPTQConfig,
    QuantLinear,
    RTNConfig,
    calibration_tokens,
    quantize_,
    register_method,
)
from leanlm.quant.api import Method
from leanlm.tokenizer import load_tokenizer


@pytest.mark.parametrize(("cls", "kwargs"), [
    (GPTQConfig, {"bits": 5}), (RTNConfig, {"group_size": 48}), (AWQConfig, {"bits": 16}),
    (GPTQConfig, {"damp_percent": 2.0}), (RTNConfig, {"backend": "cuda-magic"}),
])
def test_unsupported_configs_are_refused(cls: type, kwargs: dict) -> None:
    with pytest.raises(LeanLMError):
        cls(**kwargs)


def test_a_kernel_that_cannot_run_the_chosen_group_size_fails_before_quantizing() -> None:
    model = random_model("llama")
    with pytest.raises(LeanLMError, match="int4pack needs group_size"):
        quantize_(model, RTNConfig(bits=4, group_size=-1, backend="int4pack"), progress=False)


def test_already_quantized_and_missing_calibration() -> None:
    model = random_model("llama")
    with pytest.raises(LeanLMError, match="needs calibration data"):
        quantize_(model, GPTQConfig(), progress=False)
    quantize_(model, RTNConfig(), progress=False)
    with pytest.raises(LeanLMError, match="already quantized"):
        quantize_(model, RTNConfig(), progress=False)


def test_filter_and_unknown_methods() -> None:
    model = random_model("llama")
    calib = torch.randint(0, 300, (2, 16))
    with pytest.raises(LeanLMError, match="no nn.Linear"):
        quantize_(model, RTNConfig(), filter_fn=lambda n, m: False, progress=False)
    with pytest.raises(LeanLMError, match="awq cannot quantize the LM head"):  # the filter took it
        quantize_(model, AWQConfig(group_size=32), calib, filter_fn=lambda n, m: True, progress=False)

    @dataclass
    class Mystery:
        pass

    with pytest.raises(LeanLMError, match="no quantization method registered for Mystery"):
        quantize_(model, Mystery(), progress=False)
    # RTN may take the head too; the filter decides
    quantize_(model, RTNConfig(bits=8, group_size=-1), filter_fn=lambda n, m: "mlp" in n or n == "lm_head",
              progress=False)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_a_new_method_is_one_config_and_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leanlm.quant.api.REGISTRY", dict(REGISTRY))  # the test's method stays here

    @dataclass
    class HalfConfig:
        pass

    @register_method("half", HalfConfig)
    class Half(Method):
        def quantize_linear(self, name: str, linear: torch.nn.Linear) -> torch.nn.Module:
            return linear.half().float()

    model = random_model("llama")
    quantize_(model, HalfConfig(), progress=False)
    assert model.quantization == HalfConfig()


def test_calibration_sources(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 40}) + "\n\n")
    texts = read_texts(tmp_path / "c.jsonl")
    a = calibration_tokens(texts, tok, n_samples=5, seq_len=16, seed=3)
    assert a.shape == (5, 16) and torch.equal(a, calibration_tokens(texts, tok, 5, 16, seed=3))
    assert not torch.equal(a, calibration_tokens(texts, tok, 5, 16, seed=4))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LeanLMError, match="is empty"):
        read_texts(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(LeanLMError, match=r"bad.jsonl:1: expected a JSON object with a \"text\" field"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(LeanLMError, match="no such file"):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(LeanLMError, match="fewer than one window"):
        calibration_tokens(["tiny"], tok, 4, 512)


def test_method_config_is_a_registry_lookup_by_command_line_name() -> None:
    from leanlm.quant import REGISTRY, LLMInt8Config, SmoothQuantConfig, method_config

    assert set(REGISTRY) >= {"gptq", "awq", "rtn", "smoothquant", "llm-int8"}
    assert {n for n in ("gptq", "awq", "rtn", "smoothquant", "llm-int8") if REGISTRY[n].calibrated} == \
        {"gptq", "awq", "smoothquant"}
    options = {"bits": 3, "group_size": 64, "sym": None, "act_order": True, "static_groups": False}
    assert method_config("gptq", **options) == GPTQConfig(bits=3, group_size=64, sym=True, act_order=True)
    assert method_config("awq", **options) == AWQConfig(bits=3, group_size=64, sym=False)
    assert method_config("rtn", **{**options, "sym": False}) == RTNConfig(bits=3, group_size=64, sym=False)
    assert method_config("smoothquant", **options) == SmoothQuantConfig()
    assert method_config("llm-int8", **options) == LLMInt8Config()
    with pytest.raises(LeanLMError, match="unknown method 'nf4'"):
        method_config("nf4")
