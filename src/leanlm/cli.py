"""``leanlm <command>``: mounts the commands each package defines in its own ``cli.py``.

Nothing is defined here but the application and :func:`main`: ``generate`` and ``info`` come
from :mod:`leanlm.commands` (the core), ``corpus build`` and ``data ...`` from ``data/cli.py``,
``tokenizer train``, ``pretrain``, ``finetune`` and ``data doremi`` from ``train/cli.py``,
``merge`` from ``peft/cli.py``, ``eval``, ``compare`` and ``quantize`` from ``eval/cli.py``,
``serve`` and ``bench serve`` from ``serve/cli.py``. Each command is one typed function; its
docstring is its --help. ``python -m leanlm.cli`` runs it (torchrun uses that).

Bad input raises :class:`~leanlm.errors.LeanLMError` anywhere below; :func:`main` prints its
message as one ``error: ...`` line on stderr and exits with status 2 (no traceback).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from leanlm.commands import generate, info
from leanlm.data.cli import corpus_app, data_app
from leanlm.errors import LeanLMError
from leanlm.eval.cli import compare, eval_, lm_eval_cmd, quantize
from leanlm.peft.cli import merge
from leanlm.serve.cli import bench_serve, serve
from leanlm.train.cli import doremi_cmd, finetune, pretrain, tokenizer_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="leanlm: train, fine-tune, compress and serve LLMs cheaply.")
err = Console(stderr=True)

app.command()(generate)
app.command()(info)
app.command("finetune")(finetune)
app.command("merge")(merge)
app.command("serve")(serve)
app.command("eval")(eval_)
app.command("compare")(compare)
app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})(lm_eval_cmd)
app.command()(pretrain)
app.command()(quantize)
data_app.command("doremi")(doremi_cmd)
app.add_typer(corpus_app, name="corpus")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that leanlm users run on their own setup.")
bench_app.command("serve")(bench_serve)
app.add_typer(bench_app, name="bench")


def main() -> None:
    try:
        app()
    except LeanLMError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
