"""Atomic files and directories, and the JSONL reader: nothing half-written, errors name the line."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from leanlm.errors import LeanLMError
from leanlm.fsutil import (
    StagedFile,
    atomic_write,
    json_lines,
    read_json_lines,
    replace_dir,
    staged_dir,
    staged_file,
    write_json,
)


def test_atomic_write_and_write_json_replace_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    write_json(target, {"b": 2, "a": 1}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 1, "b": 2} and target.read_text().startswith('{\n  "a"')
    atomic_write(tmp_path / "t.txt", "ünï")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ünï"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.bin", "sub", "t.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.npy"
    np.save(target, np.arange(3))
    with pytest.raises(RuntimeError), staged_file(target, suffix=".npy") as tmp:
        np.save(tmp, np.arange(5))
        raise RuntimeError("crash")
    assert np.load(target).tolist() == [0, 1, 2]
    with staged_file(target, suffix=".npy") as tmp:
        np.save(tmp, np.arange(5))  # np.save keeps the name: it ends with .npy
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_staged_file_commit_and_discard(tmp_path: Path) -> None:
    stage = StagedFile(tmp_path / "s.jsonl")
    stage.tmp.write_text("partial")
    assert not stage.path.exists() and stage.tmp.name.startswith(".s.jsonl")
    stage.discard()
    assert not any(tmp_path.iterdir())
    stage.tmp.write_text("whole")
    assert stage.commit().read_text() == "whole"


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("2")
    assert (target / "nested" / "b.txt").read_text() == "2"
    assert stat.S_IMODE(target.stat().st_mode) & 0o700 == 0o700
    assert stat.S_IMODE((target / "nested").stat().st_mode) & 0o100  # directories stay enterable
    with pytest.raises(ValueError), staged_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise ValueError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "nested"]
    with staged_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old dirs left


def test_replace_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(LeanLMError, match="is not a directory"):
        replace_dir(tmp_path / "d", tmp_path / "f")


def test_json_lines_skips_blanks_and_names_the_bad_line(tmp_path: Path) -> None:
    assert list(json_lines(['{"a": 1}', "", "  ", "[2]"], "f.jsonl")) == [(1, {"a": 1}), (4, [2])]
    with pytest.raises(LeanLMError, match=r"f.jsonl:2: malformed JSON"):
        list(json_lines(['{"a": 1}', "{oops"], "f.jsonl"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert read_json_lines(path) == [(1, {"x": 1}), (3, {"x": 2})]
    with open(path, encoding="utf-8") as f:  # a file object is an iterable of lines
        assert [v for _, v in json_lines(f, path)] == [{"x": 1}, {"x": 2}]
    path.write_bytes(b'{"x": "\xff"}\n')
    with pytest.raises(LeanLMError, match="d.jsonl: cannot read the task file"):
        read_json_lines(path, "task file")
    with pytest.raises(LeanLMError, match="cannot read"):
        read_json_lines(tmp_path / "missing.jsonl")
