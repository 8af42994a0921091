"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family, built offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels run in Triton's CPU interpreter; Triton reads this when a kernel
# is decorated, so it is set before anything imports leanlm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 320  # tokenizer fixtures use 300 ids, all inside the model vocabulary

# family name -> (transformers config class name, kwargs). 2 layers, hidden 32-64, GQA where the
# family has it; rope scaling, biases, q/k norm and sliding windows exercised where they exist.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "llama3-rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256,
                                        rope_theta=500000.0, tie_word_embeddings=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32})),
    "llama-linear-rope": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64,
                                              num_attention_heads=4, num_key_value_heads=4,
                                              attention_bias=True, mlp_bias=True,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-sliding": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, use_sliding_window=True,
                                          sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_positions=128)),
}


def hf_config(family: str) -> Any:
    import transformers

    cls_name, kwargs = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    if cls_name == "GPT2Config":
        return cls(vocab_size=VOCAB, n_layer=2, bos_token_id=0, eos_token_id=1, **kwargs)
    return cls(vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=0, eos_token_id=1, **kwargs)


def build_hf_model(family: str, seed: int = 0) -> Any:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    # HF init leaves norms at 1 and biases at 0: randomise them so the test can see a mix-up.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def make_hf_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Save a tiny random transformers model of ``family`` to a temp dir and return the path."""

    def make(family: str, seed: int = 0, **save_kwargs: Any) -> Path:
        model = build_hf_model(family, seed)
        out = tmp_path / f"{family}-{seed}"
        model.save_pretrained(out, **save_kwargs)
        return out

    return make


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog.",
          "héllo wörld — ünïcode ✓ 日本語のテキスト", "To be, or not to be: that is the question."] * 20


def write_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """Train a tiny byte-level BPE (with BOS/EOS and a ChatML template) into ``path``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}))
    return path


WORDS = ["the", "a", "king", "queen", "code", "def", "return", "import", "class", "value", "list",
         "dict", "loop", "data", "model", "token", "train", "sleep", "dream", "night", "day",
         "love", "war", "peace", "python", "module", "function", "print", "if", "else"]


def synthetic_texts(n_docs: int, seed: int, style: str) -> list[str]:
    """Deterministic pseudo-text: code-like lines for ``code``, sentences otherwise."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
            if style == "code":
                lines.append(f"def {words[0]}_{words[1]}({words[2]}):\n    return {' + '.join(words[3:])}")
            else:
                lines.append(" ".join(words).capitalize() + ".")
        docs.append("\n".join(lines) + "\n")
    return docs


def write_corpus(root: Path, n_docs: int = 60) -> Path:
    """A 3-domain corpus (``leanlm corpus build`` over generated source files) in ``root``."""
    from leanlm.data.corpus import build_corpus

    sources = {}
    for i, (domain, style, ext) in enumerate((("code", "code", ".py"), ("docs", "prose", ".rst"),
                                              ("literature", "prose", ".txt"))):
        src = root / "src" / domain
        src.mkdir(parents=True, exist_ok=True)
        for j, text in enumerate(synthetic_texts(n_docs, seed=i, style=style)):
            (src / f"doc{j:03d}{ext}").write_text(text)
        sources[f"my{domain}"] = src  # generic reader: any .py/.rst/.txt file is a document
    build_corpus(root / "corpus", sources, val_fraction=0.2)
    return root / "corpus"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus dir, tokenizer dir) shared by the training tests."""
    root = tmp_path_factory.mktemp("tiny_data")
    return write_corpus(root), write_tokenizer(root / "tok")


def tiny_config(data: tuple[Path, Path], out: Path, *overrides: str) -> Any:
    """The ``tiny`` recipe on the tiny data, fp32, silent, writing to ``out``."""
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides

    base = [f"data={data[0]}", f"tokenizer={data[1]}", f"out={out}", "precision=fp32",
            "progress=false", "eval_windows=2"]
    return apply_overrides(get_recipe("tiny"), base + list(overrides))


def pretrain_command(data: tuple[Path, Path], out: Path, *sets: str, nproc: int = 1, steps: int = 5,
                     extra: tuple[str, ...] = (), max_restarts: int = 0) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of ``leanlm pretrain --recipe tiny`` (fp32, a checkpoint every 3 steps) on the
    tiny data, in one process or under ``torchrun --nproc-per-node nproc`` on gloo."""
    import sys

    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 f"--max-restarts={max_restarts}"] if nproc > 1 else [sys.executable])
    args = [*launcher, "-m", "leanlm.cli", "pretrain", "--recipe", "tiny", "--quiet",
            "--data", str(data[0]), "--tokenizer", str(data[1]), "--out", str(out),
            "--max-steps", str(steps), *extra]
    for s in ("precision=fp32", "eval_every=0", "log_every=1", "ckpt_every=3", *sets):
        args += ["--set", s]
    return args, {**os.environ, "OMP_NUM_THREADS": "1"}


def step_records(out: Path) -> list[dict[str, Any]]:
    """The step records (loss, grad_norm, ...) of a run's metrics.jsonl."""
    import json

    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def pretrain_records(data: tuple[Path, Path], out: Path, *sets: str, nproc: int = 1, steps: int = 5,
                     extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run :func:`pretrain_command` to the end; the step records of its metrics.jsonl."""
    import subprocess

    args, env = pretrain_command(data, out, *sets, nproc=nproc, steps=steps, extra=extra)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return step_records(out)


def random_model(family: str = "llama", seed: int = 0, outliers: float = 0.0) -> Any:
    """A tiny random leanlm Transformer (fp32, eval) of ``family``; ``outliers`` > 0 multiplies
    a few channels of every norm weight by that factor (LLM-like activation outliers)."""
    from leanlm.config import ModelConfig
    from leanlm.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf_config(family).to_dict()))
    model.init_weights(std=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
                if outliers and name.endswith("layernorm.weight"):
                    p[:3] *= outliers
    return model.eval()
