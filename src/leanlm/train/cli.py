"""``leanlm tokenizer train``, ``leanlm pretrain``, ``leanlm finetune`` and ``leanlm data doremi``:
the commands that run the trainer.

``doremi_cmd`` trains DoReMi's reference and proxy models, so it is defined here and mounted by
``leanlm/cli.py`` under the ``data`` group it belongs to for users (the data package itself does
not import the trainer). Each command is one typed function; its docstring is its --help.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leanlm.cliutil import resolve_model
from leanlm.errors import LeanLMError

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
# every name in leanlm.peft.REGISTRY (a test keeps them in step), most used first
ADAPTER_METHODS_HELP = "One of lora, dora, adapter, pfeiffer, parallel-adapter, ia3, compacter."


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[Path, typer.Argument(help="Corpus directory (leanlm corpus build).")],
    out: Annotated[Path, typer.Argument(help="Output tokenizer directory.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size incl. special tokens.")] = 8192,
    max_mb_per_domain: Annotated[float, typer.Option(help="Text sampled per domain (MB).")] = 8.0,
) -> None:
    """Train a byte-level BPE tokenizer (HF tokenizer.json + ChatML template) on a corpus."""
    from leanlm.data.corpus import load_manifest
    from leanlm.train.bpe import train_tokenizer

    load_manifest(data)
    train_tokenizer(data, out, vocab_size, max_bytes_per_domain=int(max_mb_per_domain * 1e6))
    Console().print(f"tokenizer with {vocab_size} tokens written to {out}")


def pretrain(
    recipe: Annotated[str, typer.Option(help="Recipe: tiny, default, draft, llama-3.2-1b.")] = "tiny",
    data: Annotated[Path | None, typer.Option(help="Corpus directory (leanlm corpus build).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="Tokenizer directory (default: the shipped default model's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (checkpoints, logs, model/).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    stop_after: Annotated[int | None, typer.Option(
        help="Stop (with a checkpoint) after this many steps of this invocation.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe setting: key=value, model.key=value (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or log lines.")] = False,
) -> None:
    """Pretrain a model with a recipe; resumes from OUT/checkpoints; runs under torchrun too.

    Writes OUT/metrics.jsonl, distributed checkpoints, and the final model as a Hugging Face
    checkpoint in OUT/model.
    """
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides
    from leanlm.train.elastic import EXIT_PREEMPTED, Preempted
    from leanlm.train.trainer import Trainer

    overrides = list(set_ or [])
    overrides += [f"{k}={v}" for k, v in (("data", data), ("tokenizer", tokenizer), ("out", out),
                                          ("max_steps", max_steps)) if v is not None]
    cfg = apply_overrides(get_recipe(recipe), overrides)
    trainer = Trainer(cfg, quiet=quiet)
    try:
        result = trainer.run(stop_after=stop_after)
    except Preempted as e:
        if trainer.d.rank == 0:
            Console(stderr=True).print(str(e), highlight=False)
        trainer.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)  # as a process killed by SIGTERM, after the checkpoint
    finally:
        trainer.close()
    if result.get("model") is not None and not quiet:
        Console().print(f"model written to {result['model']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip the interpreter's teardown once every file is written and the
        # process group is destroyed: a background thread of the collective backend can abort
        # it ("terminate called without an active exception", seen in ~3% of CI runs), and
        # torchrun then kills the other rank while it finishes its own work.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def finetune(
    model: Annotated[Path | None, typer.Argument(help="Base model directory (default: the embedded "
                                                      "model); a GPTQ/AWQ checkpoint gives QLoRA.")] = None,
    data: Annotated[Path, typer.Option(help="JSONL: prompt/completion or chat messages.")] = Path("d.jsonl"),
    out: Annotated[Path, typer.Option(help="Run directory: adapter/, best/, checkpoints.")] = Path("runs/ft"),
    method: Annotated[str, typer.Option(help=ADAPTER_METHODS_HELP)] = "lora",
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


def doremi_cmd(corpus: Annotated[Path, typer.Argument(help="Corpus folder (leanlm corpus build).")],
               out: Annotated[Path, typer.Argument(help="Output: reference/, proxy/, weights.json.")],
               recipe: Annotated[str, typer.Option(help="Recipe of reference and proxy.")] = "tiny",
               steps: Annotated[int, typer.Option(help="Training steps of each model.")] = 200,
               tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory.")] = None,
               eta: Annotated[float, typer.Option(help="Step size of the weight update.")] = 1.0,
               smoothing: Annotated[float, typer.Option(help="Mixed-in uniform weight c.")] = 1e-3,
               rounds: Annotated[int, typer.Option(
                   help="Iterated DoReMi: rounds, each reference trained on the last round's weights.")] = 1,
               set_: Annotated[list[str] | None, typer.Option(
                   "--set", help="Recipe override key=value (as for `leanlm pretrain`).")] = None,
               quiet: Annotated[bool, typer.Option(help="No progress bars or logs.")] = False) -> None:
    """DoReMi: domain weights from a Group DRO proxy model (train with --set domain_weights=...)."""
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides
    from leanlm.train.doremi import DoReMiConfig, doremi

    overrides = [f"max_steps={steps}", *(set_ or [])]
    if tokenizer is not None:
        overrides.append(f"tokenizer={tokenizer}")
    base = apply_overrides(get_recipe(recipe), overrides)
    result = doremi(corpus, out, base, DoReMiConfig(eta=eta, smoothing=smoothing, rounds=rounds), quiet)
    table = Table(title=f"DoReMi domain weights ({result['steps']} proxy steps): {out / 'weights.json'}")
    table.add_column("domain")
    table.add_column("reference")
    table.add_column("DoReMi")
    for dom, w in result["domain_weights"].items():
        table.add_row(dom, f"{result['reference_weights'][dom]:.3f}", f"{w:.3f}")
    Console().print(table)
