"""DSIR: data selection with importance resampling (Xie et al. 2023, "Data Selection for Language
Models via Importance Resampling"), as the authors' ``data-selection`` package does it.

Features: a document's lowercased words (``\\w+|[^\\w\\s]+``, NLTK's WordPunct rule) and word
bigrams ``"w1 w2"``, each hashed into one of B = 10,000 buckets (SHA-256 mod B). Two bag-of-ngrams
distributions are fitted over the buckets: p̂_raw on the raw pool and p̂_target on the target
examples. A raw document x with bucket counts c(x) gets the log importance weight

    log w(x) = Σ_j c_j(x) · (log(p̂_target,j + 1e-8) − log(p̂_raw,j + 1e-8)),

and k documents are drawn without replacement with probabilities ∝ w by the Gumbel top-k trick
(keep the k largest log w + Gumbel(0, 1)); ``top_k`` keeps the k largest log w instead. Documents
shorter than ``min_example_length`` words are not eligible. The raw distribution is fitted on at
most ``num_tokens_to_fit`` n-gram occurrences (default 100,000 · B, the package's "auto").

The work is spread over the raw pool's files by the pipeline's executor (fit, then weights per
file), the draw happens once over all weights (8 bytes per document), and the selected documents
are written by the pipeline (:class:`~leanlm.data.pipeline.ListedIndices`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanlm.data.io import ReadConfig, ReadErrors, list_inputs, read_documents
from leanlm.data.pipeline import Executor, ListedIndices, LocalExecutor, Pipeline, claim_output
from leanlm.errors import LeanLMError
from leanlm.fsutil import write_json

WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


@dataclass
class DSIRConfig:
    num_buckets: int = 10_000
    ngrams: int = 2
    min_example_length: int = 100  # words
    num_tokens_to_fit: int | None = None  # raw n-gram occurrences to fit on (None: 100,000 · B)
    top_k: bool = False  # the k largest weights instead of sampling
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.ngrams < 1:
            raise LeanLMError("num_buckets and ngrams must be positive")


class Featurizer:
    """Hashed n-gram bucket ids of texts (one per process: the bucket of each n-gram is cached)."""

    def __init__(self, config: DSIRConfig) -> None:
        self.config = config
        self._cache: dict[str, int] = {}

    def bucket(self, gram: str) -> int:
        b = self._cache.get(gram)
        if b is None:
            if len(self._cache) > 2_000_000:
                self._cache.clear()
            b = int.from_bytes(hashlib.sha256(gram.encode("utf-8")).digest(), "big") % self.config.num_buckets
            self._cache[gram] = b
        return b

    def ids(self, text: str) -> np.ndarray:
        words = WORDPUNCT.findall(text.lower())
        grams = list(words)
        for n in range(2, self.config.ngrams + 1):
            grams += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        return np.fromiter((self.bucket(g) for g in grams), dtype=np.int64, count=len(grams))

    def length(self, num_features: int) -> int:
        """Words of a document from its feature count (the package's per-example metadata)."""
        n = self.config.ngrams
        return int((num_features + n * (n - 1) / 2) // n)


@dataclass
class _Counts:
    """Bucket counts of one file (up to ``budget`` n-gram occurrences; None = all)."""

    config: DSIRConfig
    read: ReadConfig
    budget: int | None

    def __call__(self, task: tuple[Path, Path | None]) -> np.ndarray:
        path, root = task
        feat = Featurizer(self.config)
        counts = np.zeros(self.config.num_buckets, dtype=np.int64)
        for doc in read_documents(path, self.read, ReadErrors(), root):
            counts += np.bincount(feat.ids(doc[self.read.text_field]), minlength=self.config.num_buckets)
            if self.budget is not None and counts.sum() > self.budget:
                break
        return counts


@dataclass
class _Weights:
    """Log importance weights and word lengths of one raw file's documents."""

    config: DSIRConfig
    read: ReadConfig
    log_diff: np.ndarray

    def __call__(self, task: tuple[Path, Path | None]) -> tuple[np.ndarray, np.ndarray]:
        path, root = task
        feat = Featurizer(self.config)
        weights, lengths = [], []
        for doc in read_documents(path, self.read, ReadErrors(), root):
            ids = feat.ids(doc[self.read.text_field])
            weights.append(float(self.log_diff[ids].sum()))
            lengths.append(feat.length(len(ids)))
        return np.array(weights, dtype=np.float64), np.array(lengths, dtype=np.int64)


def fit(raw: list[Path], target: list[Path], config: DSIRConfig, read: ReadConfig,
        executor: Executor, raw_root: Path | None = None,
        target_root: Path | None = None) -> np.ndarray:
    """log(p̂_target + 1e-8) − log(p̂_raw + 1e-8) over the buckets."""
    budget = config.num_tokens_to_fit
    if budget is None:
        budget = 100_000 * config.num_buckets
    raw_counts = sum(executor.map(_Counts(config, read, budget // len(raw)),
                                  [(p, raw_root) for p in raw], desc="DSIR fit raw"))
    target_counts = sum(executor.map(_Counts(config, read, None), [(p, target_root) for p in target],
                                     desc="DSIR fit target"))
    if target_counts.sum() == 0 or raw_counts.sum() == 0:
        raise LeanLMError("DSIR needs non-empty raw and target text to fit its distributions")
    return (np.log(target_counts / target_counts.sum() + 1e-8)
            - np.log(raw_counts / raw_counts.sum() + 1e-8))


def importance_weights(raw: str | Path, target: str | Path, config: DSIRConfig | None = None,
                       read: ReadConfig | None = None, executor: Executor | None = None
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per raw file: (log importance weights, word lengths) of its documents, in order."""
    config, read = config or DSIRConfig(), read or ReadConfig()
    executor = executor or LocalExecutor()
    raw_files, target_files = list_inputs(raw), list_inputs(target)
    raw_root = Path(raw) if Path(raw).is_dir() else None
    target_root = Path(target) if Path(target).is_dir() else None
    log_diff = fit(raw_files, target_files, config, read, executor, raw_root, target_root)
    pairs = executor.map(_Weights(config, read, log_diff), [(p, raw_root) for p in raw_files],
                         desc="DSIR weights")
    return [w for w, _ in pairs], [n for _, n in pairs]


def resample(weights: list[np.ndarray], lengths: list[np.ndarray], k: int,
             config: DSIRConfig) -> list[np.ndarray]:
    """Indices chosen in each file: Gumbel top-k (or top-k) over eligible documents."""
    w = np.concatenate(weights)
    eligible = np.concatenate(lengths) >= config.min_example_length
    idx = np.flatnonzero(eligible)
    if k > len(idx):
        raise LeanLMError(f"asked for {k} documents, but only {len(idx)} of {len(w)} are at least "
                          f"{config.min_example_length} words long")
    scores = w[idx]
    if not config.top_k:
        scores = scores + np.random.default_rng(config.seed).gumbel(size=len(idx))
    chosen = np.zeros(len(w), dtype=bool)
    if k:
        chosen[idx[np.argpartition(-scores, k - 1)[:k]]] = True
    offsets = np.r_[0, np.cumsum([len(x) for x in weights])]
    return [np.flatnonzero(chosen[offsets[t]:offsets[t + 1]]) for t in range(len(weights))]


def select(raw: str | Path, target: str | Path, out: str | Path, k: int,
           config: DSIRConfig | None = None, read: ReadConfig | None = None,
           executor: Executor | None = None, compression: str = "gzip") -> dict[str, Any]:
    """Write the ``k`` documents of ``raw`` that DSIR selects toward ``target`` to ``out``."""
    config, read = config or DSIRConfig(), read or ReadConfig()
    executor = executor or LocalExecutor()
    work = Path(out) / ".work"
    claim_output(work, {"dsir": asdict(config), "read": asdict(read), "k": k,
                        "raw": str(raw), "target": str(target)})
    chosen_dir = work / "chosen"
    if not (work / "chosen.json").exists():
        weights, lengths = importance_weights(raw, target, config, read, executor)
        chosen_dir.mkdir(parents=True, exist_ok=True)
        for t, c in enumerate(resample(weights, lengths, k, config)):
            np.save(chosen_dir / f"{t:05d}.npy", c)
            np.save(work / f"weights-{t:05d}.npy", weights[t])
        write_json(work / "chosen.json", {"k": k, "documents": int(sum(len(w) for w in weights))})
    listed = ListedIndices(str(chosen_dir.resolve()), keep=True, rule="dsir:not_selected", name="dsir")
    return Pipeline([listed], read, compression).run(raw, out, executor)
