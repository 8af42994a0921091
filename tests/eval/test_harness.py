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


GEN = """task: leanlm_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_per_item_scores_equal_lm_evals_hf_model(tmp_path: Path) -> None:
    """The same checkpoint (its tokenizer adds BOS) through lm-eval's ``hf`` model and through
    ``leanlm``, constructed as lm-eval constructs models (device, batch size): per-item
    loglikelihoods to 1e-4 (contexts ending in newlines and spaces, whose whitespace moves to the
    continuation), rolling loglikelihoods, and identical greedy generations."""
    import lm_eval.models  # registers lm-eval's own model types, "hf" among them
    from lm_eval.tasks import TaskManager

    import leanlm.eval.harness  # noqa: F401  (registers the "leanlm" model type)

    model = tmp_path / "m"
    build_hf_model("llama").save_pretrained(model)
    write_tokenizer(model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert load_tokenizer(model).encode("def")[0] == load_tokenizer(model).bos_token_id
    mc, docs, gen = tmp_path / "mc.jsonl", tmp_path / "docs.jsonl", tmp_path / "gen.jsonl"
    ends = ["\n", "  ", ":\n\t", ""]
    mc.write_text("".join(json.dumps({"question": f"def f{i}(x){ends[i % 4]}", "choices": [
        "return x", "pass", " !!"], "answer": i % 3}) + "\n" for i in range(8)))
    docs.write_text("".join(json.dumps({"text": f"def g{i}(y):\n    return y * {i}\n"}) + "\n"
                            for i in range(3)))
    gen.write_text("".join(json.dumps({"question": f"def h{i}(", "answer": "x)"}) + "\n" for i in range(3)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC.format(data=mc))
    (tasks / "ppl.yaml").write_text(ROLLING.format(data=docs))
    (tasks / "gen.yaml").write_text(GEN.format(data=gen))
    names = ["leanlm_local_mc", "leanlm_local_ppl", "leanlm_local_gen"]
    runs = {kind: lm_eval.simple_evaluate(model=kind, model_args=f"pretrained={model},dtype=float32",
                                          tasks=names, batch_size=1, device="cpu", log_samples=True,
                                          task_manager=TaskManager(include_path=str(tasks)))
            for kind in ("hf", "leanlm")}
    for name in names:
        theirs, ours = runs["hf"]["samples"][name], runs["leanlm"]["samples"][name]
        assert len(theirs) == len(ours) > 0
        for a, b in zip(theirs, ours, strict=True):
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if name == "leanlm_local_gen":
                    assert ra == rb
                    continue
                va, vb = (ra[0][0], rb[0][0]) if isinstance(ra[0], (tuple, list)) else (ra[0], rb[0])
                assert vb == pytest.approx(va, abs=1e-4), (name, a["doc"], ra, rb)


def test_lm_evals_command_line_runs_through_leanlm(tmp_path: Path) -> None:
    """``leanlm lm-eval`` is lm-eval's own command line with the model type registered."""
    import subprocess
    import sys

    model = tmp_path / "m"
    build_hf_model("llama").save_pretrained(model)
    write_tokenizer(model)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def g{i}(y):\n    return y\n"}) + "\n" for i in range(2)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ppl.yaml").write_text(ROLLING.format(data=docs))
    out = subprocess.run([sys.executable, "-m", "leanlm.cli", "lm-eval", "--model", "leanlm", "--model_args",
                          f"pretrained={model}", "--tasks", "leanlm_local_ppl", "--include_path", str(tasks),
                          "--device", "cpu", "--batch_size", "auto"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "leanlm_local_ppl" in out.stdout and "word_perplexity" in out.stdout
