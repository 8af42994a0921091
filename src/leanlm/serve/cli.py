"""``leanlm serve``: the OpenAI-compatible server on the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leanlm.cliutil import ModelArg, resolve_model
from leanlm.errors import LeanLMError


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="The `model` clients send.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LEANLM_API_KEY",
                                                help="Require `Authorization: Bearer KEY`.")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most requests in one batch.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one step.")] = 2048,
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block.")] = 16,
    kv_cache_memory: Annotated[int, typer.Option(help="MiB of K/V cache.")] = 256,
    enable_prefix_caching: Annotated[bool, typer.Option(help="Share the K/V of common prefixes.")] = True,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16.")] = None,
    lora: Annotated[list[str] | None, typer.Option(
        help="NAME=ADAPTER_DIR: a peft adapter clients select with model=NAME (repeatable).")] = None,
    kv_cache_dtype: Annotated[str, typer.Option(help="auto (the model's) or int8 (1.9x tokens).")] = "auto",
    policy: Annotated[str, typer.Option(help="fcfs, priority, or vtc (fair across `user`s).")] = "fcfs",
    speculative: Annotated[str | None, typer.Option(
        help="Speculative decoding: ngram (prompt-lookup drafts) or draft (a draft model's).")] = None,
    draft_model: Annotated[Path | None, typer.Option(
        help="With --speculative draft: a smaller model with the same tokenizer "
             "(default: the draft model shipped with leanlm).")] = None,
    num_spec_tokens: Annotated[int, typer.Option(help="Most drafts per step (with --speculative).")] = 4,
    spec_disable_batch_size: Annotated[int, typer.Option(
        help="Stop speculating while more requests than this run (0: never).")] = 0,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API (continuous batching, paged KV cache)."""
    import uvicorn

    from leanlm.checkpoint import load_model
    from leanlm.serve.api.server import create_app
    from leanlm.serve.async_engine import AsyncLLMEngine
    from leanlm.serve.engine import EngineConfig, LLMEngine
    from leanlm.serve.scheduler import SchedulerConfig
    from leanlm.tokenizer import load_tokenizer

    path = resolve_model(model)
    lm = load_model(path, dtype=dtype)
    draft = None
    if speculative == "draft":
        from leanlm.assets import DRAFT_MODEL

        draft_path = draft_model or DRAFT_MODEL
        ours, theirs = path / "tokenizer.json", draft_path / "tokenizer.json"
        if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
            raise LeanLMError(f"--draft-model {draft_path}: its tokenizer.json differs from {path}'s; "
                              f"speculative decoding needs the same tokenizer")
        draft = load_model(draft_path, dtype=dtype)
    elif draft_model is not None:
        raise LeanLMError("--draft-model needs --speculative draft")
    config = EngineConfig(block_size=block_size, kv_cache_memory=kv_cache_memory * 2**20,
                          enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype,
                          speculative=speculative, num_spec_tokens=num_spec_tokens,
                          spec_disable_batch_size=spec_disable_batch_size,
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, policy=policy,
                                                    max_num_batched_tokens=max_num_batched_tokens))
    core = LLMEngine(lm, config, draft)
    for item in lora or []:
        lname, sep, adapter = item.partition("=")
        if not sep:
            raise LeanLMError(f"--lora {item!r}: expected NAME=ADAPTER_DIR")
        core.add_lora(lname, adapter)
    engine = AsyncLLMEngine(core, load_tokenizer(path))
    name = served_model_name or ("leanlm-default" if model is None else path.name)
    Console(stderr=True).print(f"serving {path} as {name!r} on http://{host}:{port}/v1")
    uvicorn.run(create_app(engine, name, api_key), host=host, port=port, log_level="warning")
