"""Property-based fuzzing (schemathesis) of the server's own OpenAPI schema: no 5xx, no hang, and
the server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")

import serve_fixtures  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from conftest import hf_config, write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 64-token context, so that any fuzzed max_tokens x n stays a bounded amount of work."""
    import transformers

    path = tmp_path_factory.mktemp("fuzz") / "m"
    cfg = hf_config("llama")
    cfg.max_position_embeddings = 64
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    write_tokenizer(path)
    srv, thread, url = serve_fixtures.start_server(path)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def test_no_server_errors_and_no_hangs(small_server: str) -> None:
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{small_server}/openapi.json")
    headers = {"Authorization": f"Bearer {serve_fixtures.KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7  # completions, chat, models, tokenize, detokenize, health, metrics

    statuses: list[tuple[str, int]] = []

    def check(case: object, pin_model: bool) -> None:
        if pin_model and isinstance(case.body, dict):  # the served name: the fuzz reaches generation
            case.body["model"] = "tiny"
        response = case.call(headers=headers, timeout=60)  # a hang fails as a timeout
        statuses.append((case.path, response.status_code))
        assert response.status_code < 500, (case.path, response.status_code, response.text[:300])

    def fuzzer(pin_model: bool) -> Callable[[object], None]:
        def fuzz(case: object) -> None:
            check(case, pin_model)
        return fuzz

    for operation in operations:
        for pin_model in (False, True):
            run = given(case=operation.as_strategy())(fuzzer(pin_model))
            settings(max_examples=25, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))(run)()
    generated = sum(1 for path, code in statuses if path.endswith("completions") and code == 200)
    refused = sum(1 for path, code in statuses if path.endswith("completions") and code == 400)
    assert generated >= 5 and refused >= 5  # the fuzz reached generation, not only validation


def test_still_serving_after_the_fuzzing(small_server: str) -> None:
    import httpx2 as httpx

    r = httpx.post(f"{small_server}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {serve_fixtures.KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
