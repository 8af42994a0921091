"""``leanlm merge``: fold an adapter into its base model from the command line.

(``leanlm finetune`` trains adapters with the trainer, so it is defined in ``train/cli.py``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leanlm.cliutil import resolve_model


def merge(
    adapter: Annotated[Path, typer.Argument(help="The adapter directory (peft format).")],
    model: Annotated[Path | None, typer.Option(help="Base model directory (default: embedded).")] = None,
    out: Annotated[Path, typer.Option(help="Output model directory.")] = Path("merged"),
) -> None:
    """Fold a LoRA / DoRA / IA3 adapter into its base model and save a plain checkpoint."""
    from leanlm.checkpoint import load_model, save_model
    from leanlm.peft import load_adapter, merge_, remove_peft_
    from leanlm.tokenizer import load_tokenizer

    path = resolve_model(model)
    lm = load_model(path, dtype="float32")
    load_adapter(lm, adapter)
    merge_(lm)
    remove_peft_(lm)
    save_model(lm, out, tokenizer=load_tokenizer(path))
    Console().print(f"merged model written to {out}")
