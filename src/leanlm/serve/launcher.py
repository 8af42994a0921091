"""``leanlm serve``'s processes: the engine cores, the API servers, and their orderly end.

    launcher (API server 0) ── spawns ──> engine core 0 .. D-1   (data parallel; each with its
        │                                 executor: in-process model, or TP worker processes)
        └── spawns ──> API servers 1 .. N-1 (``--api-server-count``; all accept on one socket)

The launcher binds the listening socket and hands it to every API server (uvicorn's own
multi-worker pattern: the kernel spreads connections over the processes accepting on it). Each API
server has its own :class:`~leanlm.serve.core_client.CoreClient` and output address; every engine
core answers each API server on its address. Messages go over ``ipc://`` sockets in a private
temporary directory, removed at the end.

Ending: SIGTERM (or SIGINT) drains — new requests get 503, ``/health`` says 503, the requests in
flight run to their end for up to ``shutdown_timeout`` seconds — then the API server stops, tells
the engine cores to stop, and waits for every process it started. When every engine core is dead
(a lost worker, a killed core) the API server answers 503, fails what was in flight, and exits
with status 1 after ``DEAD_GRACE_S``. Engine cores and workers die with the process that
started them (``PR_SET_PDEATHSIG``), so even a killed launcher leaves no orphans.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from leanlm.serve.core_process import CoreSpec, run_engine_core
from leanlm.serve.executor import child_process

DEAD_GRACE_S = 2.0  # how long a server whose engine died keeps answering 503 before it exits


@dataclass
class ServeSpec:
    cores: list[CoreSpec]  # one per data-parallel replica
    tokenizer: str  # the model directory whose tokenizer the API servers use
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_server_count: int = 1
    router: str = "prefix"
    shutdown_timeout: float = 30.0
    app: dict[str, Any] = field(default_factory=dict)  # create_app's keyword arguments (with limits)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains (see the module docstring); a second
    one ends it at once, as uvicorn's does."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.dead = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.config.app.state
        if state.draining:
            return super().handle_exit(sig, frame)
        state.draining = True
        asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        engine = self.config.app.state.engine
        deadline = time.monotonic() + self.shutdown_timeout
        while engine.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True

    async def watch_engine(self) -> None:
        """Exit (status 1) a little while after every engine core died."""
        engine = self.config.app.state.engine
        while engine.dead is None:
            await asyncio.sleep(0.1)
        await asyncio.sleep(DEAD_GRACE_S)
        self.dead = True
        self.should_exit = True


def run_api_server(spec: ServeSpec, front_end: int, sock: socket.socket, inputs: list[str],
                   output: str) -> int:
    """One API server's life; its exit status (1: the engine died)."""
    from leanlm.serve.api.limits import ServerLimits
    from leanlm.serve.api.server import create_app
    from leanlm.serve.async_engine import AsyncLLMEngine
    from leanlm.serve.core_client import CoreClient
    from leanlm.tokenizer import load_tokenizer

    async def main() -> int:
        client = CoreClient(inputs, output, front_end, spec.router)
        await client.start()
        engine = AsyncLLMEngine(None, load_tokenizer(spec.tokenizer), client=client)
        app = create_app(engine, spec.model_name, **spec.app)
        limits = spec.app.get("limits") or ServerLimits()
        config = uvicorn.Config(app, log_level="warning", **limits.uvicorn_options())
        server = DrainingServer(config, spec.shutdown_timeout)
        watcher = asyncio.create_task(server.watch_engine())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            await client.shutdown()
        return 1 if server.dead else 0

    return asyncio.run(main())


def _api_server_process(spec: ServeSpec, front_end: int, sock: socket.socket, inputs: list[str],
                        output: str) -> None:
    child_process(f"leanlm-api-{front_end}")
    raise SystemExit(run_api_server(spec, front_end, sock, inputs, output))


def launch(spec: ServeSpec) -> int:
    """Start everything, serve until told to stop (or the engine dies); the exit status."""
    tmp = Path(tempfile.mkdtemp(prefix="leanlm-serve-"))
    inputs = [f"ipc://{tmp}/core-{i}" for i in range(len(spec.cores))]
    outputs = [f"ipc://{tmp}/api-{j}" for j in range(spec.api_server_count)]
    context = mp.get_context("spawn")
    cores = [context.Process(target=run_engine_core, args=(core, inputs[i], outputs),
                             name=f"leanlm-engine-core-{i}", daemon=False)
             for i, core in enumerate(spec.cores)]
    sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec.host.strip("[]"), spec.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    apis = [context.Process(target=_api_server_process, args=(spec, j, sock, inputs, outputs[j]),
                            name=f"leanlm-api-server-{j}", daemon=False)
            for j in range(1, spec.api_server_count)]
    code = 1
    try:
        for p in (*cores, *apis):
            p.start()
        code = run_api_server(spec, 0, sock, inputs, outputs[0])
    finally:
        for p in apis:  # SIGTERM: they drain as this one did
            if p.is_alive():
                p.terminate()
        for p in (*apis, *cores):
            if p.pid is None:  # (never started)
                continue
            p.join(timeout=spec.shutdown_timeout + 10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return code
