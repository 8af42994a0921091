"""`leanlm quantize`: writes a loadable checkpoint, reports sizes and time; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_hf_model, write_tokenizer
from leanlm.checkpoint import load_model
from leanlm.eval.cli import QUANT_METHODS_HELP
from leanlm.quant import REGISTRY, Fp8Linear, QuantLinear, W8A8Linear


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanlm.cli", "quantize", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def model_and_calib(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    calib = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1\n"}) for i in range(200)]
    calib.write_text("\n".join(lines) + "\n")
    return path, calib


@pytest.mark.parametrize(("method", "extra", "kind"), [
    ("gptq", ["--act-order", "--group-size", "32", "--lm-head"], QuantLinear),
    ("rtn", ["--group-size", "32", "--lm-head-bits", "8"], QuantLinear),
    ("awq", ["--group-size", "32"], QuantLinear),
    ("smoothquant", [], W8A8Linear),
    ("fp8", [], Fp8Linear),
])
def test_quantize_writes_a_loadable_checkpoint(tmp_path: Path, model_and_calib: tuple[Path, Path],
                                               method: str, extra: list[str], kind: type) -> None:
    model, calib = model_and_calib
    out = run(str(model), "--method", method, "--calib", str(calib), "--samples", "4", "--seq-len", "32",
              "--out", str(tmp_path / "q"), *extra)
    assert out.returncode == 0, out.stderr
    assert f"{method}:" in out.stdout and "MiB ->" in out.stdout and " s;" in out.stdout
    q = load_model(tmp_path / "q")
    assert isinstance(q.layers[0].mlp.down_proj, kind)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"  # the source checkpoint's dtype, not the calibration dtype
    with torch.no_grad():
        assert torch.isfinite(q(torch.tensor([[1, 2, 3]]))).all()
    head = "--lm-head" in extra or "--lm-head-bits" in extra
    assert isinstance(q.lm_head, QuantLinear) == head
    assert cfg["quantization_config"].get("lm_head", False) == head
    if "--lm-head-bits" in extra:
        assert (q.lm_head.bits, q.lm_head.group_size, q.layers[0].mlp.down_proj.bits) == (8, -1, 4)
    if method == "gptq":
        info = subprocess.run([sys.executable, "-m", "leanlm.cli", "info", str(tmp_path / "q")],
                              capture_output=True, text=True, timeout=120)
        assert "gptq (4-bit, group 32, act-order)" in info.stdout


def test_quantize_errors_are_one_line(tmp_path: Path, model_and_calib: tuple[Path, Path]) -> None:
    model, calib = model_and_calib
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["--method", "nf4"], "unknown method 'nf4'"),
        (["--calib", str(calib)], "--out DIR is required"),
        (["--bits", "5", "--out", str(tmp_path / "x")], "unsupported bits=5"),
        (["--group-size", "100", "--out", str(tmp_path / "x")], "unsupported group_size=100"),
        (["--group-size", "many", "--out", str(tmp_path / "x")], "expected a number or auto"),
        # K = 64 and 128 here: 128 leaves a partial group in the 64-input layers
        (["--group-size", "128", "--out", str(tmp_path / "x")], "--group-size 64 (or auto)"),
        (["--calib", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "x")], "is empty"),
        (["--method", "awq", "--lm-head", "--out", str(tmp_path / "x")], "awq cannot quantize the LM head"),
        (["--lm-head-bits", "5", "--out", str(tmp_path / "x")], "unsupported bits=5"),
    ]
    for args, message in cases:
        out = run(str(model), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr
    q = tmp_path / "q"
    assert run(str(model), "--method", "rtn", "--out", str(q)).returncode == 0
    out = run(str(q), "--method", "rtn", "--out", str(tmp_path / "qq"))
    assert out.returncode == 2 and "already quantized" in out.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "qq").exists()


def test_the_method_help_names_every_registered_method() -> None:
    assert sorted(QUANT_METHODS_HELP.rstrip(".").split(" | ")) == sorted(REGISTRY)


def test_group_size_auto_divides_every_layer_and_partial_groups_need_asking(
        tmp_path: Path, model_and_calib: tuple[Path, Path]) -> None:
    """The default (auto) picks the largest of 128/64/32 dividing every K (here 64: K = 64, 128),
    which GPTQModel, AutoAWQ and vLLM load; 128 leaves partial groups and needs the flag."""
    model, _ = model_and_calib
    out = run(str(model), "--method", "rtn", "--out", str(tmp_path / "auto"))
    assert out.returncode == 0, out.stderr
    assert "--group-size auto: 64" in out.stdout
    config = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == 64
    out = run(str(model), "--method", "rtn", "--group-size", "128", "--allow-partial-groups",
              "--out", str(tmp_path / "partial"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "partial" / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == 128
