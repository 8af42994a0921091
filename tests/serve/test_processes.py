"""`leanlm serve` across processes, as a user runs it: data-parallel engine cores, several API
servers, and failures — a killed tensor-parallel worker, a killed engine core, SIGTERM with streams
in flight — each ending cleanly: errors instead of hangs, 503 from /health, no process left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import serve_fixtures

from conftest import build_hf_model, write_tokenizer

pytestmark = pytest.mark.dist
AUTH = {"Authorization": f"Bearer {serve_fixtures.KEY}"}
PROMPTS = ["def fib(n):", "hello world", "the quick brown fox", "1 2 3 4 5", "x = y + z", "import os"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("procs") / "m"
    build_hf_model("llama").save_pretrained(path)
    return write_tokenizer(path)


def complete(url: str, prompt: str, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})


def children(pid: int) -> list[int]:
    """Every process descended from ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        out += kids
        frontier += kids
    return out


def stream(url: str, prompt: str, max_tokens: int, out: list, started: threading.Event | None = None) -> None:
    """One streaming completion; appends (finish_reason or the error event, tokens)."""
    reason, n = None, 0
    try:
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if started is not None:
                    started.set()
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        reason = "error"
                        continue
                    n += 1
                    reason = event["choices"][0]["finish_reason"] or reason
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}"
    out.append((reason, n))


def test_data_parallel_cores_give_the_outputs_of_one(model_path: Path) -> None:
    proc, url = serve_fixtures.start_split(model_path)
    try:
        want = [complete(url, p).json()["choices"][0]["text"] for p in PROMPTS]
    finally:
        assert serve_fixtures.stop_split(proc) == 0
    proc, url = serve_fixtures.start_split(model_path, "--data-parallel-size", "2", "--api-server-count", "2")
    try:
        results: list[Any] = [None] * len(PROMPTS)

        def send(i: int) -> None:
            results[i] = complete(url, PROMPTS[i]).json()["choices"][0]["text"]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == want
        metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
        assert 'leanlm_num_requests_running{engine="0"}' in metrics and 'engine="1"' in metrics
        # one engine core killed: the other keeps serving new requests
        cores = wait_named(proc.pid, "leanlm-core-", 2)
        # the second API server serves nothing /health needs: it may still be importing
        assert len(cores) == 2 and len(wait_named(proc.pid, "leanlm-api-", 1)) == 1
        os.kill(cores[0], signal.SIGKILL)
        time.sleep(1.5)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert [complete(url, p).json()["choices"][0]["text"] for p in PROMPTS[:3]] == want[:3]
    finally:
        assert serve_fixtures.stop_split(proc) == 0


def named(pids: list[int], prefix: str) -> list[int]:
    """The processes among ``pids`` whose name (what the server set) starts with ``prefix``."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith(prefix):
                    out.append(pid)
        except OSError:
            continue
    return sorted(out)


def wait_named(root: int, prefix: str, count: int, wait: float = 60.0) -> list[int]:
    """The descendants of ``root`` named ``prefix``..., once there are ``count`` of them (or
    whatever there are after ``wait`` seconds: a process names itself only once it has started)."""
    deadline = time.monotonic() + wait
    while len(found := named(children(root), prefix)) != count and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def alive(pids: set[int], wait: float = 5.0) -> list[str]:
    """The processes among ``pids`` still running after ``wait`` seconds (their names)."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[0] != "Z":
                left.append(stat.partition(" ")[2].partition(")")[0] + ")")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_ranks_launched_by_torchrun(model_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m leanlm.cli serve -tp 2 --distributed-executor-backend
    torchrun`: rank 0 serves HTTP and runs the engine core, rank 1 is a worker it reaches over TCP
    (what two machines do, on one); the outputs are one process's."""
    proc, url = serve_fixtures.start_split(model_path)
    try:
        want = [complete(url, p).json()["choices"][0]["text"] for p in PROMPTS[:3]]
    finally:
        serve_fixtures.stop_split(proc)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(serve_fixtures.free_port_block(4)))  # + the ranks' sockets
    proc, url = serve_fixtures.start_split(model_path, "-tp", "2", "--distributed-executor-backend",
                                           "torchrun", launcher=torchrun)
    before = set(children(proc.pid))
    try:
        assert [complete(url, p).json()["choices"][0]["text"] for p in PROMPTS[:3]] == want
        assert len(named(list(before), "leanlm-rank-")) == 1  # rank 0's worker; rank 1 is torchrun's
    finally:
        serve_fixtures.stop_split(proc)  # (torchrun's own exit status on SIGTERM is its business)
    assert not alive(before)


def test_a_killed_tensor_parallel_worker_fails_the_streams_and_the_server(model_path: Path) -> None:
    proc, url = serve_fixtures.start_split(model_path, "--tensor-parallel-size", "2")
    try:
        before = set(children(proc.pid))
        out: list = []
        started = threading.Event()
        thread = threading.Thread(target=stream, args=(url, "def fib(n):", 200, out, started))
        thread.start()
        assert started.wait(60)
        ranks = named(list(before), "leanlm-rank-")  # the engine core's worker processes
        assert len(ranks) == 2 and len(named(list(before), "leanlm-core-")) == 1
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        thread.join(30)
        assert out and out[0][0] == "error" and time.monotonic() - t0 < 10
        seen_503 = False
        while proc.poll() is None and time.monotonic() - t0 < 30:
            with contextlib.suppress(httpx.HTTPError):
                seen_503 |= httpx.get(f"{url}/health", timeout=2).status_code == 503
            time.sleep(0.1)
        assert seen_503
        assert proc.wait(30) != 0  # the server exits non-zero
        assert not alive(before)  # no orphans
    finally:
        serve_fixtures.stop_split(proc)


def test_sigterm_drains_the_streams_in_flight(model_path: Path) -> None:
    proc, url = serve_fixtures.start_split(model_path, "--shutdown-timeout", "120")
    before = set(children(proc.pid))
    out: list = []
    started = [threading.Event() for _ in range(16)]
    threads = [threading.Thread(target=stream, args=(url, PROMPTS[i % len(PROMPTS)], 400, out, started[i]))
               for i in range(16)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)  # every stream has its first token
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = complete(url, "too late")
    health = httpx.get(f"{url}/health", timeout=10)
    for t in threads:
        t.join(180)
    assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable"
    assert health.status_code == 503
    assert sorted(out) == [("length", 400)] * 16  # every stream ran to its end
    assert proc.wait(60) == 0
    assert not alive(before)
