"""Files written whole or not at all, and the one reader of small JSONL files.

Every leanlm writer that leaves a file or directory behind (checkpoints, adapters, corpora, data
shards, token caches, markers of a resumable pipeline, reports, benchmark results) goes through
this module, so "nothing is half-written" (DESIGN.md, Errors) holds in one place:

- :func:`staged_file` gives a temporary path next to the target (same directory, so same file
  system) to fill by any means (``np.save``, ``save_file``, ``arr.tofile``); on success it is
  renamed over the target with ``os.replace`` (atomic on POSIX), on any error it is removed and
  the target is left as it was. :func:`atomic_write` and :func:`write_json` are the common cases;
  :class:`StagedFile` is the same for a writer that streams into the file over many calls.
- :func:`staged_dir` does the same for a directory (a checkpoint, an adapter, a corpus):
  :func:`replace_dir` swaps it in, moving an existing target aside first and deleting it after.

Temporary names start with ``.`` and the target's name, so readers that skip hidden files never
see them and a crash leaves only dot-files behind (a file's temporary name is fixed, so the
re-run that writes it again also replaces the leftover).

:func:`json_lines` reads JSONL text line by line (task files, prompts, fine-tuning and
calibration data, corpus shards): blank lines are skipped and a malformed line raises
:class:`~leanlm.errors.LeanLMError` naming the file and the line. The streaming document reader
of the data pipeline (``data/io.py``), which can count and skip bad lines, is built for large
sharded inputs and stays there.

Standard library only (and :mod:`leanlm.errors`): the bottom layer of the package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leanlm.errors import LeanLMError

PathLike = str | os.PathLike[str]


def temp_path(path: PathLike, suffix: str = "") -> Path:
    """The temporary name :func:`staged_file` writes ``path`` under: ``.NAME.tmp`` beside it
    (fixed, so that a re-run after a crash overwrites the leftover; ``suffix`` for writers such
    as ``np.save`` that append one to a name lacking it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{suffix}")


class StagedFile:
    """A file written under :func:`temp_path` and renamed onto ``path`` by :meth:`commit` (or
    removed by :meth:`discard`): for writers that stream into a file over many calls."""

    def __init__(self, path: PathLike, suffix: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path, suffix)

    def commit(self) -> Path:
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextmanager
def staged_file(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path`` to write; renamed onto ``path`` on success, removed on
    any error (``path`` is then left as it was). Parent directories are created."""
    stage = StagedFile(path, suffix)
    try:
        yield stage.tmp
        stage.commit()
    except BaseException:
        stage.discard()
        raise


def atomic_write(path: PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` atomically; returns the path."""
    path = Path(path)
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


def write_json(path: PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON (with a final newline) to ``path``, atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


@contextmanager
def staged_dir(path: PathLike) -> Iterator[Path]:
    """A temporary directory next to ``path`` to fill; on success it replaces ``path`` (with
    ordinary permissions), on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a saved model is an ordinary directory
        for f in tmp.iterdir():
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: PathLike, path: PathLike) -> None:
    """Rename directory ``tmp`` to ``path``; an existing ``path`` is moved aside first and deleted
    once the new one is in place (``os.replace`` cannot replace a non-empty directory)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists() and not path.is_dir():
        raise LeanLMError(f"{path} exists and is not a directory")
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: PathLike) -> None:
    """Make the renames inside directory ``path`` durable (after a crash of the machine too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_lines(lines: Iterable[str | bytes], source: object) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSONL text (a file object works too); a
    malformed line raises LeanLMError naming ``source`` and the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise LeanLMError(f"{source}:{lineno}: malformed JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise LeanLMError(f"{source}:{lineno}: not valid UTF-8 ({e.reason})") from None
        yield lineno, value


def read_json_lines(path: PathLike, what: str = "data") -> list[tuple[int, Any]]:
    """Every (line number, value) of the JSONL file ``path``; ``what`` names it in errors."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LeanLMError(f"{path}: cannot read the {what} ({e})") from e
    return list(json_lines(lines, path))
