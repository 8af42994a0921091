"""Exact and near-duplicate removal (MinHash + LSH), in stages that never hold the corpus in memory.

Near duplicates (Broder 1997; as in datatrove, text-dedup and the Gopher/RefinedWeb pipelines):
a document is a set S of shingles (word or character n-grams); its MinHash signature holds, for
K random hash permutations π_k, ``min_{s∈S} π_k(s)``, and Pr[sig_k(A) = sig_k(B)] = J(A, B), the
Jaccard similarity. LSH cuts the signature into b bands of r rows: two documents become candidates
when all r rows of some band agree, with probability 1 − (1 − J^r)^b. (b, r) with b·r ≤ K are
chosen for the threshold t by minimising w_fp·∫₀ᵗ P(J) dJ + w_fn·∫ₜ¹ (1 − P(J)) dJ, the weighted
false positive and negative areas (datasketch's ``_optimal_param``). Candidates are optionally
verified by the signature's own Jaccard estimate (fraction of equal rows ≥ t), then merged into
clusters with union-find; each cluster keeps its first document (lowest input position).

Permutations are multiply-add-shift hashes π_k(h) = ⌊((a_k·h + b_k) mod 2⁶⁴) / 2³²⌋ of 32-bit
shingle hashes, with a_k odd (Dietzfelbinger 1996: strongly universal from 32 to 32 bits; no
modulo, which costs twice the time of datasketch's (a·h + b) mod (2⁶¹ − 1) in numpy). Shingle
hashes are computed for a batch of documents at once in numpy (:class:`MinHasher`): no Python
work per word.

Stages (each resumable, each parallel over tasks or bands, files under ``OUT/.work``):

1. keys: per input file, every document's band keys (and MinHash signature) as .npy;
2. bands: per band, sort all keys; equal keys give candidate edges;
3. clusters: union-find over (verified) edges → the document indices each task drops;
4. filter: the pipeline streams each input again, writing the documents that stay
   (:class:`~leanlm.data.pipeline.ListedIndices`).

Exact dedup is the same job with one band whose key is a 64-bit hash of the normalised text
(lowercased, punctuation removed, whitespace collapsed), and no verification.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanlm.data.io import ReadConfig, ReadErrors, list_inputs, read_documents
from leanlm.data.pipeline import Executor, ListedIndices, LocalExecutor, Pipeline, claim_output
from leanlm.errors import LeanLMError
from leanlm.fsutil import staged_file, write_json

MAX_HASH = np.uint64((1 << 32) - 1)
PUNCT = re.compile(r"[^\w\s]")
SPACE = re.compile(r"\s+")
POLY = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial n-gram hash


@dataclass
class DedupConfig:
    method: str = "minhash"  # "minhash" | "exact"
    num_perm: int = 128
    threshold: float = 0.8
    shingle: str = "word"  # "word" | "char"
    ngram: int = 5
    bands: int | None = None  # None: chosen from the threshold (with rows)
    rows: int | None = None
    # candidates are verified (below), so the band/row choice leans towards recall; datasketch's
    # defaults, without verification, are 0.5 / 0.5
    false_positive_weight: float = 0.1
    false_negative_weight: float = 0.9
    verify: bool = True  # keep only candidates whose signature estimate reaches the threshold
    seed: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("minhash", "exact"):
            raise LeanLMError(f"method={self.method!r}: expected 'minhash' or 'exact'")
        if self.shingle not in ("word", "char"):
            raise LeanLMError(f"shingle={self.shingle!r}: expected 'word' or 'char'")
        if not 0 < self.threshold <= 1:
            raise LeanLMError(f"threshold={self.threshold}: expected a Jaccard similarity in (0, 1]")
        if (self.bands is None) != (self.rows is None):
            raise LeanLMError("give both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise LeanLMError(f"bands × rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}")

    def band_rows(self) -> tuple[int, int]:
        if self.method == "exact":
            return 1, 1
        if self.bands is not None:
            return self.bands, self.rows  # type: ignore[return-value]
        return optimal_param(self.threshold, self.num_perm, self.false_positive_weight,
                             self.false_negative_weight)


def optimal_param(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false positive + false negative areas."""
    lo = np.linspace(0.0, threshold, 1001)
    hi = np.linspace(threshold, 1.0, 1001)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


def normalize(text: str) -> str:
    return SPACE.sub(" ", PUNCT.sub("", text.lower())).strip()


# bytes that belong to a word (\w on ASCII; every byte of a non-ASCII UTF-8 character)
WORD_BYTE = np.zeros(256, dtype=bool)
WORD_BYTE[np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", np.uint8)] = True
WORD_BYTE[128:] = True
BYTE_POW = np.cumprod(np.r_[np.uint64(1), np.full(63, 0x100000001B3, dtype=np.uint64)], dtype=np.uint64)
MAX_SHINGLES = 16_384  # rows of one [shingles, num_perm] block


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's), so that low and high bits both depend on every input bit."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class MinHasher:
    """MinHash signatures of texts, computed for a batch of documents at a time in numpy.

    The batch's lowercased texts are joined by newlines; word units are runs of word bytes, each
    hashed by a polynomial over its bytes (vectorised with ``np.add.reduceat``); character units
    are code points. n-gram shingles combine n consecutive units of the same document, and each
    document's signature is a segmented minimum over its shingles' permuted hashes. Duplicate
    shingles need no removal: they do not change a minimum.
    """

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        rng = np.random.RandomState(config.seed)
        self.a = rng.randint(0, 1 << 63, config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.randint(0, 1 << 63, config.num_perm, dtype=np.uint64)
        self._buf = np.empty((MAX_SHINGLES, config.num_perm), dtype=np.uint64)

    def _units(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(unit hashes uint64, document index of each unit)."""
        lowered = [t.lower() for t in texts]
        if self.config.shingle == "char":  # code points
            units = np.frombuffer("".join(lowered).encode("utf-32-le"), np.uint32).astype(np.uint64)
            return units, np.repeat(np.arange(len(texts)), [len(t) for t in lowered])
        data = np.frombuffer("\n".join(lowered).encode("utf-8"), np.uint8)
        is_word = WORD_BYTE[data]
        edge = np.diff(np.r_[False, is_word, False].astype(np.int8))
        starts = np.flatnonzero(edge == 1)
        if len(starts) == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        idx = np.flatnonzero(is_word)
        word = np.cumsum(edge[:-1] == 1)[idx] - 1  # word index of each word byte
        with np.errstate(over="ignore"):
            contrib = (data[idx].astype(np.uint64) + np.uint64(1)) * BYTE_POW[(idx - starts[word]) % 64]
        first = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        hashes = _mix(np.add.reduceat(contrib, first))
        # documents are joined by newlines and contain their own: a word's line index, mapped
        # through each document's line count, gives its document
        line = np.cumsum(data == 10)[starts]
        last_line = np.cumsum([t.count("\n") + 1 for t in lowered])
        return hashes, np.searchsorted(last_line, line, side="right")

    def signatures(self, texts: list[str]) -> np.ndarray:
        """[len(texts), num_perm] uint32 (all-ones for a document without shingles)."""
        n, k = self.config.ngram, self.config.num_perm
        sigs = np.full((len(texts), k), MAX_HASH, dtype=np.uint64)
        units, doc = self._units(texts)
        if len(units) == 0:
            return sigs.astype(np.uint32)
        counts = np.bincount(doc, minlength=len(texts))
        m = len(units) - n + 1
        with np.errstate(over="ignore"):
            if m > 0:
                h = np.zeros(m, dtype=np.uint64)
                for j in range(n):
                    h = h * POLY + units[j:j + m]
                keep = doc[:m] == doc[n - 1:]
                h, hdoc = h[keep], doc[:m][keep]
            else:
                h, hdoc = np.zeros(0, np.uint64), np.zeros(0, np.int64)
            short = np.flatnonzero((counts > 0) & (counts < n))  # fewer units than n: one shingle
            if len(short):
                starts = np.r_[0, np.cumsum(counts)][short]
                extra = [_poly(units[s:s + counts[d]]) for s, d in zip(starts, short, strict=True)]
                h = np.r_[h, np.array(extra, dtype=np.uint64)]
                hdoc = np.r_[hdoc, short]
                order = np.argsort(hdoc, kind="stable")
                h, hdoc = h[order], hdoc[order]
            h = _mix(h) >> np.uint64(32)
        for lo in range(0, len(h), MAX_SHINGLES):
            hi = min(len(h), lo + MAX_SHINGLES)
            perm = self._buf[:hi - lo]
            with np.errstate(over="ignore"):  # π(h) = (a·h + b mod 2⁶⁴) >> 32, in place
                np.multiply(h[lo:hi, None], self.a, out=perm)
                perm += self.b
            perm >>= np.uint64(32)
            seg = np.flatnonzero(np.r_[True, hdoc[lo + 1:hi] != hdoc[lo:hi - 1]])
            d = hdoc[lo + seg]
            sigs[d] = np.minimum(sigs[d], np.minimum.reduceat(perm.astype(np.uint32), seg, axis=0))
        return sigs.astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]


def _poly(units: np.ndarray) -> int:
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for u in units:
            h = h * POLY + u
    return int(h)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] uint64 keys: a polynomial hash of each band's r rows."""
    keys = np.zeros((sigs.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            keys = keys * POLY + sigs[:, j:bands * rows:rows].astype(np.uint64)
    return keys


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little")


# ---- the staged job ---------------------------------------------------------------------------
@dataclass
class _Keys:
    """Stage 1 for one input file: band keys [n, bands] (and signatures [n, K] for MinHash)."""

    config: DedupConfig
    read: ReadConfig
    work: Path

    def __call__(self, task: tuple[int, Path, Path | None]) -> int:
        index, path, root = task
        done = self.work / "keys" / f"{index:05d}.keys.npy"
        if done.exists():
            return int(np.load(done, mmap_mode="r").shape[0])
        texts = (d[self.read.text_field] for d in read_documents(path, self.read, ReadErrors(), root))
        bands, rows = self.config.band_rows()
        if self.config.method == "exact":
            keys = np.array([text_key(t) for t in texts], dtype=np.uint64).reshape(-1, 1)
        else:
            hasher = MinHasher(self.config)
            blocks, batch, size = [], [], 0
            for t in texts:  # batches of about 1 MB of text
                batch.append(t)
                size += len(t)
                if size > 1 << 20:
                    blocks.append(hasher.signatures(batch))
                    batch, size = [], 0
            blocks.append(hasher.signatures(batch))
            sigs = np.concatenate(blocks)
            _save(self.work / "keys" / f"{index:05d}.sig.npy", sigs)
            keys = band_keys(sigs, bands, rows)
        _save(done, keys)  # last: its presence marks the task done
        return keys.shape[0]


@dataclass
class _BandEdges:
    """Stage 2 for one band: candidate pairs (global ids) of documents with equal keys."""

    work: Path
    counts: list[int]

    def __call__(self, band: int) -> int:
        out = self.work / "edges" / f"{band:03d}.npy"
        if out.exists():
            return int(np.load(out, mmap_mode="r").shape[0])
        keys = np.concatenate([np.load(self.work / "keys" / f"{t:05d}.keys.npy", mmap_mode="r")[:, band]
                               for t in range(len(self.counts))])
        order = np.argsort(keys, kind="stable")  # ties stay in document order: first = lowest id
        k = keys[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        first = np.repeat(order[starts], np.diff(np.r_[starts, len(k)]))
        member = first != order
        edges = np.stack([first[member], order[member]], axis=1).astype(np.int64)
        _save(out, edges)
        return len(edges)


def _save(path: Path, array: np.ndarray) -> None:
    with staged_file(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        parent[x], x = root, parent[x]
    return root


def clusters(work: Path, counts: list[int], bands: int, config: DedupConfig) -> dict[str, Any]:
    """Stage 3: union-find over the bands' edges; writes each task's dropped indices."""
    offsets = np.r_[0, np.cumsum(counts)]
    parent = np.arange(offsets[-1], dtype=np.int64)
    edges = np.concatenate([np.load(work / "edges" / f"{b:03d}.npy") for b in range(bands)])
    edges = np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2)
    candidates = len(edges)
    if config.method == "minhash" and config.verify and len(edges):
        edges = edges[_estimated_jaccard(work, offsets, edges) >= config.threshold]
    for u, v in edges:
        ru, rv = _find(parent, int(u)), _find(parent, int(v))
        if ru != rv:  # the lower id becomes the root: each cluster keeps its first document
            parent[max(ru, rv)] = min(ru, rv)
    roots = np.array([_find(parent, i) for i in range(len(parent))], dtype=np.int64)
    drop = roots != np.arange(len(parent))
    for t in range(len(counts)):
        _save(work / "drop" / f"{t:05d}.npy", np.flatnonzero(drop[offsets[t]:offsets[t + 1]]))
    info = {"documents": int(offsets[-1]), "candidate_pairs": candidates, "merged_pairs": len(edges),
            "clusters": len(np.unique(roots[drop])), "duplicates": int(drop.sum())}
    write_json(work / "clusters.json", info)
    return info


def _estimated_jaccard(work: Path, offsets: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of equal signature rows of each edge's two documents."""
    sigs = [np.load(work / "keys" / f"{t:05d}.sig.npy", mmap_mode="r") for t in range(len(offsets) - 1)]

    def rows(ids: np.ndarray) -> np.ndarray:
        task = np.searchsorted(offsets, ids, side="right") - 1
        out = np.empty((len(ids), sigs[0].shape[1]), dtype=np.uint32)
        for t in np.unique(task):
            sel = task == t
            out[sel] = sigs[t][ids[sel] - offsets[t]]
        return out

    return (rows(edges[:, 0]) == rows(edges[:, 1])).mean(axis=1)


def deduplicate(inputs: str | Path, out: str | Path, config: DedupConfig | None = None,
                read: ReadConfig | None = None, executor: Executor | None = None,
                compression: str = "gzip") -> dict[str, Any]:
    """Remove exact or near duplicates from ``inputs`` into ``out``; returns the statistics."""
    config = config or DedupConfig()
    read = read or ReadConfig()
    executor = executor or LocalExecutor()
    files = list_inputs(inputs)
    root = Path(inputs) if Path(inputs).is_dir() else None
    work = Path(out) / ".work"
    claim_output(work, {"dedup": asdict(config), "read": asdict(read), "inputs": [str(f) for f in files]})
    bands, _ = config.band_rows()
    counts = executor.map(_Keys(config, read, work), [(i, f, root) for i, f in enumerate(files)],
                          desc=f"{config.method} keys")
    executor.map(_BandEdges(work, counts), list(range(bands)), desc="bands")
    info_path = work / "clusters.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else clusters(work, counts, bands, config)
    listed = ListedIndices(str((work / "drop").resolve()), keep=False, rule=f"{config.method}:duplicate",
                           name="dedup")
    pipeline = Pipeline([listed], read, compression)
    stats = pipeline.run(inputs, out, executor)
    stats["dedup"] = {**info, "bands": bands, "rows": config.band_rows()[1]}
    write_json(Path(out) / "stats.json", stats)
    return stats
