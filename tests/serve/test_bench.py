"""``leanlm bench serve``: the metric definitions, prompt sources and a run against a live server."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import serve_fixtures

from leanlm.errors import LeanLMError
from leanlm.serve import bench

server = serve_fixtures.server  # the module-scoped live-server fixture (API key required)


def test_summary_follows_vllms_definitions() -> None:
    a = bench.RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5,
                            itl=[0.1, 0.1, 0.1, 0.1])
    b = bench.RequestResult(ok=True, prompt_tokens=20, output_tokens=1, ttft=0.2, latency=0.2)
    failed = bench.RequestResult(ok=False, error="HTTP 500")
    s = bench.summarize([a, b, failed], duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 500"])
    assert s["output_throughput"] == 3.0 and s["request_throughput"] == 1.0
    assert s["total_token_throughput"] == 18.0
    assert math.isclose(s["mean_tpot_ms"], 100.0)  # (0.5 - 0.1) / (5 - 1); b has no TPOT
    assert math.isclose(s["median_ttft_ms"], 150.0) and math.isclose(s["median_e2el_ms"], 350.0)
    assert math.isclose(s["p99_itl_ms"], 100.0)


def test_arrivals() -> None:
    burst = bench.schedule(["a", "b"], 5, 8, float("inf"))
    assert [r.prompt for r in burst] == ["a", "b", "a", "b", "a"] and {r.delay for r in burst} == {0.0}
    poisson = bench.schedule(["a"], 2000, 8, rate=50.0, seed=1)
    gaps = [y.delay - x.delay for x, y in itertools.pairwise(poisson)]
    assert min(gaps) >= 0 and abs(sum(gaps) / len(gaps) - 1 / 50) < 0.002  # mean gap 1/rate
    with pytest.raises(LeanLMError, match="rate"):
        bench.schedule(["a"], 3, 8, rate=0.0)


def test_prompt_files(tmp_path: Path) -> None:
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x"}\n\n{"text": "y"}\n')
    assert bench.file_prompts(jl) == ["x", "y"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert bench.file_prompts(txt) == ["one", "two"]
    with pytest.raises(LeanLMError, match="does not exist"):
        bench.file_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(LeanLMError, match=r"bad.jsonl:1: expected"):
        bench.file_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(LeanLMError, match="no prompts"):
        bench.file_prompts(tmp_path / "empty.txt")


def test_run_against_a_live_server(server: str) -> None:
    requests = bench.schedule(["def f(x):", "import os"], 6, 7, float("inf"))
    results, wall = asyncio.run(bench.run(f"{server}/v1", requests, api_key=serve_fixtures.KEY,
                                          max_concurrency=2, extra={"ignore_eos": True, "temperature": 0}))
    assert all(r.ok for r in results) and wall > 0
    assert {r.output_tokens for r in results} == {7}  # from the usage chunk
    assert all(r.prompt_tokens > 0 and 0 < r.ttft <= r.latency for r in results)
    unauthorized, _ = asyncio.run(bench.run(f"{server}/v1", requests[:1], model="tiny"))
    assert not unauthorized[0].ok and "HTTP 401" in unauthorized[0].error


def test_cli_sweeps_concurrency_and_writes_json(server: str, tmp_path: Path) -> None:
    out, prompts = tmp_path / "bench.json", tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nclass A:\n")
    proc = subprocess.run([sys.executable, "-m", "leanlm.cli", "bench", "serve", "--base-url", f"{server}/v1",
                           "--api-key", serve_fixtures.KEY, "--num-prompts", "4", "--max-concurrency", "1,4",
                           "--dataset", str(prompts), "--output-len", "5", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())
    assert [r["max_concurrency"] for r in runs] == [1, 4]
    assert all(r["completed"] == 4 and r["total_output_tokens"] == 20 for r in runs)
    assert "TTFT" in proc.stdout


def test_cli_reports_an_unreachable_server_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "leanlm.cli", "bench", "serve", "--base-url",
                           "http://127.0.0.1:9/v1", "--num-prompts", "1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot list the models")
