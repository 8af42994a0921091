"""Recipes: Python functions that return a :class:`TrainConfig` (the torchtitan / litgpt way).

``leanlm pretrain --recipe NAME --set key=value ...`` starts from one of these. The embedded
default model (``assets/default``) is ``default``; the speculative-decoding draft
(``assets/draft``) is ``draft``; ``tiny`` is what the tests and the CI use; ``llama-3.2-1b`` is
the Llama 3.2 1B shape for GPU runs and memory planning.
"""

from __future__ import annotations

from collections.abc import Callable

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.train.config import TrainConfig


def _llama(vocab: int, hidden: int, layers: int, inter: int, heads: int, kv_heads: int,
           context: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, max_position_embeddings=context, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def tiny() -> TrainConfig:
    """A 2-layer, 64-wide Llama for tests: seconds per step on one CPU core."""
    return TrainConfig(model=_llama(512, 64, 2, 128, 4, 2, 256), seq_len=64, micro_batch=4,
                       max_steps=20, warmup_steps=2, lr=3e-3, eval_every=10, eval_windows=4,
                       ckpt_every=10, log_every=1, out="runs/tiny")


def default() -> TrainConfig:
    """The embedded default model: ~10M parameters, 8192-token BPE, 512 context (1 h on 2 cores)."""
    return TrainConfig(model=_llama(8192, 320, 6, 864, 5, 5, 1024), seq_len=512, micro_batch=16,
                       max_steps=2000, warmup_steps=100, lr=3e-3, min_lr_ratio=0.1,
                       schedule="wsd", decay_fraction=0.25, eval_every=250, eval_windows=16,
                       ckpt_every=100, log_every=10, export_dtype="bfloat16", out="runs/default")


def draft() -> TrainConfig:
    """The speculative-decoding draft: ~2M parameters, same tokenizer as ``default``."""
    return TrainConfig(model=_llama(8192, 128, 2, 384, 2, 2, 1024), seq_len=512, micro_batch=16,
                       max_steps=6000, warmup_steps=100, lr=4e-3, schedule="wsd",
                       decay_fraction=0.25, eval_every=1000, eval_windows=16, ckpt_every=250,
                       log_every=10, export_dtype="bfloat16", out="runs/draft")


def llama_3_2_1b() -> TrainConfig:
    """Llama 3.2 1B's shape (random init) with FSDP + selective AC: a GPU recipe."""
    return TrainConfig(model=ModelConfig.from_preset("llama-3.2-1b"), seq_len=2048,
                       micro_batch=4, grad_accum=8, max_steps=10000, warmup_steps=1000, lr=3e-4,
                       ac="selective", parallel="fsdp", out="runs/llama-3.2-1b")


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny, "default": default, "draft": draft, "llama-3.2-1b": llama_3_2_1b}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise LeanLMError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]()
