"""A tiny model with a tokenizer, a text to score and a 5-question task, for the CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_hf_model, write_tokenizer


def tiny_eval_files(root: Path, task_name: str = "task") -> tuple[Path, Path, Path]:
    """(model dir, text file, task JSONL ``task_name``.jsonl) under ``root``."""
    model = root / "m"
    build_hf_model("llama").save_pretrained(model)
    write_tokenizer(model)
    text = root / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    task = root / f"{task_name}.jsonl"
    rows = [{"question": f"def f{i}(", "choices": ["x):", "!!"], "answer": 0} for i in range(5)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, text, task
