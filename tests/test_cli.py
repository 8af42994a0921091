"""The `leanlm` command: help, generate (streamed), info, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import build_hf_model, write_tokenizer
from leanlm import cli
from leanlm.checkpoint import load_model
from leanlm.generate import generate_text
from leanlm.sampling import SamplingParams
from leanlm.tokenizer import load_tokenizer


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanlm.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "m"
    build_hf_model("qwen3").save_pretrained(path)
    return write_tokenizer(path)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("generate", "info"):
        assert command in out.stdout
    assert "Generate a completion" in run("generate", "--help").stdout


@pytest.mark.parametrize("weights", [[], ["--no-pack"], ["--mmap"]], ids=["packed", "plain", "mapped"])
def test_generate_prints_the_greedy_completion(model_dir, weights):
    out = run("generate", str(model_dir), "--prompt", "def ", "--max-new-tokens", "12",
              "--temperature", "0", "--seed", "1", *weights)
    assert out.returncode == 0, out.stderr
    expected = generate_text(load_model(model_dir), load_tokenizer(model_dir), "def ",
                             SamplingParams(max_tokens=12, temperature=0.0))
    assert out.stdout == expected + "\n"


def test_generate_streams_token_by_token(model_dir, monkeypatch):
    writes: list[str] = []

    class Recorder:
        def write(self, s: str) -> None:
            writes.append(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(cli.sys, "stdout", Recorder())
    cli.generate(model_dir, prompt="def ", max_new_tokens=16, chat=True, temperature=0.8, seed=3,
                 top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, stop=None, dtype=None, stream=True)
    assert len([w for w in writes if w]) > 2
    assert writes[-1] == "\n"


def test_info(model_dir):
    out = run("info", str(model_dir))
    assert out.returncode == 0
    assert "qwen3" in out.stdout and "parameters" in out.stdout and "bfloat16" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "/nonexistent/model", "--prompt", "x"), "not a directory"),
    (("info", "/nonexistent/model"), "no config.json"),
])
def test_errors_are_one_line(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_prompt_longer_than_context_is_one_line(tmp_path):
    path = tmp_path / "g"
    build_hf_model("gpt2").save_pretrained(path)
    write_tokenizer(path)
    out = run("generate", str(path), "--prompt", "to be or not to be " * 60)
    assert out.returncode == 2
    assert "context is 128" in out.stderr and len(out.stderr.strip().splitlines()) == 1
