"""One model's evaluation as a JSON-able dict: what ``leanlm eval`` prints and what each cell of
``leanlm compare`` records — perplexity (``perplexity.py``), zero-shot tasks (``tasks.py``), and,
against a reference model, KL divergence and answer flips (``agreement.py``)."""

from __future__ import annotations

from typing import Any

from leanlm.eval.agreement import flip_rate
from leanlm.eval.perplexity import text_perplexity, text_stream
from leanlm.eval.tasks import load_task, score_task


def evaluate(model: Any, tokenizer: Any, ppl_texts: list[str] | None = None, tasks: list[str] = (),
             seq_len: int = 512, stride: int | None = None, max_windows: int = 0,
             reference: Any = None, batch_size: int = 8, keep_predictions: bool = False,
             reference_tasks: dict | None = None) -> dict:
    """Everything ``leanlm eval`` measures, as a JSON-able dict (also what ``leanlm compare``
    records per grid cell). ``reference``: a model to measure KL and answer flips against
    (``reference_tasks``: its task results with predictions, if already known);
    ``keep_predictions``: each task's predicted answers too (to compute flips later)."""
    out: dict = {}
    loaded = [load_task(t) for t in tasks]  # a bad task file fails before any slow work
    if ppl_texts is not None:
        ids = text_stream(ppl_texts, tokenizer)
        p = text_perplexity(model, ids, seq_len, stride, batch_size, max_windows, reference)
        out["perplexity"] = {"ppl": p.ppl, "loss": p.loss, "tokens": p.tokens, "windows": p.windows,
                             "seq_len": seq_len, "stride": stride}
        if reference is not None:
            out["kl"] = p.kl
    for task in loaded:
        r = score_task(model, tokenizer, task, batch_size)
        entry = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
        if keep_predictions:
            entry |= {"predictions": r.predictions, "predictions_norm": r.predictions_norm}
        if reference_tasks is not None:
            known = reference_tasks[task.name]
            entry["flips"] = flip_rate(known["predictions"], r.predictions)
            entry["flips_norm"] = flip_rate(known["predictions_norm"], r.predictions_norm)
        elif reference is not None:
            ref = score_task(reference, tokenizer, task, batch_size)
            entry["flips"] = flip_rate(ref.predictions, r.predictions)
            entry["flips_norm"] = flip_rate(ref.predictions_norm, r.predictions_norm)
        out.setdefault("tasks", {})[task.name] = entry
    return out
