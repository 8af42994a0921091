"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import serve_fixtures  # noqa: E402

KEY = serve_fixtures.KEY
server = serve_fixtures.server  # the module-scoped live-server fixture


def client(url: str) -> object:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_completions_chat_streaming_and_usage(server: str) -> None:
    c = client(server)
    r = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    again = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    chunks = list(c.completions.create(model="tiny", prompt="def f(x):", max_tokens=5,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 1
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == chat.choices[0].message.content
    chunks = list(c.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    many = c.completions.create(model="tiny", prompt="x", max_tokens=3, n=3, temperature=1.0, seed=1)
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2] and many.usage.completion_tokens <= 9


def test_bad_requests_get_openai_errors(server: str) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="tiny", prompt="x " * 5000, max_tokens=2)
    bad = httpx.post(f"{server}/v1/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert client(server).models.list().data[0].id == "tiny"  # still serving


def test_metrics_tokenize_and_health(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    headers = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "hello"}, headers=headers).json()["tokens"]
    text = httpx.post(f"{server}/detokenize", json={"tokens": ids}, headers=headers).json()["prompt"]
    assert text == "hello"
    text = httpx.get(f"{server}/metrics", headers=headers).text
    assert "leanlm_time_to_first_token_seconds_bucket" in text and "leanlm_kv_cache_usage_ratio" in text
    assert "leanlm_spec_decode_num_accepted_tokens_total" in text


def test_disconnected_stream_is_aborted(server: str, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    deadline = time.time() + 10
    while time.time() < deadline:
        text = httpx.get(f"{server}/metrics", headers=headers).text
        if 'leanlm_num_requests_running{engine="0"} 0.0' in text:
            break
        time.sleep(0.05)
    assert 'leanlm_num_requests_running{engine="0"} 0.0' in text


def test_stop_strings_and_logprobs(server: str) -> None:
    c = client(server)
    full = c.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = c.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    r = c.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) == 2 and value == pytest.approx(max(top.values()))  # greedy
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)


def test_echo_with_logprobs_scores_the_prompt(server: str) -> None:
    c = client(server)
    r = c.completions.create(model="tiny", prompt="hello there", max_tokens=3, temperature=0, logprobs=1,
                             echo=True, extra_body={"ignore_eos": True})
    lp, usage = r.choices[0].logprobs, r.usage
    assert r.choices[0].text.startswith("hello there")
    assert len(lp.tokens) == len(lp.token_logprobs) == usage.prompt_tokens + usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
