"""`leanlm eval` end to end on a tiny model: JSON output, agreement with itself, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import tiny_eval_files

from leanlm.kernels import cpu_vnni


def leanlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanlm.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_eval_files(tmp_path_factory.mktemp("eval"))


def test_json_output_and_self_agreement(setup: tuple[Path, Path, Path]) -> None:
    model, text, task = setup
    out = leanlm("eval", str(model), "--ppl", str(text), "--seq-len", "32", "--tasks", str(task),
                 "--reference", str(model), "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["perplexity"]["ppl"] > 1 and r["perplexity"]["tokens"] == r["perplexity"]["windows"] * 31
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["tasks"]["task"]["n"] == 5 and r["tasks"]["task"]["flips"] == 0.0
    table = leanlm("eval", str(model), "--tasks", str(task))
    assert table.returncode == 0 and "acc_norm" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--tasks", "/nonexistent.jsonl"), "not a shipped task"),
    (("--ppl", "SHORT", "--seq-len", "4096"), "fewer than one window"),
    ((), "nothing to evaluate"),
    (("--ppl", "/nonexistent.txt"), "no such file"),
])
def test_bad_input_is_one_line(setup: tuple[Path, Path, Path], args: tuple, message: str) -> None:
    model, text, _ = setup
    args = tuple(str(text) if a == "SHORT" else a for a in args)
    out = leanlm("eval", str(model), *args)
    assert out.returncode == 2 and out.stderr.startswith("error:") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_quantized_model_says_what_its_layers_computed_in(setup: tuple[Path, Path, Path],
                                                            tmp_path: Path) -> None:
    """An fp32 model's quantized layers compute in fp32 unless --bf16-kernels; the output says so,
    and the two give different figures (the bf16 kernels round)."""
    model, text, _ = setup
    q = tmp_path / "q"
    assert leanlm("quantize", str(model), "--method", "rtn", "--out", str(q)).returncode == 0
    runs = {}
    for flags in ((), ("--bf16-kernels",), ("--int8-activations",)):
        out = leanlm("eval", str(q), "--ppl", str(text), "--seq-len", "32", "--json", *flags)
        assert out.returncode == 0, out.stderr
        runs[flags] = json.loads(out.stdout)
    assert runs[()]["quantized_compute"] == "fp32 (dequantized)"
    assert runs[("--bf16-kernels",)]["quantized_compute"] == "bf16 (packed CPU kernels)"
    assert runs[()]["perplexity"]["ppl"] != runs[("--bf16-kernels",)]["perplexity"]["ppl"]
    a8 = runs[("--int8-activations",)]
    if cpu_vnni.available():  # the activations rounded to int8: other figures again
        assert a8["quantized_compute"] == "int8 activations (VNNI) where a layer can, else bf16"
        assert a8["perplexity"]["ppl"] != runs[("--bf16-kernels",)]["perplexity"]["ppl"]
    else:
        assert a8["quantized_compute"] == "bf16 (packed CPU kernels)"
    plain = json.loads(leanlm("eval", str(model), "--ppl", str(text), "--seq-len", "32", "--json").stdout)
    assert "quantized_compute" not in plain
