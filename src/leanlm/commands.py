"""``leanlm generate`` and ``leanlm info``: the commands over the core (a model, its tokenizer,
reference generation), defined here and mounted by ``leanlm/cli.py`` like every package's commands.

Each command is one typed function; its docstring is its --help.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leanlm.cliutil import INT8_ACTIVATIONS_HELP, ModelArg, resolve_model, weights_bytes
from leanlm.errors import LeanLMError


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
    pack: Annotated[bool, typer.Option(
        "--pack/--no-pack", help="Repack the weights at load for the CPU kernels, keeping that one copy "
        "(--no-pack: plain weights, plain F.linear).")] = True,
    mmap: Annotated[bool, typer.Option(
        help="Keep the weights in the file mapping: no load time, pages shared with other processes; "
        "slower CPU decode (implies --no-pack).")] = False,
    int8_activations: Annotated[bool, typer.Option(help=INT8_ACTIVATIONS_HELP)] = False,
) -> None:
    """Generate a completion of --prompt with MODEL and print it (streamed token by token)."""
    from leanlm import kernels
    from leanlm.allocator import keep_freed_memory
    from leanlm.checkpoint import load_model
    from leanlm.generate import generate_text
    from leanlm.sampling import SamplingParams
    from leanlm.tokenizer import load_tokenizer

    path = resolve_model(model)
    cfg = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                         seed=seed, stop=list(stop or []))
    keep_freed_memory()  # CPU decode steps reuse freed memory instead of page-faulting on it
    pack = pack and not mmap and adapter is None  # an adapter may merge into plain weights
    lm = load_model(path, dtype=dtype, mmap=mmap, pack=pack)
    if adapter is not None:
        from leanlm.peft import load_adapter

        load_adapter(lm, adapter)
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": prompt}] if chat else None

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    with (kernels.prepacking(pack or adapter is not None),  # --no-pack/--mmap: no packed copy either
          kernels.quantizing_activations(int8_activations or kernels.int8_activations())):
        text = generate_text(lm, tok, messages or prompt, cfg, stream=write if stream else None)
    if not stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")


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
                     f"{weights_bytes(path) / 2**20:,.1f} MiB"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
