"""The asyncio front of the engine thread: a failure in the engine thread fails only the
requests at fault (see the module docstring of ``async_engine.py``)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import build_hf_model, write_tokenizer
from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.serve.async_engine import AsyncLLMEngine
from leanlm.serve.engine import LLM, EngineConfig, LLMEngine
from leanlm.serve.request import SamplingParams
from leanlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("async") / "m"
    build_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    return path


async def _run(engine: AsyncLLMEngine, rid: str, prompt: list[int],
               seed: int | None = None) -> tuple[list[int], Any]:
    params = SamplingParams(max_tokens=6, seed=seed, temperature=0, ignore_eos=True)
    request = engine.make_request(prompt, params, rid)
    outs = [out async for out in engine.generate(request)]
    return [t for out in outs for t in out.token_ids], outs[-1]


def test_suspects_that_arrive_together_are_tried_one_at_a_time(model_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Four new requests enter one step and two of them make it fail: the step is rolled back,
    the four are re-added one per step, the two fail alone (400: a LeanLMError), and every other
    request — the new ones and one that was running — ends as it would have without them."""
    model = load_model(model_path)
    core = LLMEngine(model, EngineConfig(block_size=4, num_blocks=256))
    engine = AsyncLLMEngine(core, load_tokenizer(model_path))
    gate, step, update = threading.Event(), core.step, core.runner._update_states

    def gated() -> Any:  # the engine thread waits in its first step until the others are queued
        gate.wait()
        return step()

    def faulty(out: Any) -> None:  # the runner fails to take a new request seeded 7 or 9
        for new in out.new_requests:
            if new.sampling_params.seed in (7, 9):
                raise LeanLMError(f"bad seed {new.sampling_params.seed}")
        update(out)

    monkeypatch.setattr(core, "step", gated)
    monkeypatch.setattr(core.runner, "_update_states", faulty)
    prompts = {seed: [1 + seed, 2, 3, 4, 5] for seed in (1, 7, 2, 9, 3)}

    def run(seed: int) -> Any:
        return _run(engine, f"r{seed}", prompts[seed], seed)

    async def main() -> dict[int, tuple[list[int], Any]]:
        first = asyncio.ensure_future(run(1))
        await asyncio.sleep(0.3)  # the engine thread holds r1, blocked in its step
        rest = {seed: asyncio.ensure_future(run(seed)) for seed in (7, 2, 9, 3)}
        await asyncio.sleep(0.3)
        gate.set()
        return {1: await first, **{seed: await task for seed, task in rest.items()}}

    results = asyncio.run(main())
    for seed in (7, 9):
        last = results[seed][1]
        assert last.finish_reason == "error" and last.error_status == 400 and last.error == f"bad seed {seed}"
    reference = LLM(model, EngineConfig(block_size=4, num_blocks=256)).generate(
        [prompts[s] for s in (1, 2, 3)], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for seed, expected in zip((1, 2, 3), reference, strict=True):
        assert results[seed][1].finish_reason == "length" and results[seed][0] == expected


def test_a_request_the_scheduler_refuses_fails_alone(model_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    core = LLMEngine(load_model(model_path), EngineConfig(block_size=4, num_blocks=256))
    engine = AsyncLLMEngine(core, load_tokenizer(model_path))
    add = core.scheduler.add_request

    def refusing(request: Any) -> None:
        if request.request_id == "refused":
            raise LeanLMError("refused by the scheduler")
        add(request)

    monkeypatch.setattr(core.scheduler, "add_request", refusing)

    async def main() -> list[Any]:
        return await asyncio.gather(_run(engine, "a", [1, 2, 3]), _run(engine, "refused", [4, 5, 6]),
                                    _run(engine, "b", [7, 8, 9]), _run(engine, "a", [1]),
                                    return_exceptions=True)

    a, refused, b, same_id = asyncio.run(main())
    assert a[1].finish_reason == "length" and len(a[0]) == 6
    assert b[1].finish_reason == "length" and len(b[0]) == 6
    assert refused[1].finish_reason == "error" and refused[1].error_status == 400
    assert refused[1].error == "refused by the scheduler"
    assert isinstance(same_id, LeanLMError) and "already in use" in str(same_id)  # refused up front
