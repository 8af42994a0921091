"""Property-based fuzzing (schemathesis) of the server's own OpenAPI schema, against the server as
`leanlm serve` runs it: no 5xx, no schema violation, no hang, and the server keeps serving
afterwards."""

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
    proc, url = serve_fixtures.start_split(path)  # as `leanlm serve` runs: its engine core in a process
    yield url
    assert serve_fixtures.stop_split(proc) == 0


def test_no_server_errors_no_schema_violations_no_hangs(small_server: str) -> None:
    """Positive cases (valid per the schema) name the served model — the hook a CLI run passes
    as SCHEMATHESIS_HOOKS (benchmarks/schemathesis_hooks.py) — so they reach generation; negative
    ones must be refused. Every response is checked by schemathesis's checks: no 5xx, status codes,
    content types, headers and bodies as documented, invalid data rejected, the key enforced. Not
    ``positive_data_acceptance``: a schema-valid request can still be refused for what JSON Schema
    cannot say (prompt tokens + max_tokens past the context, min_tokens > max_tokens)."""
    from hypothesis import given
    from schemathesis.checks import positive_data_acceptance
    from schemathesis.generation import GenerationMode

    headers = {"Authorization": f"Bearer {serve_fixtures.KEY}"}
    schema = schemathesis.openapi.from_url(f"{small_server}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7  # completions, chat, models, tokenize, detokenize, health, metrics

    statuses: list[tuple[str, int]] = []

    def check(case: object, positive: bool) -> None:
        if positive and isinstance(case.body, dict) and case.path.startswith("/v1/"):
            case.body["model"] = "tiny"  # the hook: the served name (also the schema's enum)
        response = case.call_and_validate(headers=headers, timeout=60,  # a hang fails as a timeout
                                          excluded_checks=[positive_data_acceptance])
        statuses.append((case.path, response.status_code))

    def fuzzer(positive: bool) -> Callable[[object], None]:
        def fuzz(case: object) -> None:
            check(case, positive)
        return fuzz

    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # negative cases need something to make invalid: a body
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            run = given(case=strategy)(fuzzer(mode == GenerationMode.POSITIVE))
            settings(max_examples=25, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))(run)()
    generated = sum(1 for path, code in statuses if path.endswith("completions") and code == 200)
    refused = sum(1 for path, code in statuses if path.endswith("completions") and code == 400)
    assert generated >= 5 and refused >= 5  # the fuzz reached generation, not only validation
    assert all(code < 500 for _, code in statuses)


def test_still_serving_after_the_fuzzing(small_server: str) -> None:
    import httpx2 as httpx

    r = httpx.post(f"{small_server}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {serve_fixtures.KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
