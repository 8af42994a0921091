"""Instruction fine-tuning: data reading, packing with completion-only loss, the fine-tuner, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model, write_tokenizer
from leanlm import load_model, load_tokenizer, save_model
from leanlm.errors import LeanLMError
from leanlm.peft import REGISTRY, LoRAConfig, load_adapter
from leanlm.train import get_recipe
from leanlm.train.cli import ADAPTER_METHODS_HELP
from leanlm.train.config import apply_overrides
from leanlm.train.finetune import IGNORE, FineTuner, pack, read_examples


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    save_model(random_model("llama"), tmp_path / "base", tokenizer=tok)
    return tmp_path / "base"


def toy_data(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n):
        a = int(rng.integers(0, 9))
        lines.append(json.dumps({"prompt": f"echo {a}", "completion": f" {a} {a} {a}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_examples_formats_and_errors(base: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(base)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}) + "\n")
    (p1, c1), (_, c2) = read_examples(f, tok)
    assert c1 == c2 and c1[-1] == tok.eos_token_id and p1[0] == tok.eos_token_id
    f.write_text(json.dumps({"prompt": "hi", "completion": "x"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(LeanLMError, match=r"d.jsonl:2: expected string fields 'prompt' and 'completion'"):
        read_examples(f, tok)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(LeanLMError, match=r"d.jsonl:1: the last message must be the assistant's"):
        read_examples(f, tok)


def test_packing_masks_prompts_and_restarts_positions() -> None:
    examples = [([0, 5, 6], [7, 8, 0]), ([0, 9], [10, 0]), ([0, 11, 12, 13], [14, 0])]
    rows = pack(examples, np.arange(3), seq_len=12, eos_id=0)
    assert len(rows) == 2  # 6 + 4 tokens fit a row of 13; the third starts a new row
    b = rows[0]
    assert b.inputs[0, :10].tolist() == [0, 5, 6, 7, 8, 0, 0, 9, 10, 0]
    # targets: completion tokens only (each predicted from the token before it)
    assert b.targets[0, :10].tolist() == [IGNORE, IGNORE, 7, 8, 0, IGNORE, IGNORE, 10, 0, IGNORE]
    assert b.positions[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert b.documents[0, :10].tolist() == [0] * 6 + [1] * 4


def test_finetuner_lowers_the_completion_loss_and_saves_a_peft_adapter(base: Path, tmp_path: Path) -> None:
    cfg = apply_overrides(get_recipe("tiny"), ["max_steps=40", "seq_len=64", "micro_batch=4", "lr=1e-2",
                                               "eval_every=20", "warmup_steps=2", "precision=fp32",
                                               f"out={tmp_path / 'run'}", "progress=false"])
    t = FineTuner(cfg, base, LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]),
                  toy_data(tmp_path / "d.jsonl"), quiet=True)
    start = t.evaluate()["completion_loss"]
    try:
        result = t.run()
    finally:
        t.close()
    assert result["eval"]["completion_loss"] < start - 0.5
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        want = t.model.eval()(tokens)
        fresh = load_model(base, dtype="float32")
        load_adapter(fresh, tmp_path / "run" / "adapter")
        torch.testing.assert_close(fresh(tokens), want)
    assert (tmp_path / "run" / "best" / "adapter_config.json").is_file()


def test_gradient_checkpointing_with_adapters(base: Path, tmp_path: Path) -> None:
    def losses(*extra: str) -> list[float]:
        cfg = apply_overrides(get_recipe("tiny"), [
            "max_steps=3", "seq_len=64", "micro_batch=2", "eval_every=0", "precision=fp32",
            f"out={tmp_path / str(len(extra))}", "progress=false", *extra])
        torch.manual_seed(0)
        t = FineTuner(cfg, base, LoRAConfig(r=4), toy_data(tmp_path / "d.jsonl", 40), quiet=True)
        try:
            return t.run()["losses"]
        finally:
            t.close()

    assert losses("ac=full") == pytest.approx(losses(), rel=1e-5)  # recomputation changes nothing


def test_cli_finetune_qlora_merge_and_generate(base: Path, tmp_path: Path) -> None:
    data = toy_data(tmp_path / "d.jsonl", 60)
    run = lambda *a: subprocess.run([sys.executable, "-m", "leanlm.cli", *a], capture_output=True, text=True)
    r = run("finetune", str(base), "--data", str(data), "--out", str(tmp_path / "ft"), "--steps", "6",
            "--set", "seq_len=64", "--set", "micro_batch=2", "--set", "eval_every=3", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("merge", str(tmp_path / "ft" / "adapter"), "--model", str(base), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    g1 = run("generate", str(base), "--adapter", str(tmp_path / "ft" / "adapter"), "-p", "echo 3",
             "--max-new-tokens", "5", "--dtype", "float32")
    g2 = run("generate", str(tmp_path / "m"), "-p", "echo 3", "--max-new-tokens", "5", "--dtype", "float32")
    assert g1.returncode == 0 and g1.stdout == g2.stdout  # merged model == base + adapter
    r = run("finetune", str(base), "--data", str(data), "--out", str(tmp_path / "q"), "--steps", "3",
            "--quantize", "int4", "--set", "seq_len=64", "--set", "micro_batch=2", "--quiet")
    assert r.returncode == 0, r.stderr  # QLoRA
    r = run("finetune", str(base), "--data", str(data), "--method", "lora", "--target", "nope", "--quiet")
    assert r.returncode == 2 and "target 'nope' matches no module" in r.stderr


def test_the_method_help_names_every_registered_method() -> None:
    assert sorted(ADAPTER_METHODS_HELP.removeprefix("One of ").rstrip(".").split(", ")) == sorted(REGISTRY)
