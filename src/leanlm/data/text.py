"""Plain texts to calibrate a quantized model on or to measure perplexity with.

:func:`read_texts` takes what a user points the ``quantize``, ``eval`` and ``compare`` commands
at: a ``.jsonl`` file (each line's ``"text"``), a text file (one text), or a corpus directory
built by ``leanlm corpus build`` (a split of every domain, or of some). :func:`default_texts` is
calibration text found offline on any machine: a seeded sample of the Python standard library's
sources (the ``code`` domain of :mod:`leanlm.data.corpus`).

Reading text is the data layer's job; the quantization package only turns texts into token
windows (:func:`leanlm.quant.calibration.calibration_tokens`), so it never imports data.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

from leanlm.data.corpus import default_sources, load_manifest, read_split
from leanlm.errors import LeanLMError
from leanlm.fsutil import read_json_lines


def read_texts(path: str | os.PathLike[str], split: str = "train", what: str = "calibration data",
               domains: Iterable[str] | None = None) -> list[str]:
    """Texts from a .jsonl file (the "text" field), a text file, or a corpus directory (its
    ``split`` of every domain, or of ``domains``); ``what`` names the data in errors."""
    path = Path(path)
    if path.is_dir():
        manifest = load_manifest(path)
        texts = [t for dom in (domains or manifest["domains"]) for t in read_split(path, dom, split)]
    elif not path.is_file():
        raise LeanLMError(f"{what} {path}: no such file or directory")
    elif path.suffix == ".jsonl":
        texts = []
        for n, row in read_json_lines(path, what):
            if not (isinstance(row, dict) and "text" in row):
                raise LeanLMError(f"{path}:{n}: expected a JSON object with a \"text\" field")
            texts.append(row["text"])
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise LeanLMError(f"{path}: not UTF-8 text (expected .jsonl or a text file)") from None
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise LeanLMError(f"{what} {path} is empty (expected text)")
    return texts


def default_texts(max_files: int = 400, seed: int = 0) -> list[str]:
    """Calibration text available offline on any machine: a seeded sample of the stdlib sources."""
    root = default_sources()["code"]
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[:max_files]]
