"""The server as a hostile or careless client meets it (issue 22): one test per finding, each
reproducing the attack and asserting that other clients are unharmed and the offender gets a 4xx
with an OpenAI error body."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import pytest

pytest.importorskip("uvicorn")

import serve_fixtures

from conftest import build_hf_model, write_tokenizer
from leanlm.errors import LeanLMError
from leanlm.serve.api.limits import ServerLimits

KEY = serve_fixtures.KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerLimits(max_prompt_chars=600_000, max_body_bytes=2 << 20, timeout_request=1.0,
                      timeout_keep_alive=1)


@dataclass
class Live:
    url: str
    app: Any  # None: the server runs as `leanlm serve` does, its engine core in another process

    @property
    def engine(self) -> Any:  # the AsyncLLMEngine
        return self.app.state.engine

    @property
    def core(self) -> Any:  # the LLMEngine
        if self.app is None:
            pytest.skip("looks inside the engine, which runs in another process here")
        return self.app.state.engine.engine

    def metric(self, prefix: str) -> float:
        """The sum of the /metrics series whose line starts with ``prefix``."""
        text = httpx.get(self.url + "/metrics", headers=AUTH, timeout=30).text
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix))

    def running(self) -> int:
        """Requests in the running batch (of every engine core)."""
        return int(self.metric("leanlm_num_requests_running{"))

    def post(self, path: str, body: Any = None, headers: dict | None = None, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=AUTH if headers is None else headers,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("hard") / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    return path


def _serve(path: Any, **options: Any) -> Iterator[Live]:
    srv, thread, url = serve_fixtures.start_server(path, **options)
    try:
        yield Live(url, srv.config.app)  # type: ignore[attr-defined]
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]
        thread.join(timeout=10)


@pytest.fixture(scope="module", params=["in-process", "split"])
def live(request: pytest.FixtureRequest, model_path: Any) -> Iterator[Live]:
    """The server (vtc, default limits but for a longer prompt, a 2 MiB body and 1 s timeouts), 8
    batch slots: in this process, then as `leanlm serve` runs it (its engine core in a process)."""
    if request.param == "in-process":
        yield from _serve(model_path, limits=LIMITS, max_num_seqs=8)
        return
    proc, url = serve_fixtures.start_split(
        model_path, "--max-num-seqs", "8", "--max-prompt-chars", str(LIMITS.max_prompt_chars),
        "--max-body-bytes", str(LIMITS.max_body_bytes), "--timeout-request", "1", "--timeout-keep-alive", "1",
        "--kv-cache-memory", "1")  # 512 blocks of 4 tokens, as in process
    yield Live(url, None)
    assert serve_fixtures.stop_split(proc) == 0


def assert_openai_error(r: httpx.Response, status: int, match: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and match in error["message"], error
    return error


async def _streams(live: Live, n: int, max_tokens: int, started: asyncio.Event) -> list[tuple[str, int]]:
    """n streaming completions; ``started`` is set once each has streamed its first chunk.
    Returns each one's (finish_reason, completion tokens)."""
    first = asyncio.Semaphore(0)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": "tiny", "prompt": f"stream {i}", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
        reason, tokens, seen = "", 0, False
        async with client.stream("POST", f"{live.url}/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                if not seen:
                    seen = True
                    first.release()
                for c in event["choices"]:
                    reason = c["finish_reason"] or reason
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return reason, tokens

    async def all_started() -> None:
        for _ in range(n):
            await first.acquire()
        started.set()

    async with httpx.AsyncClient(timeout=120) as client:
        watcher = asyncio.ensure_future(all_started())
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
        watcher.cancel()
        return results


def _with_streams(live: Live, attack: Any, n: int = 4, max_tokens: int = 40) -> tuple[list, Any]:
    """Run ``attack()`` (blocking, in a thread) once n streams are under way; (their outcomes, its result)."""
    async def main() -> tuple[list, Any]:
        started = asyncio.Event()
        streams = asyncio.ensure_future(_streams(live, n, max_tokens, started))
        await asyncio.wait_for(started.wait(), 60)
        result = await asyncio.to_thread(attack)
        return await streams, result

    return asyncio.run(main())


# ---- 1. one request's parameters never end other clients' requests ------------------------------
def test_seed_past_64_bits_fails_alone_with_a_400(live: Live) -> None:
    def attack() -> list[httpx.Response]:
        bodies = [{"model": "tiny", "prompt": "x", "max_tokens": 4, "seed": 2**64},
                  {"model": "tiny", "prompt": "x", "max_tokens": 4, "seed": -2**63 - 1, "stream": True},
                  {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}]
        return [live.post("/v1/chat/completions" if "messages" in b else "/v1/completions", b)
                for b in bodies]

    streams, responses = _with_streams(live, attack)
    for r in responses:
        assert assert_openai_error(r, 400)["param"] == "seed"
    assert streams == [("length", 40)] * 4  # every other client's stream ran to its end
    # the largest seed works, and so do the n seeds derived from it (seed + i, wrapped)
    r = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "n": 2,
                                      "seed": 2**64 - 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_a_failure_in_the_engine_thread_fails_only_the_request_at_fault(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past validation (here a fault injected into the model runner for seeds 4242 and 4243),
    the engine thread rolls back the step, finds the culprits and fails only them."""
    runner = live.core.runner
    update = runner._update_states

    def faulty(out: Any) -> None:  # the runner fails to take a new request seeded 4242 or 4243
        for new in out.new_requests:
            if new.sampling_params.seed in (4242, 4243):
                raise LeanLMError(f"injected fault for seed {new.sampling_params.seed}")
        update(out)

    monkeypatch.setattr(runner, "_update_states", faulty)

    def attack() -> list[httpx.Response]:
        bodies = [{"model": "tiny", "prompt": f"p{i}", "max_tokens": 3, "seed": seed}
                  for i, seed in enumerate((4242, 1, 4243, 2))]
        out: list[Any] = [None] * len(bodies)

        def send(i: int) -> None:
            out[i] = live.post("/v1/completions", bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    streams, responses = _with_streams(live, attack)
    assert_openai_error(responses[0], 400, "injected fault for seed 4242")
    assert_openai_error(responses[2], 400, "injected fault for seed 4243")
    for r in (responses[1], responses[3]):  # new requests that came with the culprits
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert streams == [("length", 40)] * 4
    # a stream that fails in the engine gets an error event (the openai client raises on it)
    with httpx.stream("POST", f"{live.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "seed": 4242,
                            "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["message"] == "injected fault for seed 4242"


# ---- 2. one request cannot starve everyone ------------------------------------------------------
def test_n_and_reservation_limits(live: Live) -> None:
    r = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 8, "n": 17})
    assert assert_openai_error(r, 400, "--max-n")["param"] == "n"
    r = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 300, "n": 16})
    assert assert_openai_error(r, 400, "--max-request-tokens")["param"] == "max_tokens"


def test_a_big_n_shares_the_batch_with_a_small_request(live: Live) -> None:
    """16 copies of one request and 8 batch slots: under FCFS a later 4-token request waits for
    both rounds of copies; as one client's share under VTC it is admitted at the next step."""
    big_done = threading.Event()

    def big() -> None:
        r = live.post("/v1/completions", {"model": "tiny", "prompt": "big", "max_tokens": 100, "n": 16,
                                          "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1600
        big_done.set()

    thread = threading.Thread(target=big)
    thread.start()
    deadline = time.time() + 60
    while live.running() < 8 and time.time() < deadline:
        time.sleep(0.005)
    assert live.running() == 8 and not big_done.is_set()
    r = live.post("/v1/completions", {"model": "tiny", "prompt": "small", "max_tokens": 4,
                                      "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert not big_done.is_set()  # served while the 16 copies still run
    thread.join(timeout=120)
    assert big_done.is_set()


# ---- 3. every endpoint behind the key -----------------------------------------------------------
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
ENDPOINTS = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "tiny", "prompt": "x"}),
             ("POST", "/v1/chat/completions", CHAT),
             ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
             ("GET", "/metrics", None), ("GET", "/docs", None), ("GET", "/redoc", None),
             ("GET", "/openapi.json", None), ("GET", "/no-such-path", None)]


def test_every_endpoint_but_health_needs_the_key(live: Live, model_path: Any) -> None:
    for method, path, body in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, live.url + path, json=body, headers=headers)
            assert_openai_error(r, 401, "API key")
        r = httpx.request(method, live.url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == (404 if path == "/no-such-path" else 200), (path, r.text[:200])
    assert httpx.get(live.url + "/health").status_code == 200
    # --metrics-without-key opens /metrics alone; --no-docs turns the docs and the schema off
    for other in _serve(model_path, metrics_without_key=True, docs=False):
        assert httpx.get(other.url + "/metrics").status_code == 200
        assert_openai_error(httpx.get(other.url + "/tokenize"), 401)
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_openai_error(httpx.get(other.url + path, headers=AUTH), 404)


# ---- 4. big bodies and long prompts -------------------------------------------------------------
def test_body_size_is_checked_before_the_body_is_read(live: Live) -> None:
    big = json.dumps({"model": "tiny", "prompt": "x" * (3 << 20)}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/completions", content=big, headers=headers)
    assert_openai_error(r, 413, "--max-body-bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(live.url + "/v1/completions", content=chunks(), headers=headers)
    assert_openai_error(r, 413, "--max-body-bytes")
    # a body of 10 GB is refused on its Content-Length alone, at once
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_prompt_characters_are_limited_before_tokenizing(live: Live) -> None:
    long = "x" * (LIMITS.max_prompt_chars + 1)
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": long}),
                       ("/v1/chat/completions", {"model": "tiny", "messages": [  # in all
                           {"role": "user", "content": long[:400_000]},
                           {"role": "user", "content": long[:200_001]}]}),
                       ("/tokenize", {"prompt": long})):
        assert_openai_error(live.post(path, body), 400, "--max-prompt-chars")
    default = ServerLimits().resolved(context=2048, kv_tokens=2048, longest_token_chars=12)
    assert default.max_prompt_chars == 2048 * 12 and default.max_request_tokens == 2048


def test_health_answers_while_a_maximal_prompt_is_tokenized(live: Live) -> None:
    """Prompts of max_prompt_chars characters take a while to tokenize; /health is asked again
    and again meanwhile and must answer within 200 ms (the median of the calls made while the
    prompts were in flight; tokenizing on the event loop would hold each of them that long)."""
    prompt = "the quick brown fox jumps over the lazy dog " * (LIMITS.max_prompt_chars // 44)
    result: list[httpx.Response] = []

    def send() -> None:
        result.append(live.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1}))

    # three at once, so that the window of tokenizing outlasts a fast machine's few calls
    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)  # the bodies are sent and being tokenized
    latencies = []
    while any(thread.is_alive() for thread in threads):
        t0 = time.perf_counter()
        assert httpx.get(live.url + "/health", timeout=60).status_code == 200
        if any(thread.is_alive() for thread in threads):
            latencies.append(time.perf_counter() - t0)
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    for response in result:  # each was tokenized, and is longer than the context
        assert_openai_error(response, 400, "context")
    assert len(latencies) >= 3, latencies
    assert statistics.median(latencies) < 0.2, latencies


# ---- 5. lone surrogates -------------------------------------------------------------------------
def test_lone_surrogates_get_a_400(live: Live) -> None:
    bodies = [("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}'),
              ("/v1/chat/completions",
               b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}'),
              ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}'),
              ("/v1/completions", b'{"model": "ti\\ud800ny", "prompt": "x"}'),
              ("/tokenize", b'{"prompt": "a\\ud800b"}')]
    for path, body in bodies:
        r = httpx.post(live.url + path, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert_openai_error(r, 400)
    assert live.post("/tokenize", {"prompt": "a\U0001F600b"}).status_code == 200  # a real pair is fine


# ---- 6. a non-streaming request whose client goes away ------------------------------------------
def test_non_streaming_requests_are_aborted_when_the_client_disconnects(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    if live.app is not None:
        step = live.core.step

        def slow_step() -> Any:  # 1,000 steps would now take over 15 s
            time.sleep(0.015)
            return step()

        monkeypatch.setattr(live.core, "step", slow_step)
    generated = live.metric("leanlm_generation_tokens_total")
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1000, "n": 2,
                       "ignore_eos": True}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 30
        while live.running() < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert live.running() == 2
        time.sleep(0.3)
    gone = time.time()  # the socket is closed
    while live.running() and time.time() < gone + 10:
        time.sleep(0.01)
    assert live.running() == 0
    assert time.time() - gone < 5  # aborted, not run to the end ...
    assert live.metric("leanlm_generation_tokens_total") - generated < 2000  # ... of its 2 x 1,000 tokens


# ---- 7. no per-request state is left behind -----------------------------------------------------
def test_no_per_request_state_outlives_its_request(live: Live) -> None:
    def attack() -> None:
        for i in range(6):  # finished, invalid, stopped by a stop string, disconnected
            live.post("/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 5, "user": f"u{i}"})
            live.post("/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 5, "seed": -1,
                                          "stop": ["a", "b", "c", "d", "e"], "n": 2})
            live.post("/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 0})
            with httpx.stream("POST", f"{live.url}/v1/completions", headers=AUTH, json={
                    "model": "tiny", "prompt": "y", "max_tokens": 50, "stream": True}) as r:
                next(r.iter_lines())

    _with_streams(live, attack)
    deadline = time.time() + 10
    while live.core.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    engine, core = live.engine, live.core
    thread = engine.thread  # the engine core in its thread: nothing held for finished requests
    assert engine.streams == {} and thread.core.copied == {}
    assert thread.new == [] and thread.core.pending == []
    assert core.scheduler.requests == {} and core.kv.req_blocks == {} and core.kv.req_hashes == {}
    assert core.scheduler._clients == {}  # vtc: no client is active
    assert len(core.runner.requests) <= 8  # the last step's finished requests, dropped at the next


# ---- 8. smaller ones ----------------------------------------------------------------------------
def test_error_bodies_are_openai_shaped_and_the_schema_says_400(live: Live) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/completions", content=b'{"model": 42', headers=headers)
    error = assert_openai_error(r, 400, "not valid JSON")
    assert error["param"] is None
    assert_openai_error(httpx.post(live.url + "/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(httpx.post(live.url + "/v1/completions", content=b"prompt=x",
                                   headers={**AUTH, "Content-Type": "text/plain"}), 400)
    assert_openai_error(httpx.get(live.url + "/v1/completions", headers=AUTH), 405)
    assert_openai_error(httpx.get(live.url + "/v2/nothing", headers=AUTH), 404)
    schema = httpx.get(live.url + "/openapi.json", headers=AUTH).json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (path, method)
            if method == "post":
                assert "400" in op["responses"] and "413" in op["responses"], (path, method)
            assert (op.get("security") == []) == (path == "/health")


def test_chat_and_stop_validation(live: Live) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for bad, param in (({"messages": []}, "messages"),
                       ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
                       ({"messages": [{"role": "user"}]}, "messages.0.content"),
                       ({"stop": [""]}, "stop"), ({"stop": ""}, "stop"),
                       ({"max_completion_tokens": 0}, "max_completion_tokens"),
                       ({"stop": [str(i) for i in range(17)]}, "stop"),
                       ({"stop": ["x" * 257]}, "stop")):
        error = assert_openai_error(live.post("/v1/chat/completions", {**chat, **bad}), 400)
        assert (error["param"] or "").startswith(param), (bad, error)
    for role in ("system", "developer", "assistant"):
        r = live.post("/v1/chat/completions", {**chat, "messages": [{"role": role, "content": "a"},
                                                                   {"role": "user", "content": "b"}]})
        assert r.status_code == 200
    r = live.post("/v1/chat/completions", {**chat, "max_completion_tokens": 3, "max_tokens": 1,
                                           "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3  # max_completion_tokens wins


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True  # the server closed it
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_half_sent_connections_are_timed_out(live: Live) -> None:
    """timeout_request is 1 s and timeout_keep_alive 1 s here: a silent connection, one that
    trickles its headers in, one that stops halfway through its body, and an idle keep-alive
    connection are all closed within a few seconds."""
    host, port = live.url.removeprefix("http://").split(":")
    address = (host, int(port))
    with socket.create_connection(address) as idle:
        assert _closed_within(idle, 5)
    with socket.create_connection(address) as slow:
        start = time.time()
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.2 s
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.time() - start > 4:
                break
        assert _closed_within(slow, 5)
        assert time.time() - start < 8
    with socket.create_connection(address) as half:
        half.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        assert _closed_within(half, 5)
    with socket.create_connection(address) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        assert b"200 OK" in kept.recv(4096)
        assert _closed_within(kept, 5)  # keep-alive: closed after 1 s of silence
    assert httpx.get(live.url + "/health").status_code == 200


def test_concurrent_connections_are_capped(model_path: Any) -> None:
    for small in _serve(model_path, limits=ServerLimits(max_connections=3)):
        host, port = small.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(small.url + "/health").status_code == 503
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(small.url + "/health").status_code == 200


def test_non_loopback_bind_without_a_key_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from leanlm.cli import app
    from leanlm.serve import launcher
    from leanlm.serve.cli import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))
    calls: list[dict] = []
    options = lambda spec: calls.append(spec.app["limits"].uvicorn_options()) or 0  # what uvicorn gets
    monkeypatch.setattr(launcher, "launch", options)
    monkeypatch.delenv("LEANLM_API_KEY", raising=False)
    runner = CliRunner()
    out = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert out.exit_code == 0, out.output
    assert "without --api-key" in out.output
    assert calls[-1]["limit_concurrency"] == 256 and calls[-1]["timeout_keep_alive"] == 5
    out = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--api-key", "k"])
    assert out.exit_code == 0 and "without --api-key" not in out.output
