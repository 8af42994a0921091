"""Readers and writers: every format, and bad input reported with file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from leanlm.data.io import (
    BadRecord,
    ReadConfig,
    ReadErrors,
    ShardWriter,
    list_inputs,
    read_documents,
    sha256_file,
)
from leanlm.errors import LeanLMError

DOCS = [{"id": str(i), "text": f"document {i} — ünïcode"} for i in range(5)]


def jsonl_bytes(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()


def test_every_format_reads_the_same_documents(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS)))
    pq.write_table(pa.Table.from_pylist(DOCS), tmp_path / "d.parquet")
    files = list_inputs(tmp_path)
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    for f in files:
        assert list(read_documents(f, ReadConfig())) == DOCS, f


def test_text_folder_files_are_documents(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("hello")
    (tmp_path / "y.md").write_text("world")
    (tmp_path / ".hidden.txt").write_text("skipped")
    docs = [d for f in list_inputs(tmp_path) for d in read_documents(f, ReadConfig(), root=tmp_path)]
    assert docs == [{"id": "sub/x.txt", "text": "hello"}, {"id": "y.md", "text": "world"}]


def test_bad_lines_fail_with_file_and_line_or_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": broken\n\n[1, 2]\n{"body": "x"}\n{"text": 5}\n'
                     b'\xff\xfe{"text": "x"}\n{"text": "last"}\n')
    with pytest.raises(BadRecord, match=r"bad.jsonl:2: malformed JSON"):
        list(read_documents(path, ReadConfig()))
    errors = ReadErrors()
    docs = list(read_documents(path, ReadConfig(on_error="skip"), errors))
    assert [d["text"] for d in docs] == ["ok", "last"]
    assert errors.count == 5
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in errors.messages] == ["2", "4", "5", "6", "7"]
    assert "text field 'text' is missing (fields: ['body'])" in errors.messages[2]
    assert "is a int" in errors.messages[3] and "not valid UTF-8" in errors.messages[4]


def test_missing_field_in_parquet_and_unreadable_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(BadRecord, match="no column 'text'"):
        list(read_documents(tmp_path / "p.parquet", ReadConfig()))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS))[:30])  # truncated
    with pytest.raises(LeanLMError, match="t.jsonl.gz: cannot read"):
        list(read_documents(tmp_path / "t.jsonl.gz", ReadConfig()))


def test_empty_or_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LeanLMError, match="no input files under"):
        list_inputs(tmp_path)
    with pytest.raises(LeanLMError, match="does not exist"):
        list_inputs(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LeanLMError, match="unknown input format"):
        list_inputs(tmp_path / "x.csv")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_shard_writer_is_atomic_and_round_trips(tmp_path: Path, compression: str) -> None:
    w = ShardWriter(tmp_path, "00000", compression)
    for d in DOCS:
        w.write(d)
    assert not w.path.exists()  # nothing under the final name until closed
    entry = w.close()
    assert entry["documents"] == 5 and entry["sha256"] == sha256_file(w.path)
    assert list(read_documents(w.path, ReadConfig())) == DOCS
    w2 = ShardWriter(tmp_path, "00001", compression)
    w2.write(DOCS[0])
    w2.abort()
    assert not list(tmp_path.glob("*00001*"))
