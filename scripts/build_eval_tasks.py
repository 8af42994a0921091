"""Build the shipped next-line tasks (src/leanlm/assets/tasks/) from a corpus's held-out split.

    .venv/bin/python scripts/build_eval_tasks.py CORPUS_DIR   # the default model's corpus
"""

from __future__ import annotations

import json
import sys

from leanlm.data.text import read_texts
from leanlm.eval.tasks import TASKS_DIR, build_next_line_task
from leanlm.fsutil import atomic_write


def main() -> None:
    corpus = sys.argv[1]
    TASKS_DIR.mkdir(parents=True, exist_ok=True)
    for domain in ("code", "docs", "literature"):
        rows = build_next_line_task(read_texts(corpus, "val", "corpus", [domain]), 200, seed=0)
        path = TASKS_DIR / f"next_line_{domain}.jsonl"
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{path}: {len(rows)} questions")


if __name__ == "__main__":
    main()
