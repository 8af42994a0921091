"""Texts for calibration and perplexity: a corpus's split by domain, text files, the stdlib sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_corpus
from leanlm.data.corpus import read_split
from leanlm.data.text import default_texts, read_texts
from leanlm.errors import LeanLMError


def test_a_corpus_dir_gives_its_split_of_each_domain(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_docs=20)
    val = read_texts(corpus, "val", "perplexity text")
    assert val == [t for d in ("mycode", "mydocs", "myliterature") for t in read_split(corpus, d, "val")]
    assert read_texts(corpus, "train", domains=["mydocs"]) == list(read_split(corpus, "mydocs", "train"))
    (tmp_path / "notes.txt").write_text("one text\nof two lines\n")
    assert read_texts(tmp_path / "notes.txt") == ["one text\nof two lines\n"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(LeanLMError, match="not UTF-8 text"):
        read_texts(tmp_path / "latin1.txt")
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    with pytest.raises(LeanLMError, match=r"list.jsonl:1: expected a JSON object with a \"text\" field"):
        read_texts(tmp_path / "list.jsonl")
    with pytest.raises(LeanLMError, match="perplexity text .*missing: no such file"):
        read_texts(tmp_path / "missing", what="perplexity text")


def test_default_texts_are_a_seeded_sample_of_the_stdlib() -> None:
    a = default_texts(5, seed=1)
    assert len(a) == 5 and all(isinstance(t, str) and t for t in a)
    assert a == default_texts(5, seed=1) and a != default_texts(5, seed=2)
