"""The lm-evaluation-harness adapter: a local YAML task end to end, equal to leanlm's own scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import build_hf_model, write_tokenizer  # noqa: E402
from leanlm.checkpoint import load_model  # noqa: E402
from leanlm.eval.tasks import load_task, score_task  # noqa: E402
from leanlm.tokenizer import load_tokenizer  # noqa: E402

MC = """task: leanlm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING = """task: leanlm_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: text
doc_to_target: text
metric_list:
  - metric: word_perplexity
"""


def test_local_tasks_end_to_end(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    import leanlm.eval.harness  # noqa: F401  (registers the "leanlm" model type)

    model = tmp_path / "m"
    build_hf_model("llama").save_pretrained(model)
    write_tokenizer(model)
    mc = tmp_path / "mc.jsonl"
    rows = [{"question": f"def f{i}(x):", "choices": ["return x", "pass", "!!"], "answer": i % 3}
            for i in range(9)]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = tmp_path / "docs.jsonl"
    texts = [{"text": f"def g{i}(y):\n    return y * {i}\n"} for i in range(4)]
    docs.write_text("".join(json.dumps(t) + "\n" for t in texts))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC.format(data=mc))
    (tasks / "ppl.yaml").write_text(ROLLING.format(data=docs))
    out = lm_eval.simple_evaluate(model="leanlm", model_args=f"pretrained={model},dtype=float32",
                                  tasks=["leanlm_local_mc", "leanlm_local_ppl"],
                                  task_manager=TaskManager(include_path=str(tasks)))
    got = out["results"]["leanlm_local_mc"]
    ours = score_task(load_model(model, dtype="float32"), load_tokenizer(model), load_task(mc))
    assert got["acc,none"] == pytest.approx(ours.acc) and got["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert out["results"]["leanlm_local_ppl"]["word_perplexity,none"] > 1
