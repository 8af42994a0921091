"""The embedded default and draft models: present, HF-loadable, readable, card reproducible."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from leanlm import DEFAULT_MODEL, DRAFT_MODEL, load_model, load_tokenizer
from leanlm.config import ModelConfig
from leanlm.generate import generate_text
from leanlm.sampling import SamplingParams


def card_losses(path: Path) -> dict[str, float]:
    """Per-domain validation losses from the model card's table rows ``| domain | loss | ...``."""
    rows = re.findall(r"^\| (code|docs|literature) \| ([\d.]+) \|", (path / "README.md").read_text(), re.M)
    return {d: float(v) for d, v in rows}


def test_shipped_models_are_small_and_share_a_tokenizer():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.parent.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    big = ModelConfig.from_json_file(DEFAULT_MODEL / "config.json")
    small = ModelConfig.from_json_file(DRAFT_MODEL / "config.json")
    assert big.model_type == "llama" and 10e6 <= big.num_parameters() <= 30e6
    assert small.num_parameters() < big.num_parameters() / 3
    assert 8192 <= big.vocab_size <= 16384 and small.vocab_size == big.vocab_size
    assert (DEFAULT_MODEL / "tokenizer.json").read_bytes() == (DRAFT_MODEL / "tokenizer.json").read_bytes()
    assert set(card_losses(DEFAULT_MODEL)) == {"code", "docs", "literature"}
    assert set(card_losses(DRAFT_MODEL)) == {"code", "docs", "literature"}


@pytest.mark.parametrize("path", [DEFAULT_MODEL, DRAFT_MODEL], ids=["default", "draft"])
def test_transformers_loads_it_with_the_same_logits(path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype="float32")
    tok = load_tokenizer(path)
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(path).encode("def f") == tok.encode("def f")


@pytest.mark.parametrize(("prompt", "expect"), [
    ("def ", r"\(|\):|return|self"),
    ("This function returns", r":class:|:func:|\b(the|of|to|and|is|a)\b"),
    ("KING HENRY.\n", r"\b(the|and|of|my|I|to|you)\b"),
])
def test_generates_readable_text_in_each_domain(prompt, expect):
    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    text = generate_text(model, tok, prompt, SamplingParams(max_tokens=40, temperature=0.0))
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(text) > 40 and len(words) >= 5, text
    assert sum(c.isascii() for c in text) / len(text) > 0.95, text
    assert re.search(expect, text), text


def test_cli_uses_the_default_model_when_none_is_named():
    out = subprocess.run([sys.executable, "-m", "leanlm.cli", "generate", "--prompt", "def ",
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 4  # the completion of "def " (the prompt is not echoed)


def test_model_card_code_loss_is_reproduced(tmp_path):
    """Rebuild the card's ``code`` validation split from this Python's standard library and
    score it: within 1% of the card (same Python version as the card's data, else skipped)."""
    card = (DEFAULT_MODEL / "README.md").read_text()
    version = re.search(r"CPython (\d+\.\d+\.\d+) standard library", card).group(1)
    if sys.version.split()[0] != version:
        pytest.skip(f"the card's code split is CPython {version}'s stdlib; this is {sys.version.split()[0]}")
    from leanlm.data.corpus import build_corpus
    from leanlm.data.tokens import load_tokens, tokenize_corpus
    from leanlm.eval.perplexity import stream_loss

    build_corpus(tmp_path / "corpus", {"code": Path(sysconfig.get_paths()["stdlib"])})
    tok = load_tokenizer(DEFAULT_MODEL)
    files = tokenize_corpus(tmp_path / "corpus", tok, tmp_path / "tokens", tok.eos_token_id)
    model = load_model(DEFAULT_MODEL, dtype="float32")
    total, count = stream_loss(model, load_tokens(files["code"]["val"]), 512, tok.eos_token_id)
    expected = card_losses(DEFAULT_MODEL)["code"]
    assert abs(total / count - expected) / expected < 0.01
