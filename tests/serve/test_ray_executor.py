"""The Ray executor: two ranks as Ray actors on a local Ray instance (CPU) give the outputs of the
multiprocess executor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import build_hf_model
from leanlm.checkpoint import load_model
from leanlm.sampling import SamplingParams
from leanlm.serve.engine import EngineConfig, LLMEngine
from leanlm.serve.executor import MultiprocExecutor

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.dist


def test_ray_actors_give_the_multiprocess_outputs(tmp_path: Path) -> None:
    from leanlm.serve.ray_executor import RayExecutor

    path = tmp_path / "llama"
    build_hf_model("llama").save_pretrained(path)
    config, model_config = EngineConfig(block_size=4, num_blocks=64), load_model(path).config
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12]]
    outputs = []
    for make in (lambda spec: MultiprocExecutor(replace(spec, model=str(path), dtype="float32"), 2),
                 lambda spec: RayExecutor(replace(spec, model=str(path), dtype="float32", threads=1), 2)):
        engine = LLMEngine.with_executor(model_config, config, torch.float32, 2, make)
        try:
            requests = [engine.add_request(p, params) for p in prompts]
            while engine.has_unfinished_requests():
                engine.step()
            outputs.append([(r.output_token_ids, [round(lp, 5) for lp, _ in r.output_logprobs])
                            for r in requests])
        finally:
            engine.executor.shutdown()
    ray.shutdown()
    assert outputs[1] == outputs[0]
