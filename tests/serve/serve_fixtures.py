"""A live leanlm server on loopback over a tiny random model: in this process (uvicorn in a thread,
the engine in another thread: ``start_server``), or as ``leanlm serve`` runs it (``start_split``:
the command in a subprocess, its engine core in a process of its own)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import build_hf_model, write_tokenizer
from leanlm.checkpoint import load_model
from leanlm.serve.api.limits import ServerLimits
from leanlm.serve.api.server import create_app
from leanlm.serve.async_engine import AsyncLLMEngine
from leanlm.serve.engine import EngineConfig, LLMEngine
from leanlm.serve.scheduler import SchedulerConfig
from leanlm.tokenizer import load_tokenizer

KEY = "sk-test"


def start_server(path: object, loras: dict[str, object] | None = None, limits: ServerLimits | None = None,
                 max_num_seqs: int = 64, **app_options: object) -> tuple[object, threading.Thread, str]:
    """A server as `leanlm serve` runs it (the vtc policy, the limits, uvicorn's options)."""
    import uvicorn

    scheduler = SchedulerConfig(policy="vtc", max_num_seqs=max_num_seqs)
    core = LLMEngine(load_model(path), EngineConfig(block_size=4, num_blocks=512, scheduler=scheduler))
    for name, adapter in (loras or {}).items():
        core.add_lora(name, adapter)
    engine = AsyncLLMEngine(core, load_tokenizer(path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = limits or ServerLimits()
    app = create_app(engine, "tiny", api_key=KEY, limits=limits, **app_options)  # type: ignore[arg-type]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        **limits.uvicorn_options()))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    return srv, thread, f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A port P such that P .. P+n-1 are all free, below Linux's ephemeral range (32768+), where
    the OS hands out no ports to outgoing connections that could take one meanwhile (torchrun's
    rendezvous at P, the engine's sockets at P+1 ...)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {n} free ports found")


def start_split(path: object, *args: str, timeout: float = 180.0,
                launcher: tuple[str, ...] = (sys.executable,)) -> tuple[subprocess.Popen, str]:
    """``leanlm serve PATH`` (served as "tiny", with the key, 4-token blocks) in a subprocess,
    once its /health answers; extra command-line ``args`` are appended; ``launcher`` runs
    ``-m leanlm.cli`` (e.g. torchrun)."""
    import httpx2 as httpx

    port = free_port()
    cmd = [*launcher, "-m", "leanlm.cli", "serve", str(path), "--port", str(port), "--api-key", KEY,
           "--served-model-name", "tiny", "--block-size", "4", "--kv-cache-memory", "8", "--threads", "1",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"leanlm serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_split(proc)
    raise RuntimeError("leanlm serve did not come up")


def stop_split(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM, and the exit status (every process of the server gone: it kills the stragglers)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module", params=["in-process", "split"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server in this process, then as `leanlm serve` runs it (engine core in its own process)."""
    path = tmp_path_factory.mktemp("srv") / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    if request.param == "split":
        proc, url = start_split(path)
        yield url
        assert stop_split(proc) == 0
        return
    srv, thread, url = start_server(path)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)
