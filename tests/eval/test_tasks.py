"""Zero-shot multiple choice: acc/acc_norm against hand-computed values, lm-eval's pair
encoding, the shipped tasks, bad task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import random_model
from leanlm.errors import LeanLMError
from leanlm.eval.tasks import encode_pair, load_task, loglikelihoods, score_task, shipped_tasks


class CharTokenizer:
    """One token per character (ids 3..): continuation token counts are easy to reason about."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + (ord(c) % 250) for c in text]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_acc_and_acc_norm_match_hand_computation(tmp_path: Path) -> None:
    model, tok = random_model("llama"), CharTokenizer()
    rows = [{"question": "ab", "choices": ["c", "dd", "eee"], "answer": 2},
            {"question": "x y", "choices": ["z", "zz"], "answer": 0},
            {"context": "hello", "choices": ["!", "?!", "..."], "answer": 1}]
    task = load_task(write(tmp_path / "t.jsonl", rows))
    got = score_task(model, tok, task, batch_size=2)
    # by hand: each continuation's log-likelihood from a plain forward of context + continuation
    acc = acc_norm = 0
    for r in rows:
        q = r.get("question", r.get("context"))
        lls, lens = [], []
        for c in r["choices"]:
            ids = torch.tensor(tok.encode(q + " " + c))
            k = len(" " + c)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None, :-1])[0].float(), -1)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - k, len(ids))))
            lens.append(len(c))  # lm-eval normalises by the choice's characters
        acc += max(range(len(lls)), key=lambda i: lls[i]) == r["answer"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == r["answer"]
    assert got.n == 3 and got.acc == pytest.approx(acc / 3) and got.acc_norm == pytest.approx(acc_norm / 3)


def test_pair_encoding_moves_trailing_spaces() -> None:
    tok = CharTokenizer()
    ctx, cont = encode_pair(tok, "a b ", "c")
    assert (len(ctx), len(cont)) == (3, 2)  # "a b" | " c"


def test_padding_does_not_change_loglikelihoods() -> None:
    model = random_model("llama")
    pairs = [([5, 6, 7], [8, 9]), ([5], [6]), ([10, 11, 12, 13, 14], [15, 16, 17])]
    alone = [loglikelihoods(model, [p], 128)[0] for p in pairs]
    batched = loglikelihoods(model, pairs, 128, batch_size=3)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-4)
    assert [g for _, g in batched] == [g for _, g in alone]
    # greedy: the continuation is the argmax at each of its positions
    ctx = [5, 6, 7]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    assert loglikelihoods(model, [(ctx, [best])], 128)[0][1]
    assert not loglikelihoods(model, [(ctx, [(best + 1) % 300])], 128)[0][1]


def test_shipped_tasks_load() -> None:
    names = set(shipped_tasks())
    assert {"next_line_code", "next_line_docs", "next_line_literature"} <= names
    task = load_task("next_line_code")
    assert len(task.questions) == 200 and all(len(q.choices) == 4 for q in task.questions)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"question": "q", "choices": [], "answer": 0}], "non-empty list"),
    ([{"question": "q", "choices": ["a"], "answer": 3}], "index into the 1 choices"),
    ([{"choices": ["a"], "answer": 0}], '"question"'),
    ([], "no questions"),
])
def test_bad_task_files(tmp_path: Path, rows: list[dict], message: str) -> None:
    with pytest.raises(LeanLMError, match=message):
        load_task(write(tmp_path / "bad.jsonl", rows))


def test_missing_task() -> None:
    with pytest.raises(LeanLMError, match="not a shipped task"):
        load_task("/nonexistent/task.jsonl")
