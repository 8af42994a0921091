"""``leanlm finetune`` and ``leanlm merge``: adapters from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leanlm.cliutil import resolve_model
from leanlm.errors import LeanLMError

METHODS_HELP = "One of lora, dora, adapter, pfeiffer, parallel-adapter, ia3, compacter."


def finetune(
    model: Annotated[Path | None, typer.Argument(help="Base model directory (default: the embedded "
                                                      "model); a GPTQ/AWQ checkpoint gives QLoRA.")] = None,
    data: Annotated[Path, typer.Option(help="JSONL: prompt/completion or chat messages.")] = Path("d.jsonl"),
    out: Annotated[Path, typer.Option(help="Run directory: adapter/, best/, checkpoints.")] = Path("runs/ft"),
    method: Annotated[str, typer.Option(help=METHODS_HELP)] = "lora",
    val_data: Annotated[Path | None, typer.Option(help="Held-out JSONL (default: 5% of --data).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Module name or suffix to adapt (repeatable; "
                                                          "default: the method's own).")] = None,
    r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling = alpha / r).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    bottleneck: Annotated[int, typer.Option(help="Adapter bottleneck width.")] = 64,
    quantize: Annotated[str | None, typer.Option(help="int4: quantize the base (RTN, g128) first "
                                                      "(QLoRA).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Trainer setting key=value (seq_len, micro_batch, grad_accum, ac …).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or log lines.")] = False,
) -> None:
    """Fine-tune MODEL on instruction data with an adapter; writes OUT/adapter and OUT/best (peft format)."""
    from leanlm.peft import method_config
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides
    from leanlm.train.finetune import FineTuner

    if quantize not in (None, "int4"):
        raise LeanLMError(f"--quantize {quantize!r}: expected int4")
    peft = method_config(method, targets=list(target or []), r=r, alpha=alpha, dropout=dropout,
                         bottleneck=bottleneck)
    defaults = ["seq_len=256", "micro_batch=8", "warmup_steps=10", "eval_every=50", "log_every=10",
                "ckpt_every=100", "schedule=cosine"]
    cfg = apply_overrides(get_recipe("tiny"), [*defaults, f"max_steps={steps}", f"lr={lr}", f"out={out}",
                                               *(set_ or [])])
    trainer = FineTuner(cfg, resolve_model(model), peft, data, val_data, quantize=quantize, quiet=quiet)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if not quiet:
        Console().print(f"adapter written to {out / 'adapter'} (best: {out / 'best'}); "
                        f"held-out completion loss {result['eval'].get('completion_loss', float('nan')):.4f}")


def merge(
    adapter: Annotated[Path, typer.Argument(help="The adapter directory (peft format).")],
    model: Annotated[Path | None, typer.Option(help="Base model directory (default: embedded).")] = None,
    out: Annotated[Path, typer.Option(help="Output model directory.")] = Path("merged"),
) -> None:
    """Fold a LoRA / DoRA / IA3 adapter into its base model and save a plain checkpoint."""
    from leanlm import load_model, load_tokenizer, save_model
    from leanlm.peft import load_adapter, merge_, remove_peft_

    path = resolve_model(model)
    lm = load_model(path, dtype="float32")
    load_adapter(lm, adapter)
    merge_(lm)
    remove_peft_(lm)
    save_model(lm, out, tokenizer=load_tokenizer(path))
    Console().print(f"merged model written to {out}")
