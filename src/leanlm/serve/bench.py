"""``leanlm bench serve``: load-test any OpenAI-compatible completions endpoint.

The same command measures leanlm and a peer (vLLM, llama.cpp's server, ...): it only speaks
the OpenAI API. Metric definitions are those of vLLM's ``benchmark_serving.py``:

- TTFT: request sent -> first streamed chunk;
- TPOT: (E2E latency - TTFT) / (output tokens - 1), per request;
- ITL: the gaps between successive streamed chunks;
- E2EL: request sent -> last chunk;
- output throughput: output tokens of all completed requests / the benchmark's wall time
  (request throughput and total token throughput likewise).

Output tokens are the server's ``usage.completion_tokens`` when it honours
``stream_options.include_usage``, else ``max_tokens`` for a request that finished by length,
else the number of non-empty chunks (one token each on servers that stream token by token).

Arrivals are all at once (``rate = inf``) or a Poisson process of ``rate`` requests/s
(exponential gaps, seeded); ``max_concurrency`` caps the requests in flight. Prompts are random
token ids of a tokenizer decoded to text (vLLM's "random" dataset) or come from a file: JSONL
with a "prompt" (or "text") field per line, or plain text with one prompt per non-empty line.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanlm.errors import LeanLMError
from leanlm.fsutil import json_lines
from leanlm.tokenizer import Tokenizer


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (the same tokens for servers that tokenize apart)
    max_tokens: int
    user: str | None = None  # the OpenAI `user` (leanlm's fair scheduler serves by it)
    delay: float = 0.0  # seconds after the start at which it is sent


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    user: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def random_prompts(tokenizer: Tokenizer, n: int, input_len: int, seed: int = 0,
                   ids: bool = False) -> list[str] | list[list[int]]:
    """vLLM's random dataset: ``input_len`` uniformly random token ids (special tokens excluded)
    decoded to text, or kept as ids (``ids=True``)."""
    rng = random.Random(seed)
    special = special_ids(tokenizer)
    pool = [t for t in range(tokenizer.vocab_size) if t not in special]
    prompts = [[rng.choice(pool) for _ in range(input_len)] for _ in range(n)]
    return prompts if ids else [tokenizer.decode(p) for p in prompts]


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (which servers do not render as text)."""
    return {i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special}


def file_prompts(path: Path) -> list[str]:
    """Prompts of a JSONL file ("prompt" or "text" per line) or a text file (one per line)."""
    if not path.is_file():
        raise LeanLMError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        out = [line for line in lines if line.strip()]
    else:
        out = []
        for i, row in json_lines(lines, path):
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LeanLMError(f'{path}:{i}: expected an object with a "prompt" or "text" string')
            out.append(text)
    if not out:
        raise LeanLMError(f"prompt file {path} has no prompts")
    return out


def schedule(prompts: Sequence[str | list[int]], n: int, max_tokens: int, rate: float,
             seed: int = 0) -> list[BenchRequest]:
    """``n`` requests cycling through ``prompts``, sent all at once or as a Poisson process."""
    if n < 1 or max_tokens < 1 or not rate > 0:
        raise LeanLMError(f"need num_prompts >= 1, max_tokens >= 1 and rate > 0 "
                          f"(got {n}, {max_tokens}, {rate})")
    gaps = np.random.default_rng(seed).exponential(1 / rate, n) if math.isfinite(rate) else np.zeros(n)
    times = np.cumsum(gaps) - gaps[0]
    return [BenchRequest(prompts[i % len(prompts)], max_tokens, delay=float(t)) for i, t in enumerate(times)]


async def _whole(client: object, url: str, body: dict, headers: dict[str, str], result: RequestResult,
                 sent: float) -> RequestResult:
    """A non-streaming request: its latency is its TTFT too."""
    r = await client.post(f"{url}/completions", json=body, headers=headers)  # type: ignore[attr-defined]
    if r.status_code != 200:
        result.error = f"HTTP {r.status_code}: {r.text[:200]}"
        return result
    usage = r.json()["usage"]
    result.ok = True
    result.ttft = result.latency = time.perf_counter() - sent
    result.output_tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    return result


async def _one(client: object, url: str, model: str, req: BenchRequest, headers: dict[str, str],
               extra: dict, start: float, sem: asyncio.Semaphore | None,
               stream: bool = True) -> RequestResult:
    await asyncio.sleep(max(0.0, start + req.delay - time.perf_counter()))
    if sem is not None:
        await sem.acquire()
    if not stream:
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, **extra}
        try:
            return await _whole(client, url, body, headers, RequestResult(ok=False, user=req.user),
                                time.perf_counter())
        except Exception as e:  # a failed request is reported, not fatal to the run
            return RequestResult(ok=False, error=f"{type(e).__name__}: {e}", user=req.user)
        finally:
            if sem is not None:
                sem.release()
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    if req.user is not None:
        body["user"] = req.user
    result = RequestResult(ok=False, user=req.user)
    sent = time.perf_counter()
    chunks: list[float] = []
    usage, reason = None, None
    try:
        async with client.stream("POST", f"{url}/completions", json=body, headers=headers) as r:  # type: ignore[attr-defined]
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    usage = data["usage"]
                choices = data.get("choices") or ()
                if choices:  # a token, even one whose text is empty (as vLLM's benchmark counts them)
                    chunks.append(time.perf_counter())
                reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")), reason)
        end = time.perf_counter()
    except Exception as e:  # a failed request is reported, not fatal to the run
        result.error = f"{type(e).__name__}: {e}"
        return result
    finally:
        if sem is not None:
            sem.release()
    if not chunks:
        result.error = "no tokens streamed"
        return result
    result.ok = True
    result.ttft, result.latency = chunks[0] - sent, end - sent
    result.itl = list(np.diff(chunks))
    # without a usage chunk: a request that ran to its length made max_tokens tokens; else one
    # token per chunk
    result.output_tokens = (usage["completion_tokens"] if usage
                            else req.max_tokens if reason == "length" else len(chunks))
    result.prompt_tokens = usage["prompt_tokens"] if usage else 0
    return result


async def run(url: str, requests: list[BenchRequest], model: str | None = None, api_key: str | None = None,
              max_concurrency: int | None = None, extra: dict | None = None,
              timeout: float = 600.0, stream: bool = True,
              keepalive: bool = True) -> tuple[list[RequestResult], float]:
    """Send ``requests`` to ``url`` (the API base, e.g. http://127.0.0.1:8000/v1), streamed or
    not; returns the results in request order and the wall time. ``model`` defaults to the
    server's first. ``keepalive=False`` opens a connection per request: a server that closes
    idle kept-alive connections (llama-server's cpp-httplib, after 5 s) can otherwise close one
    just as a request is sent on it."""
    import httpx2 as httpx

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            try:
                listed = (await client.get(f"{url}/models", headers=headers)).json()["data"]
            except Exception as e:
                raise LeanLMError(f"cannot list the models of {url} ({type(e).__name__}: {e}); "
                                  f"is a server running there? (or pass --model)") from None
            model = listed[0]["id"]
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, model, r, headers, extra or {}, start, sem, stream)
                                         for r in requests))
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM's benchmark_serving summary (times in ms)."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    summary: dict = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    series = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
              "itl": [g for r in done for g in r.itl], "e2el": [r.latency for r in done]}
    for name, xs in series.items():
        ms = np.asarray(xs, dtype=float) * 1000
        for stat, f in (("mean", np.mean), ("median", np.median), ("p99", lambda a: np.percentile(a, 99))):
            summary[f"{stat}_{name}_ms"] = float(f(ms)) if len(ms) else float("nan")
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary
