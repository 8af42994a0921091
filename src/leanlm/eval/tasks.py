"""Zero-shot multiple choice by log-likelihood, in lm-evaluation-harness's conventions.

A question has a context and choices; each choice is scored as the continuation
``delimiter + choice`` of the context (delimiter " " by default, as lm-eval's
``target_delimiter``), by its summed log-likelihood under the model:

    ll(c) = Σ_{t ∈ continuation} log p(x_t | x_{<t}),   pred = argmax_c ll(c)

``acc`` is the fraction of questions whose prediction is the answer; ``acc_norm`` divides each
ll by the choice's length in characters first (lm-eval's length normalisation, the delimiter not
counted), which removes the bias toward short choices. Tokenization follows lm-eval's
``_encode_pair`` as its ``hf`` model runs it: the context's trailing whitespace moves to the
continuation, the pair is encoded whole with the tokenizer's special tokens (BOS where its config
adds it), and the continuation's tokens are those past the context's own encoding. Contexts
longer than the model's window lose their oldest tokens.

Task files are JSONL, one question per line: ``{"question": str, "choices": [str, ...],
"answer": int}`` ("context" may stand for "question"; an optional "delimiter" overrides " ").
leanlm ships next-line tasks built offline from the default corpus's held-out split, one per
domain (code, docs, literature): the context is a few consecutive lines of a document, the
answer the line that follows, the distractors lines of other documents of the domain.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.fsutil import read_json_lines

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks"


@dataclass
class Question:
    context: str
    choices: list[str]
    answer: int
    delimiter: str = " "


@dataclass
class Task:
    name: str
    questions: list[Question]


@dataclass
class TaskResult:
    name: str
    acc: float
    acc_norm: float
    n: int
    predictions: list[int] = field(default_factory=list)  # argmax ll per question
    predictions_norm: list[int] = field(default_factory=list)


def shipped_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.jsonl"))}


def load_task(name_or_path: str | Path) -> Task:
    """A shipped task by name, or a JSONL task file (bad files raise LeanLMError naming the line)."""
    shipped = shipped_tasks()
    path = shipped.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise LeanLMError(f"task {name_or_path}: no such file, and not a shipped task "
                          f"(shipped: {', '.join(shipped) or 'none'})")
    questions = []
    for n, row in read_json_lines(path, "task file"):
        context = row.get("question", row.get("context")) if isinstance(row, dict) else None
        choices, answer = (row.get("choices"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if not isinstance(context, str):
            raise LeanLMError(f'{path}:{n}: expected a "question" (or "context") string')
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise LeanLMError(f'{path}:{n}: expected "choices", a non-empty list of strings')
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise LeanLMError(f'{path}:{n}: "answer" must be an index into the {len(choices)} choices')
        questions.append(Question(context, choices, answer, row.get("delimiter", " ")))
    if not questions:
        raise LeanLMError(f"task file {path} has no questions")
    return Task(path.stem, questions)


def encode_pair(tokenizer: object, context: str, continuation: str,
                encode: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context tokens, continuation tokens). The context's trailing
    whitespace (all of it) moves to the continuation; the two are encoded together with the
    tokenizer's special tokens (BOS where its config adds it, as lm-eval's ``hf`` model and
    ``leanlm generate`` do; ``encode`` overrides) and split after the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    enc = encode or (lambda s: tokenizer.encode(s))  # type: ignore[attr-defined]
    whole, ctx = enc(context + continuation), enc(context)
    return whole[:len(ctx)], whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_len: int,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), whether greedy decoding yields the continuation) per
    (context, continuation) token pair, batched with right padding (a causal model's logits at
    real positions do not see the padding)."""
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        seqs = [(ctx + cont)[-(max_len + 1):] for ctx, cont in chunk]
        width = max(len(s) for s in seqs) - 1
        rows = torch.zeros(len(seqs), width + 1, dtype=torch.long)
        for r, s in enumerate(seqs):
            rows[r, :len(s)] = torch.tensor(s)
        rows = rows.to(device)
        logp = F.log_softmax(model(rows[:, :-1]).float(), dim=-1)
        for r, (s, (_, cont)) in enumerate(zip(seqs, chunk, strict=True)):
            k = len(cont)  # the continuation's tokens are the last k of the sequence
            targets = rows[r, len(s) - k:len(s)]
            scores = logp[r, len(s) - k - 1:len(s) - 1]
            out.append((float(scores.gather(-1, targets[:, None]).sum()),
                        bool((scores.argmax(-1) == targets).all())))
    return out


def score_task(model: nn.Module, tokenizer: object, task: Task, batch_size: int = 16) -> TaskResult:
    max_len = model.config.max_position_embeddings  # type: ignore[union-attr]
    pairs, lengths = [], []
    for q_index, q in enumerate(task.questions):
        for choice in q.choices:
            continuation = q.delimiter + choice
            ctx, cont = encode_pair(tokenizer, q.context, continuation)
            if not cont:
                raise LeanLMError(f"task {task.name}, question {q_index + 1}: choice {choice!r} is empty")
            if not ctx:  # lm-eval: an empty context is scored after BOS, else end-of-text
                bos = tokenizer.bos_token_id  # type: ignore[attr-defined]
                ctx = [bos if bos is not None else tokenizer.eos_token_id or 0]  # type: ignore[attr-defined]
            pairs.append((ctx, cont))
            lengths.append(max(1, len(choice)))
    lls = [ll for ll, _ in loglikelihoods(model, pairs, max_len, batch_size)]
    preds, preds_norm, at = [], [], 0
    for q in task.questions:
        n = len(q.choices)
        ll, ln = lls[at:at + n], lengths[at:at + n]
        preds.append(max(range(n), key=lambda c: ll[c]))
        preds_norm.append(max(range(n), key=lambda c: ll[c] / ln[c]))
        at += n
    answers = [q.answer for q in task.questions]
    acc = sum(p == a for p, a in zip(preds, answers, strict=True)) / len(answers)
    acc_norm = sum(p == a for p, a in zip(preds_norm, answers, strict=True)) / len(answers)
    return TaskResult(task.name, acc, acc_norm, len(answers), preds, preds_norm)


def build_next_line_task(texts: list[str], n: int, seed: int = 0, context_lines: int = 6,
                         num_choices: int = 4) -> list[dict]:
    """Questions "which line comes next": ``context_lines`` consecutive non-empty lines of a
    document, its next non-empty line as the answer, and lines of other documents (of similar
    length, not equal to the answer) as distractors, in a seeded random order."""
    rng = random.Random(seed)
    docs = [[line for line in t.splitlines() if line.strip()] for t in texts]
    docs = [d for d in docs if len(d) > context_lines]
    pool = [(i, line) for i, d in enumerate(docs) for line in d if 8 <= len(line.strip()) <= 200]
    if len(docs) < 2 or len(pool) < num_choices * 4:
        raise LeanLMError("too little text to build a next-line task")
    out = []
    while len(out) < n:
        i = rng.randrange(len(docs))
        d = docs[i]
        at = rng.randrange(context_lines, len(d))
        answer = d[at]
        if not 8 <= len(answer.strip()) <= 200:
            continue
        distractors: list[str] = []
        for _ in range(1000):
            j, line = rng.choice(pool)
            if j != i and line != answer and line not in distractors and \
                    0.5 <= len(line) / len(answer) <= 2.0:
                distractors.append(line)
                if len(distractors) == num_choices - 1:
                    break
        else:
            continue  # no lines of a similar length: another question
        choices = [answer, *distractors]
        rng.shuffle(choices)
        out.append({"question": "\n".join(d[at - context_lines:at]) + "\n", "choices": choices,
                    "answer": choices.index(answer), "delimiter": ""})
    return out
