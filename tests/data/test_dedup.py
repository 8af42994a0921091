"""Exact and MinHash-LSH dedup on corpora with planted duplicates of known Jaccard similarity."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from leanlm.data.dedup import DedupConfig, MinHasher, deduplicate, optimal_param
from leanlm.data.io import iter_output
from leanlm.data.pipeline import LocalExecutor


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """The reference: word 5-grams as tuples of strings (no hashing)."""
    ws = re.findall(r"\w+", text.lower())
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def planted_corpus(root: Path, seed: int = 0) -> tuple[list[tuple[str, str, float]], int]:
    """300 random documents over 4 files, plus 150 variants above J=0.8 and 100 below; returns
    (id of original, id of variant, true Jaccard) for every planted pair, and the document count."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    base = {f"d{i}": [rng.choice(vocab) for _ in range(rng.randrange(150, 400))] for i in range(300)}
    docs = [{"id": k, "text": " ".join(v)} for k, v in base.items()]
    pairs = []
    for i, key in enumerate(rng.sample(sorted(base), 250)):
        words = list(base[key])
        # substitutions spaced so each touches distinct shingles: J ≈ (L - 5k) / (L + 5k)
        n = len(words)
        k = rng.randrange(1, max(2, n // 60)) if i < 150 else rng.randrange(n // 14, n // 5)
        for pos in rng.sample(range(len(words)), k):
            words[pos] = rng.choice(vocab)
        text = " ".join(words)
        docs.append({"id": f"{key}-v", "text": text})
        pairs.append((key, f"{key}-v", jaccard(" ".join(base[key]), text)))
    rng.shuffle(docs)
    for j in range(4):
        write_jsonl(root / f"part-{j}.jsonl", docs[j::4])
    return pairs, len(docs)


def test_optimal_parameters_match_datasketch() -> None:
    lsh = pytest.importorskip("datasketch.lsh")
    for t in (0.5, 0.8, 0.9):
        assert optimal_param(t, 128) == lsh._optimal_param(t, 128, 0.5, 0.5)


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(1)
    a = " ".join(f"w{rng.randrange(5000)}" for _ in range(400))
    ws = a.split()
    for pos in rng.sample(range(400), 12):
        ws[pos] = "x"
    b = " ".join(ws)
    hasher = MinHasher(DedupConfig(num_perm=256))
    est = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(est - jaccard(a, b)) < 0.08


@pytest.mark.parametrize("workers", [1, 2])
def test_minhash_finds_planted_pairs_without_false_merges(tmp_path: Path, workers: int) -> None:
    pairs, total = planted_corpus(tmp_path / "in")
    stats = deduplicate(tmp_path / "in", tmp_path / "out", DedupConfig(threshold=0.8),
                        executor=LocalExecutor(workers, progress=False))
    kept = {d["id"] for d in iter_output(tmp_path / "out")}
    above = [(a, b) for a, b, j in pairs if j >= 0.8]
    below = [(a, b) for a, b, j in pairs if j < 0.8]
    assert len(above) > 100 and len(below) > 80  # the corpus plants both kinds
    found = sum(not (a in kept and b in kept) for a, b in above)
    assert found / len(above) >= 0.95
    removed = total - len(kept)
    false = sum(not (a in kept and b in kept) for a, b in below)  # merged though J < 0.8
    assert removed >= found and false / removed < 0.05
    assert stats["stages"]["dedup"]["removed"] == {"minhash:duplicate": removed}
    assert stats["documents"] == len(kept) and stats["dedup"]["bands"] * stats["dedup"]["rows"] <= 128
    # a found pair keeps exactly one of its two documents (the one first in input order)
    assert all((a in kept) != (b in kept) for a, b in above if not (a in kept and b in kept))


def test_exact_dedup_is_exact(tmp_path: Path) -> None:
    docs = [{"id": "a", "text": "Hello, World!  This is one."},
            {"id": "b", "text": "hello world this is one"},  # same after normalisation
            {"id": "c", "text": "Hello world, this is two."},
            {"id": "d", "text": "HELLO WORLD. THIS IS ONE"},
            {"id": "e", "text": "Hello world this is one more"}]
    write_jsonl(tmp_path / "in" / "0.jsonl", docs[:3])
    write_jsonl(tmp_path / "in" / "1.jsonl", docs[3:])
    stats = deduplicate(tmp_path / "in", tmp_path / "out", DedupConfig(method="exact"),
                        executor=LocalExecutor(1, progress=False))
    assert [d["id"] for d in iter_output(tmp_path / "out")] == ["a", "c", "e"]
    assert stats["dedup"]["duplicates"] == 2 and stats["dedup"]["clusters"] == 1


def test_rerun_reuses_stages_and_refuses_another_config(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "0.jsonl", [{"text": f"doc {i % 3}"} for i in range(9)])
    ex = LocalExecutor(1, progress=False)
    first = deduplicate(tmp_path / "in", tmp_path / "out", DedupConfig(method="exact"), executor=ex)
    keys = tmp_path / "out" / ".work" / "keys" / "00000.keys.npy"
    mtime = keys.stat().st_mtime_ns
    again = deduplicate(tmp_path / "in", tmp_path / "out", DedupConfig(method="exact"), executor=ex)
    assert again == first and keys.stat().st_mtime_ns == mtime
    assert np.load(tmp_path / "out" / ".work" / "drop" / "00000.npy").tolist() == [3, 4, 5, 6, 7, 8]
    from leanlm.errors import LeanLMError
    with pytest.raises(LeanLMError, match="different job"):
        deduplicate(tmp_path / "in", tmp_path / "out", DedupConfig(method="minhash"), executor=ex)
