"""Tokenizer training: byte-level BPE that round-trips text and loads in transformers."""

from __future__ import annotations

import pytest

from leanlm.errors import LeanLMError
from leanlm.tokenizer import load_tokenizer
from leanlm.train.bpe import EOS, train_tokenizer


def test_train_tokenizer_roundtrips_and_loads_in_transformers(tiny_data, tmp_path):
    out = train_tokenizer(tiny_data[0], tmp_path / "tok", vocab_size=400, show_progress=False)
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400 and tok.eos_token == EOS
    text = "def king_queen(value):\n    return data + ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(out)
    assert hf.encode(text) == tok.encode(text)
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(LeanLMError, match="vocab_size must be"):
        train_tokenizer(tiny_data[0], tmp_path / "bad", vocab_size=100)
