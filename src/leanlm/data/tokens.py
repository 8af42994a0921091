"""Tokenized, packed, resumable training data: the token side of the data layer.

The trainer, the evaluation of a corpus (``eval/perplexity.py``), DoReMi and instruction tuning
all read tokens through this module, so it lives with the data, below all of them.

``tokenize_corpus`` turns a corpus directory into one flat token array per (domain, split),
cached as ``.bin`` files (uint16 when the vocabulary allows) next to a ``tokens.json`` that
records the tokenizer's hash, so a changed tokenizer re-tokenizes. Every document is written as
``<eos> text``: the separator doubles as the BOS of the next document, so with document masking
every position has a meaningful target (the last token of a document predicts ``<eos>``, the
``<eos>`` predicts the first token of its own document) and no target needs masking.

Packing (Raffel et al. 2020; Krell et al. 2021): the stream is cut into windows of
``seq_len + 1`` tokens (inputs and shifted targets); a window holds pieces of several documents.
With document masking each token attends only to its own document, and rotary positions restart
at each document, so packing changes the cost of a batch and nothing else about what a token sees.

:class:`PackedLoader` deals out windows in a seeded random order, epoch after epoch. Its whole
state is ``(epoch, cursor)``; the global batch of a step is ``perm[cursor : cursor + G]`` laid
out as ``[grad_accum, world, micro_batch]``, so a rank takes ``[:, rank]`` and the same global
batch is seen whatever the number of processes — the property the parity tests rely on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.data.corpus import load_manifest, read_split
from leanlm.errors import LeanLMError
from leanlm.fsutil import staged_file, write_json
from leanlm.tokenizer import Tokenizer


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    positions: torch.Tensor | None  # [B, T], restarting at each document (None: 0..T-1)
    documents: torch.Tensor | None  # [B, T] document index within the row (None: one document)

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.documents))


def make_batch(windows: np.ndarray, eos_id: int, document_masking: bool) -> Batch:
    """[B, T+1] token windows -> inputs, targets and (with masking) positions and documents."""
    w = torch.from_numpy(windows.astype(np.int64))
    inputs, targets = w[:, :-1], w[:, 1:]
    if not document_masking:
        return Batch(inputs, targets, None, None)
    starts = inputs == eos_id
    starts[:, 0] = True
    return Batch(inputs, targets, restart_positions(starts), starts.long().cumsum(1))


def restart_positions(starts: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever ``starts`` [B, T] (bool) marks a document's
    first token (the first column must be a start)."""
    idx = torch.arange(starts.shape[1]).expand_as(starts)
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values


def _tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.tok.to_str().encode()).hexdigest()[:16]


def _shards_hash(corpus: Path, domain: str, split: str) -> str:
    """Names, sizes and mtimes of a split's shards: a rebuilt corpus re-tokenizes."""
    shards = sorted(corpus.joinpath(domain).glob(f"{split}-*.jsonl"))
    desc = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def tokenize_corpus(corpus: str | os.PathLike[str], tok: Tokenizer, cache: str | os.PathLike[str],
                    eos_id: int, splits: tuple[str, ...] = ("train", "val"),
                    batch_docs: int = 256) -> dict[str, dict[str, Path]]:
    """Tokenize each (domain, split) of ``corpus`` into ``cache``; returns {domain: {split: path}}."""
    manifest = load_manifest(corpus)
    corpus = Path(corpus)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "tokens.json"
    base = {"tokenizer": _tokenizer_hash(tok), "corpus": str(corpus.resolve()), "eos": eos_id}
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out: dict[str, dict[str, Path]] = {}
    for domain in manifest["domains"]:
        out[domain] = {}
        for split in splits:
            name = f"{domain}-{split}"
            path = cache / f"{name}.bin"
            out[domain][split] = path
            key = {**base, "shards": _shards_hash(corpus, domain, split)}
            if index.get(name, {}).get("key") == key and path.is_file():
                continue
            pieces: list[np.ndarray] = []
            texts = list(read_split(corpus, domain, split))
            for i in range(0, len(texts), batch_docs):
                for enc in tok.tok.encode_batch(texts[i:i + batch_docs], add_special_tokens=False):
                    pieces.append(np.asarray([eos_id, *enc.ids], dtype=dtype))
            arr = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
            with staged_file(path) as tmp:
                arr.tofile(tmp)
            index[name] = {"key": key, "tokens": int(arr.size), "dtype": np.dtype(dtype).name,
                           "docs": len(texts)}
            write_json(index_path, index)
    return out


def load_tokens(path: Path) -> np.ndarray:
    index = json.loads((path.parent / "tokens.json").read_text())
    return np.fromfile(path, dtype=index[path.stem]["dtype"])


def windows_of(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (tokens.size - 1) // seq_len)


def window(tokens: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    return tokens[i * seq_len: i * seq_len + seq_len + 1]


class PackedLoader:
    """Seeded, stateful, rank-aware windows of a packed token stream (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, micro_batch: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1, seed: int = 0,
                 document_masking: bool = True) -> None:
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.seed, self.document_masking = seed, document_masking
        self.num_windows = windows_of(tokens, seq_len)
        self.global_batch = micro_batch * grad_accum * world
        if self.num_windows < self.global_batch:
            raise LeanLMError(f"training data has {tokens.size:,} tokens = {self.num_windows} windows "
                              f"of {seq_len + 1}, fewer than one global batch of {self.global_batch} "
                              "sequences: add data or lower seq_len/micro_batch")
        self.epoch, self.cursor = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.num_windows))
        return self._perm[1]

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` window ids of the seeded order (a new epoch when fewer than n are left)."""
        if self.cursor + n > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = self._permutation()[self.cursor:self.cursor + n]
        self.cursor += n
        return ids

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro-batches of this rank for the next optimizer step."""
        ids = self.take(self.global_batch).reshape(self.grad_accum, self.world, self.micro_batch)
        ids = ids[:, self.rank]
        return [make_batch(np.stack([window(self.tokens, i, self.seq_len) for i in row]),
                           self.eos_id, self.document_masking) for row in ids]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_windows": self.num_windows, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("num_windows", "global_batch", "seed"):
            if state.get(k) != getattr(self, k):
                raise LeanLMError(f"cannot resume the data loader: checkpoint has {k}={state.get(k)}, "
                                  f"this run has {getattr(self, k)} (same data, batch and seed needed)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class MixtureLoader:
    """Windows of several domains mixed by domain weights (DoReMi's sampler; Xie et al. 2023).

    Each sequence of a global batch comes from domain d with probability w_d, drawn from a
    generator seeded by (seed, step) so that every rank draws the same global batch; each
    domain's windows are dealt in its own seeded order (a :class:`PackedLoader` of batch 1).
    Its state is the step and each domain's (epoch, cursor).
    """

    def __init__(self, streams: dict[str, np.ndarray], weights: dict[str, float], seq_len: int,
                 eos_id: int, micro_batch: int, grad_accum: int = 1, rank: int = 0, world: int = 1,
                 seed: int = 0, document_masking: bool = True) -> None:
        unknown = set(weights) - set(streams)
        if unknown:
            raise LeanLMError(f"domain weights name unknown domains {sorted(unknown)}; the corpus has "
                              f"{sorted(streams)}")
        w = np.array([float(weights.get(d, 0.0)) for d in streams])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise LeanLMError(f"domain weights must be non-negative with a positive sum, got {weights}")
        self.domains, self.p = list(streams), w / w.sum()
        self.loaders = [PackedLoader(streams[d], seq_len, eos_id, 1, seed=seed + 1 + i,
                                     document_masking=document_masking) for i, d in enumerate(streams)]
        self.seq_len, self.eos_id, self.document_masking = seq_len, eos_id, document_masking
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.global_batch = micro_batch * grad_accum * world
        self.seed, self.step = seed, 0

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch: windows [G, seq_len + 1] and each one's domain index [G]."""
        dom = np.random.default_rng([self.seed, self.step]).choice(len(self.p), self.global_batch, p=self.p)
        self.step += 1
        windows = np.empty((self.global_batch, self.seq_len + 1), dtype=np.int64)
        for d, loader in enumerate(self.loaders):
            rows = np.flatnonzero(dom == d)
            for r, i in zip(rows, loader.take(len(rows)), strict=True):
                windows[r] = window(loader.tokens, int(i), self.seq_len)
        return windows, dom

    def next_step(self) -> list[Batch]:
        windows, _ = self.draw()
        rows = windows.reshape(self.grad_accum, self.world, self.micro_batch, -1)[:, self.rank]
        return [make_batch(r, self.eos_id, self.document_masking) for r in rows]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch,
                "p": self.p.tolist(), "domains": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("global_batch") != self.global_batch or state.get("seed") != self.seed or \
                not np.allclose(state.get("p", []), self.p):
            raise LeanLMError("cannot resume the data loader: the checkpoint was made with another "
                              "batch size, seed or domain weights")
        self.step = int(state["step"])
        for loader, st in zip(self.loaders, state["domains"], strict=True):
            loader.load_state_dict(st)
