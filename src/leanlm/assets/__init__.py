"""The model directories shipped inside the package (Hugging Face format).

``DEFAULT_MODEL`` is what every command uses when no model is named; ``DRAFT_MODEL`` is a much
smaller model with the same tokenizer, for speculative decoding. Both are produced by leanlm's
own trainer (see each directory's README.md model card for the recipe and the exact command).
"""

from __future__ import annotations

from pathlib import Path

from leanlm.errors import LeanLMError

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"
DRAFT_MODEL = Path(__file__).resolve().parent / "draft"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise LeanLMError(f"no model given and no embedded default model at {DEFAULT_MODEL}: "
                          "pass a Hugging Face model directory")
    return DEFAULT_MODEL
