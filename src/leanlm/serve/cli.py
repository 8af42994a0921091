"""``leanlm serve``: the OpenAI-compatible server on the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leanlm.cliutil import INT8_ACTIVATIONS_HELP, ModelArg, resolve_model
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
    kv_cache_dtype: Annotated[str, typer.Option(
        help="auto (the model's), int8 (1.9x tokens) or fp8 (E4M3, 2x tokens).")] = "auto",
    policy: Annotated[str, typer.Option(
        help="vtc (fair across clients: the `user` field, else each request with its n copies), "
             "fcfs, or priority.")] = "vtc",
    speculative: Annotated[str | None, typer.Option(
        help="Speculative decoding: ngram (prompt-lookup drafts) or draft (a draft model's).")] = None,
    draft_model: Annotated[Path | None, typer.Option(
        help="With --speculative draft: a smaller model with the same tokenizer "
             "(default: the draft model shipped with leanlm).")] = None,
    num_spec_tokens: Annotated[int, typer.Option(help="Most drafts per step (with --speculative).")] = 4,
    spec_disable_batch_size: Annotated[int, typer.Option(
        help="Stop speculating while more requests than this run (0: never).")] = 0,
    compile: Annotated[bool, typer.Option(
        help="decode steps as one graph: CUDA graphs on CUDA (batch/length buckets), torch.compile "
             "elsewhere (leanlm's C++ CPU ops inside); compiled before the server takes requests "
             "(about a minute on 2 CPU cores).")] = False,
    threads: Annotated[int, typer.Option(help="torch threads for the model (0: torch's default).")] = 0,
    int8_activations: Annotated[bool, typer.Option(help=INT8_ACTIVATIONS_HELP)] = False,
    max_n: Annotated[int, typer.Option(help="Most completions per request (`n`).")] = 16,
    max_request_tokens: Annotated[int, typer.Option(
        help="Most KV-cache tokens a request may reserve: n x (prompt + max_tokens) "
             "(0: a quarter of the cache, at least one context).")] = 0,
    max_stop: Annotated[int, typer.Option(help="Most stop strings per request.")] = 16,
    max_stop_chars: Annotated[int, typer.Option(help="Most characters of one stop string.")] = 256,
    max_prompt_chars: Annotated[int, typer.Option(
        help="Most prompt characters, checked before tokenizing (0: the context x the longest "
             "token's characters, which no servable prompt exceeds).")] = 0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 beyond).")] = 1 << 20,
    max_connections: Annotated[int, typer.Option(help="Most concurrent connections (503 beyond).")] = 256,
    timeout_keep_alive: Annotated[int, typer.Option(
        help="Seconds an idle keep-alive connection stays open.")] = 5,
    timeout_request: Annotated[float, typer.Option(
        help="Seconds for a request's headers and body to arrive (else the connection is closed).")] = 30.0,
    metrics_without_key: Annotated[bool, typer.Option(
        help="Serve /metrics without the API key (e.g. to a Prometheus scraper).")] = False,
    docs: Annotated[bool, typer.Option(
        help="Serve /docs, /redoc and /openapi.json (behind the API key, when one is set).")] = True,
    tensor_parallel_size: Annotated[int, typer.Option(
        "--tensor-parallel-size", "-tp", help="Ranks the model is sharded over (tensor parallelism).")] = 1,
    data_parallel_size: Annotated[int, typer.Option(
        "--data-parallel-size", "-dp", help="Engine cores (replicas), each with its own ranks.")] = 1,
    api_server_count: Annotated[int, typer.Option(
        help="HTTP server processes sharing the port (tokenization, detokenization, SSE).")] = 1,
    distributed_executor_backend: Annotated[str | None, typer.Option(
        help="Where the ranks run: uniproc (in the engine core), mp (a process each), ray (Ray "
             "actors), torchrun (the processes torchrun started, on one or several machines). "
             "Default: uniproc for one rank, else mp.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="--distributed-executor-backend ray: the cluster to join (default: a local one).")] = None,
    router: Annotated[str, typer.Option(
        help="Data parallelism: prefix (a prompt's cached prefix decides, within a load margin) or "
             "least-loaded.")] = "prefix",
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM: seconds the requests in flight may take to finish (new ones get 503).")] = 30.0,
    engine_in_process: Annotated[bool, typer.Option(
        help="Run the engine in a thread of the HTTP server's process (one process; slower under load).")]
    = False,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API (continuous batching, paged KV cache).

    The engine runs in processes of its own (engine cores; with tensor parallelism one worker per
    rank), the HTTP server(s) in others; see leanlm/serve/launcher.py."""
    import os

    from leanlm.allocator import bound_kernel_caches, keep_freed_memory, use_huge_pages
    from leanlm.serve.api.limits import ServerLimits
    from leanlm.serve.core_process import CoreSpec
    from leanlm.serve.engine import EngineConfig
    from leanlm.serve.executor import BACKENDS
    from leanlm.serve.router import POLICIES
    from leanlm.serve.scheduler import SchedulerConfig

    limits = ServerLimits(max_n=max_n, max_request_tokens=max_request_tokens, max_stop=max_stop,
                          max_stop_chars=max_stop_chars, max_prompt_chars=max_prompt_chars,
                          max_body_bytes=max_body_bytes, max_connections=max_connections,
                          timeout_keep_alive=timeout_keep_alive, timeout_request=timeout_request)
    backend = distributed_executor_backend or ("uniproc" if tensor_parallel_size == 1 else "mp")
    if backend not in BACKENDS:
        raise LeanLMError(f"--distributed-executor-backend {backend!r}: expected one of {BACKENDS}")
    if router not in POLICIES:
        raise LeanLMError(f"--router {router!r}: expected one of {POLICIES}")
    if min(tensor_parallel_size, data_parallel_size, api_server_count) < 1:
        raise LeanLMError("--tensor-parallel-size, --data-parallel-size and --api-server-count must be >= 1")
    if int8_activations:  # read by the engine processes, which inherit it
        os.environ["LEANLM_INT8_ACTIVATIONS"] = "1"
    keep_freed_memory()  # CPU steps reuse freed memory instead of page-faulting on it each step
    use_huge_pages()  # weights on 2 MiB pages: decode streams them faster (a slower load)
    bound_kernel_caches()  # else oneDNN keeps a primitive per step size, and RSS grows with them
    path = resolve_model(model)
    draft_path = None
    if speculative == "draft":
        from leanlm.assets import DRAFT_MODEL

        draft_path = draft_model or DRAFT_MODEL
        ours, theirs = path / "tokenizer.json", draft_path / "tokenizer.json"
        if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
            raise LeanLMError(f"--draft-model {draft_path}: its tokenizer.json differs from {path}'s; "
                              f"speculative decoding needs the same tokenizer")
    elif draft_model is not None:
        raise LeanLMError("--draft-model needs --speculative draft")
    loras = {}
    for item in lora or []:
        lname, sep, adapter = item.partition("=")
        if not sep:
            raise LeanLMError(f"--lora {item!r}: expected NAME=ADAPTER_DIR")
        loras[lname] = adapter
    config = EngineConfig(block_size=block_size, kv_cache_memory=kv_cache_memory * 2**20,
                          enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype,
                          speculative=speculative, num_spec_tokens=num_spec_tokens,
                          spec_disable_batch_size=spec_disable_batch_size, compile=compile,
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, policy=policy,
                                                    max_num_batched_tokens=max_num_batched_tokens))
    cores = [CoreSpec(str(path), config, dtype, i, tensor_parallel_size, backend,
                      str(draft_path) if draft_path else None, loras, threads, ray_address)
             for i in range(data_parallel_size)]
    if backend == "torchrun" and int(os.environ.get("RANK", "0")) != 0:
        from leanlm.serve.core_process import run_torchrun_worker

        return run_torchrun_worker(cores[0])  # this rank serves the engine core on rank 0
    name = served_model_name or ("leanlm-default" if model is None else path.name)
    console = Console(stderr=True)
    if api_key is None and not is_loopback(host):
        console.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who can "
                      f"reach this address can use the model (set --api-key or LEANLM_API_KEY)")
    app = {"api_key": api_key, "limits": limits, "metrics_without_key": metrics_without_key, "docs": docs}
    if engine_in_process:
        if tensor_parallel_size * data_parallel_size * api_server_count != 1 or backend != "uniproc":
            raise LeanLMError("--engine-in-process serves one engine core with one rank and one API server")
        return serve_in_process(cores[0], name, host, port, app, limits, console)
    from leanlm.serve.launcher import ServeSpec, launch

    console.print(f"serving {path} as {name!r} on http://{host}:{port}/v1 ({data_parallel_size} engine "
                  f"core(s) x {tensor_parallel_size} rank(s) ({backend}), {api_server_count} API server(s))")
    spec = ServeSpec(cores, str(path), name, host, port, api_server_count, router, shutdown_timeout, app)
    code = launch(spec)
    if code:
        raise typer.Exit(code)
    return None


def serve_in_process(core: object, name: str, host: str, port: int, app: dict, limits: object,
                     console: Console) -> None:
    """The one-process server: the engine in a thread beside uvicorn's event loop."""
    import uvicorn

    from leanlm.serve.api.server import create_app
    from leanlm.serve.async_engine import AsyncLLMEngine
    from leanlm.serve.core_process import build_engine
    from leanlm.tokenizer import load_tokenizer

    engine = AsyncLLMEngine(build_engine(core), load_tokenizer(core.model))
    console.print(f"serving {core.model} as {name!r} on http://{host}:{port}/v1 (engine in process)")
    uvicorn.run(create_app(engine, name, **app), host=host, port=port, log_level="warning",
                **limits.uvicorn_options())


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bench_serve(
    base_url: Annotated[str, typer.Option(help="API base of an OpenAI-compatible server.")]
    = "http://127.0.0.1:8000/v1",
    model: Annotated[str | None, typer.Option(help="The `model` to send (default: the server's first).")]
    = None,
    api_key: Annotated[str | None, typer.Option(envvar="LEANLM_API_KEY", help="Bearer key.")] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests per run.")] = 100,
    request_rate: Annotated[float, typer.Option(help="Poisson arrivals, requests/s (inf: all at once).")]
    = float("inf"),
    max_concurrency: Annotated[str, typer.Option(
        help="Most requests in flight (0: no cap); a list (1,8,32) runs one benchmark per value.")] = "0",
    dataset: Annotated[str, typer.Option(help="random, or a prompt file (.jsonl: prompt/text; .txt).")]
    = "random",
    input_len: Annotated[int, typer.Option(help="Random prompts: tokens each.")] = 128,
    output_len: Annotated[int, typer.Option(help="max_tokens of every request.")] = 128,
    tokenizer: Annotated[Path | None, typer.Option(
        help="Model directory whose tokenizer makes random prompts (default: leanlm's model).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos (vLLM, leanlm): output-len tokens.")]
    = True,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of every request.")] = 0.0,
    extra_body: Annotated[str | None, typer.Option(help="JSON object merged into every request.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of random prompts and arrivals.")] = 0,
    json_out: Annotated[Path | None, typer.Option(help="Write summaries and per-request results.")] = None,
) -> None:
    """Benchmark a serving endpoint: TTFT, TPOT, ITL, E2E latency and throughput (vLLM's definitions)."""
    import asyncio
    import json

    from rich.table import Table

    from leanlm.serve import bench

    try:
        levels = [int(x) for x in max_concurrency.split(",")]
    except ValueError:
        raise LeanLMError(f"--max-concurrency {max_concurrency!r}: expected integers like 1,8,32") from None
    try:
        extra = json.loads(extra_body) if extra_body else {}
    except json.JSONDecodeError as e:
        raise LeanLMError(f"--extra-body: not JSON ({e.msg})") from None
    if not isinstance(extra, dict):
        raise LeanLMError("--extra-body: expected a JSON object")
    extra = {"temperature": temperature, **({"ignore_eos": True} if ignore_eos else {}), **extra}
    if dataset == "random":
        from leanlm.tokenizer import load_tokenizer

        prompts = bench.random_prompts(load_tokenizer(resolve_model(tokenizer)), num_prompts, input_len, seed)
    else:
        prompts = bench.file_prompts(Path(dataset))
    console = Console()
    runs = []
    for level in levels:
        requests = bench.schedule(prompts, num_prompts, output_len, request_rate, seed)
        results, wall = asyncio.run(bench.run(base_url, requests, model, api_key, level or None, extra))
        runs.append({"max_concurrency": level or None, **bench.summarize(results, wall),
                     "requests": results})
        console.print(f"max concurrency {level or 'none'}: {runs[-1]['completed']} done, "
                      f"{runs[-1]['failed']} failed in {wall:.1f} s", style="dim")
    table = Table(title=f"{base_url}: {num_prompts} requests, {dataset} prompts, {output_len} tokens out")
    for col in ("concurrency", "ok/failed", "req/s", "out tok/s", "TTFT med ms", "TTFT p99",
                "TPOT med ms", "TPOT p99", "ITL med ms", "E2EL med ms"):
        table.add_column(col, justify="right")
    for s in runs:
        table.add_row(str(s["max_concurrency"] or "-"), f"{s['completed']}/{s['failed']}",
                      f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                      *(f"{s[k]:.1f}" for k in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                                                "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")))
    console.print(table)
    for s in runs:
        for e in s.get("errors", []):
            console.print(f"[red]error[/red] (concurrency {s['max_concurrency']}): {e}")
    if json_out is not None:
        from dataclasses import asdict

        from leanlm.fsutil import write_json

        write_json(json_out, [{**s, "requests": [asdict(r) for r in s["requests"]]} for s in runs])
