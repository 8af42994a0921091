"""The tensor-parallel plan: torchrun with 2 and 4 processes on gloo gives the one-process logits,
greedy tokens and gradients (the checks run in ``tp_checks.py``, one launch per mesh size); bad
sizes are refused in one line before any model exists."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import hf_config
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.parallel import check_tensor_parallel, local_kv_heads

CHECKS = Path(__file__).with_name("tp_checks.py")


def torchrun(nproc: int, *checks: str) -> str:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(CHECKS), *checks]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    for check in checks:
        assert proc.stdout.count(f": {check} ok") == nproc, proc.stdout
    return proc.stdout


@pytest.mark.dist
def test_two_ranks_match_one() -> None:
    """Llama (GQA), Qwen3, Mistral, Qwen2 (tied head), biases, GPT-2; GPTQ act-order int4, W8A8
    and RTN int4 on the CPU kernel; two LoRA adapters routed per token, attached before or
    loaded after sharding, on a full-precision and an int4 base; training gradients (base and
    LoRA), with sequence parallelism and the vocabulary-parallel loss too; refusals of a 2-D mesh,
    DoRA, IA3 and odd head counts."""
    torchrun(2, "families", "quantized", "lora", "training", "sequence", "errors")


@pytest.mark.dist
def test_four_ranks_with_fewer_kv_heads_than_ranks() -> None:
    """Llama with 2 K/V heads on 4 ranks: each rank keeps a copy of the head its queries read."""
    assert hf_config("llama").num_key_value_heads == 2
    torchrun(4, "gqa_replicas", "families", "quantized", "lora", "training", "sequence")


def config(**changes: int) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_hf(hf_config("llama").to_dict()), **changes)


@pytest.mark.parametrize(("changes", "tp", "message"), [
    ({}, 3, "tensor parallel size 3 does not divide the model's 4 attention heads"),
    ({}, 8, "tensor parallel size 8 does not divide the model's 4 attention heads"),
    ({"num_heads": 12, "num_kv_heads": 4, "head_dim": 16}, 6,
     "tensor parallel size 6 neither divides the model's 4 key/value heads nor is a multiple of them"),
    ({"intermediate_size": 130}, 4, "tensor parallel size 4 does not divide the model's MLP width 130"),
    ({}, 0, "tensor parallel size must be at least 1, got 0"),
])
def test_sizes_that_do_not_split_are_refused(changes: dict[str, int], tp: int, message: str) -> None:
    with pytest.raises(LeanLMError) as e:
        check_tensor_parallel(config(**changes), tp)
    assert str(e.value) == message


def test_local_kv_heads_is_what_each_rank_caches() -> None:
    c = config()  # 4 query heads, 2 K/V heads
    assert [local_kv_heads(c, tp) for tp in (1, 2, 4)] == [2, 1, 1]
    assert local_kv_heads(config(num_heads=8, num_kv_heads=8, head_dim=8), 4) == 2
