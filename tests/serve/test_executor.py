"""Executors: the engine over worker processes gives the in-process engine's outputs, and a dead
worker is an error within seconds, not a hang."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import build_hf_model
from leanlm.checkpoint import load_model
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import LLM, EngineConfig, LLMEngine
from leanlm.serve.executor import EngineDeadError, MultiprocExecutor
from leanlm.serve.worker import WorkerSpec

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def _engine(path: Path, world: int, config: EngineConfig) -> LLMEngine:
    model_config = load_model(path).config
    make = lambda spec: MultiprocExecutor(replace(spec, model=str(path), dtype="float32"), world)
    return LLMEngine.with_executor(model_config, config, load_model(path).embed_tokens.weight.dtype,
                                   world, make)


def _run(engine: LLMEngine, params: SamplingParams) -> list[list[int]]:
    requests = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished_requests():
        engine.step()
    return [r.output_token_ids for r in requests]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("exec") / "llama"
    build_hf_model("llama").save_pretrained(path)
    return path


def test_a_worker_process_gives_the_in_process_outputs(llama: Path) -> None:
    config = EngineConfig(block_size=4, num_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    want = LLM(load_model(llama), config).generate(PROMPTS, params)
    engine = _engine(llama, 1, config)
    try:
        assert _run(engine, params) == want
        seeded = SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True)
        assert _run(engine, seeded) == LLM(load_model(llama), config).generate(PROMPTS, seeded)
    finally:
        engine.executor.shutdown()


def test_a_killed_worker_fails_the_step_within_seconds(llama: Path) -> None:
    engine = _engine(llama, 1, EngineConfig(block_size=4, num_blocks=64))
    try:
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        os.kill(engine.executor.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="died"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 10
    finally:
        engine.executor.shutdown()


def test_the_worker_spec_round_trips() -> None:
    spec = WorkerSpec(8, 4, "auto", False, 2, model="m", dtype="float32")
    assert replace(spec, threads=1).threads == 1
