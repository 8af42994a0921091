"""Soak test of ``leanlm serve``: many clients, steady load, some of them careless or hostile.

A server process on the default model (with an API key) gets ``--requests`` streaming requests
from ``--clients`` concurrent clients, each sending its next request when the last one ended.
Of the requests, ``--disconnect`` (a fraction) hang up after the first streamed chunk and
``--invalid`` send a body the server must refuse with a 4xx and an OpenAI error body (bad JSON,
a seed past 64 bits, a lone surrogate, empty messages, an unknown role, an empty stop string,
``max_completion_tokens: 0``, ``n`` past the limit, a body past the size limit, no API key).
Every other request is valid and must complete with a ``finish_reason`` of ``stop`` or
``length``: any other outcome counts as a failure.

The server's resident set size (RSS) is sampled every ``--every`` finished requests; the script
prints the curve and compares the RSS after the first third with the RSS after the last third
(the issue's bound: within 5%).

    python benchmarks/bench_soak.py                          # 3,000 requests, 48 clients
    python benchmarks/bench_soak.py --requests 600 --every 50 -- --policy fcfs   # server flags after --
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time

import psutil

from common import free_port, start_server
from leanlm import DEFAULT_MODEL, load_tokenizer
from leanlm.data.text import default_texts

KEY = "sk-soak"
INVALID = [  # (what, raw body or JSON body, headers override)
    ("bad json", b'{"model": "leanlm-default", "prompt": ', None),
    ("seed past 64 bits", {"prompt": "x", "max_tokens": 4, "seed": 2**64, "stream": True}, None),
    ("lone surrogate", {"prompt": "a\ud800b", "max_tokens": 4, "stream": True}, None),
    ("empty messages", {"messages": [], "max_tokens": 4, "stream": True}, None),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}, None),
    ("empty stop", {"prompt": "x", "max_tokens": 4, "stop": [""], "stream": True}, None),
    ("max_completion_tokens 0", {"messages": [{"role": "user", "content": "hi"}],
                                 "max_completion_tokens": 0}, None),
    ("n past the limit", {"prompt": "x", "max_tokens": 4, "n": 10_000}, None),
    ("body past the limit", {"prompt": "x" * (2 << 20), "max_tokens": 4}, None),
    ("no API key", {"prompt": "x", "max_tokens": 4, "stream": True}, {}),
]


def machine_line() -> str:
    """CPU model, cores and ISA flags (lscpu), and the date."""
    info = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = set(info.get("Flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return (f"{info.get('Model name', 'unknown CPU')}, {os.cpu_count()} cores, ISA {'+'.join(isa) or '-'}, "
            f"{datetime.date.today().isoformat()}")


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, pid: int) -> None:
        self.args, self.url = args, url
        self.proc = psutil.Process(pid)
        tok = load_tokenizer(DEFAULT_MODEL)
        words = " ".join(default_texts(40, seed=1)).split()
        rng = random.Random(0)
        self.prompts = [" ".join(words[s:s + rng.randint(8, 120)])
                        for s in (rng.randrange(len(words) - 200) for _ in range(200))]
        assert all(len(tok.encode(p)) < 900 for p in self.prompts)
        self.rng = random.Random(1)
        self.done = 0
        self.kinds: list[str] = []  # what each request was, in order
        self.failures: list[str] = []  # valid requests that did not complete normally
        self.wrong: list[str] = []  # invalid requests that did not get a 4xx with an OpenAI error body
        self.rss: list[tuple[int, float, float]] = []  # (requests done, seconds, RSS MiB)
        self.start = time.perf_counter()

    def kind(self) -> str:
        x = self.rng.random()
        return ("invalid" if x < self.args.invalid else
                "disconnect" if x < self.args.invalid + self.args.disconnect else "valid")

    def sample(self) -> None:
        self.rss.append((self.done, time.perf_counter() - self.start, self.server_rss() / 2**20))

    def server_rss(self) -> int:
        """RSS of the server's processes: the HTTP server and the engine core(s) it started."""
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        return total

    async def valid(self, client: object, i: int, hang_up: bool) -> None:
        chat = i % 3 == 0
        prompt = self.prompts[i % len(self.prompts)]
        body: dict = {"model": "leanlm-default", "max_tokens": self.args.max_tokens, "stream": True,
                      "temperature": 0.8, "seed": i, "user": f"client-{i % self.args.clients}"}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {"Authorization": f"Bearer {KEY}"}
        reason = None
        try:
            async with client.stream("POST", self.url + path, json=body, headers=headers,  # type: ignore[attr-defined]
                                     timeout=600) as r:
                if r.status_code != 200:
                    self.failures.append(f"{path}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if hang_up:
                        return  # leaves the context: the connection is closed mid-stream
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.failures.append(f"{path}: error event {event['error']}")
                        return
                    for choice in event["choices"]:
                        reason = choice.get("finish_reason") or reason
        except Exception as e:  # a transport error on a valid request is a failure too
            if not hang_up:
                self.failures.append(f"{path}: {type(e).__name__}: {e}")
            return
        if not hang_up and reason not in ("stop", "length"):
            self.failures.append(f"{path}: finish_reason {reason!r}")

    async def invalid(self, client: object, i: int) -> None:
        what, body, headers = INVALID[i % len(INVALID)]
        chat = isinstance(body, dict) and "messages" in body
        path = "/v1/chat/completions" if chat else "/v1/completions"
        hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        if headers is not None:
            hdrs = {"Content-Type": "application/json", **headers}
        content = (body if isinstance(body, bytes)
                   else json.dumps({"model": "leanlm-default", **body}).encode())
        try:
            r = await client.post(self.url + path, content=content, headers=hdrs, timeout=600)  # type: ignore[attr-defined]
            error = r.json().get("error", {})
            ok = 400 <= r.status_code < 500 and isinstance(error, dict) and "message" in error
        except Exception as e:
            ok, r = False, e
        if not ok:
            self.wrong.append(f"{what}: {getattr(r, 'status_code', r)} {getattr(r, 'text', '')[:200]}")

    async def client(self, client: object, queue: asyncio.Queue) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            kind = self.kind()
            self.kinds.append(kind)
            if kind == "invalid":
                await self.invalid(client, i)
            else:
                await self.valid(client, i, kind == "disconnect")
            self.done += 1
            if self.done % self.args.every == 0:
                self.sample()

    async def run(self) -> None:
        import httpx2 as httpx

        queue: asyncio.Queue = asyncio.Queue()
        for i in range(self.args.requests):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=self.args.clients + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            self.sample()
            await asyncio.gather(*(self.client(client, queue) for _ in range(self.args.clients)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--disconnect", type=float, default=0.05, help="fraction that hang up mid-stream")
    p.add_argument("--invalid", type=float, default=0.05, help="fraction with an invalid body")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--every", type=int, default=100, help="sample RSS every this many requests")
    p.add_argument("--json-out", help="write the curve and the counts here")
    p.add_argument("server_args", nargs="*", help="extra `leanlm serve` flags (after --)")
    args = p.parse_args()
    print(f"# bench_soak: {args.requests} streaming requests from {args.clients} clients, "
          f"{args.disconnect:.0%} hang up mid-stream, {args.invalid:.0%} invalid, max_tokens "
          f"{args.max_tokens}; server flags {args.server_args or 'default'}")
    print(f"# machine: {machine_line()}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "leanlm.cli", "serve", "--port", str(port), "--api-key", KEY,
           *args.server_args]
    env_key = os.environ.pop("LEANLM_API_KEY", None)
    proc = start_server(cmd, url, "/health")  # (the model list needs the key)
    try:
        soak = Soak(args, url, proc.pid)
        wall = time.perf_counter()
        asyncio.run(soak.run())
        wall = time.perf_counter() - wall
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if env_key is not None:
            os.environ["LEANLM_API_KEY"] = env_key
    counts = {k: soak.kinds.count(k) for k in ("valid", "disconnect", "invalid")}
    print(f"{args.requests} requests in {wall:.0f} s: {counts}")
    print("RSS curve (requests done, seconds, MiB): "
          + ", ".join(f"({n}, {t:.0f}, {m:.0f})" for n, t, m in soak.rss))
    third = args.requests // 3
    first = next(m for n, _, m in soak.rss if n >= third)
    last = soak.rss[-1][2]
    growth = (last - first) / first
    print(f"RSS after the first third ({third} requests): {first:.1f} MiB; after the last third "
          f"({soak.rss[-1][0]}): {last:.1f} MiB ({growth:+.1%}); peak {max(m for *_, m in soak.rss):.1f} MiB")
    late = [m for n, _, m in soak.rss if n >= third]
    print(f"RSS from the first third on: median {statistics.median(late):.1f} MiB, "
          f"min {min(late):.1f}, max {max(late):.1f}")
    print(f"failures among valid requests: {len(soak.failures)}; invalid requests not refused "
          f"with a 4xx and an OpenAI error: {len(soak.wrong)}")
    for f in (soak.failures + soak.wrong)[:10]:
        print("  ", f)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"counts": counts, "rss": soak.rss, "failures": soak.failures, "wrong": soak.wrong,
                       "wall_s": wall, "machine": machine_line()}, f, indent=1)


if __name__ == "__main__":
    main()
