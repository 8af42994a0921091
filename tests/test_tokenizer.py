"""tokenizer.json + chat templates agree with transformers; streaming decode never splits characters."""

from __future__ import annotations

import json

import pytest

from conftest import CORPUS, write_tokenizer
from leanlm import LeanLMError
from leanlm.tokenizer import IncrementalDecoder, load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo ✓"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "def f():"}]


@pytest.fixture
def tok_dir(tmp_path):
    return write_tokenizer(tmp_path / "tok")


def hf_tokenizer(path):
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                                bos_token="<s>", eos_token="</s>")


def test_encode_decode_match_transformers(tok_dir):
    ours, hf = load_tokenizer(tok_dir), hf_tokenizer(tok_dir)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in [*CORPUS[:4], "", "  spaces  and\ttabs\n"]:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir, add_generation_prompt):
    import transformers

    ours = load_tokenizer(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt) == expected
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(MESSAGES, add_generation_prompt) == list(ids)


def test_chat_template_sees_special_tokens(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}")
    assert load_tokenizer(tok_dir).apply_chat_template(MESSAGES[:1]) == "<s>Be brief.</s>"


def test_chat_template_file_and_errors(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LeanLMError, match="no chat template"):
        load_tokenizer(tok_dir).apply_chat_template(MESSAGES)
    (tok_dir / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(LeanLMError, match="only user turns"):
        load_tokenizer(tok_dir).apply_chat_template(MESSAGES)
    (tok_dir / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(LeanLMError, match="does not parse"):
        load_tokenizer(tok_dir).apply_chat_template(MESSAGES)


def test_chat_template_is_sandboxed(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        load_tokenizer(tok_dir).apply_chat_template(MESSAGES)


def test_incremental_decoding_never_breaks_characters(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "héllo wörld — 日本語のテキスト ✓ def main(): return 0"
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # byte-level BPE splits multi-byte characters across tokens: some pushes must hold text back
    assert any(d == "" for d in deltas)


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(LeanLMError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LeanLMError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
