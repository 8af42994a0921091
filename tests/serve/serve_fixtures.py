"""A live leanlm server on loopback (uvicorn in a thread) over a tiny random model."""

from __future__ import annotations

import socket
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("srv") / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    srv, thread, url = start_server(path)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)
