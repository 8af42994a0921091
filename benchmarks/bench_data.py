"""Data selection: MinHash dedup vs datasketch, DSIR vs the data-selection package, same documents.

Documents are the multi-domain corpus (``leanlm corpus build``; code, docs, literature) cut into
pieces of at most ``--piece`` characters, plus near-duplicate copies of 10% of them (a few words
replaced). Both sides of each comparison read the same documents and use the same settings:

- dedup: word 5-gram shingles, 128 permutations, threshold 0.8, and the same LSH bands × rows
  (datasketch's choice for 0.8: 9 × 13). datasketch's loop is the usual one: build a ``MinHash``
  per document, ``query`` the ``MinHashLSH`` index, ``insert`` if nothing matched. leanlm runs its
  whole job (read JSONL, signatures, bands, clusters, write the kept documents).
- DSIR: 10,000 buckets, unigrams + bigrams, select 20% of the pool toward one domain's validation
  documents; data-selection's ``HashedNgramDSIR`` fit + compute_importance_weights + resample.

Throughput is documents per second of wall time, with 1 worker and with every core.

    python benchmarks/bench_data.py --corpus CORPUS_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine
from leanlm.data.corpus import read_split
from leanlm.data.dedup import DedupConfig, deduplicate
from leanlm.data.dsir import DSIRConfig, select
from leanlm.data.io import iter_output
from leanlm.data.pipeline import LocalExecutor


def pieces(corpus: Path, size: int) -> dict[str, list[str]]:
    """Each domain's training documents cut at blank lines into pieces of at most ``size`` chars."""
    domains = json.loads((corpus / "manifest.json").read_text())["domains"]
    out: dict[str, list[str]] = {}
    for dom in domains:
        docs = []
        for text in read_split(corpus, dom, "train"):
            cur = ""
            for para in text.split("\n\n"):
                if cur and len(cur) + len(para) > size:
                    docs.append(cur)
                    cur = ""
                cur += para + "\n\n"
            if cur.strip():
                docs.append(cur)
        out[dom] = docs
    return out


def with_near_duplicates(docs: list[str], share: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    extra = []
    for text in rng.sample(docs, int(share * len(docs))):
        words = text.split(" ")
        for pos in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[pos] = "edited"
        extra.append(" ".join(words))
    out = docs + extra
    rng.shuffle(out)
    return out


def write_shards(docs: list[str], root: Path, shards: int, prefix: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(root / f"{prefix}{s:03d}.jsonl", "w") as f:
            for i in range(s, len(docs), shards):
                f.write(json.dumps({"id": f"{prefix}{i}", "text": docs[i]}) + "\n")
    return root


def datasketch_dedup(docs: list[str], num_perm: int, threshold: float) -> tuple[float, set[int]]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dropped = set()
    for i, text in enumerate(docs):
        ws = re.findall(r"\w+", text.lower())
        shingles = {" ".join(ws[j:j + 5]) for j in range(max(1, len(ws) - 4))}
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode() for s in shingles])
        if lsh.query(m):
            dropped.add(i)
        else:
            lsh.insert(i, m)
    return time.perf_counter() - t0, dropped


def bench_dedup(docs: list[str], tmp: Path, workers: list[int]) -> None:
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(0.8, 128, 0.5, 0.5)
    inp = write_shards(docs, tmp / "dedup_in", 8)
    t_ref, ref_dropped = datasketch_dedup(docs, 128, 0.8)
    print(f"dedup: {len(docs):,} documents; datasketch {len(docs) / t_ref:,.0f} docs/s "
          f"({t_ref:.1f} s, {len(ref_dropped):,} removed)", flush=True)
    for w in workers:
        out = tmp / f"dedup_out_{w}"
        t0 = time.perf_counter()
        stats = deduplicate(inp, out, DedupConfig(threshold=0.8, num_perm=128, bands=b, rows=r),
                            executor=LocalExecutor(w, progress=False))
        t = time.perf_counter() - t0
        kept = {int(d["id"]) for d in iter_output(out)}
        ours = set(range(len(docs))) - kept
        # which copy of a pair is kept differs (input order vs shard order), so compare counts
        print(f"  leanlm {w} worker(s): {len(docs) / t:,.0f} docs/s ({t:.1f} s, "
              f"{stats['dedup']['duplicates']:,} removed) -> {t_ref / t:.2f}x datasketch; "
              f"removed-count ratio {len(ours) / max(1, len(ref_dropped)):.3f}", flush=True)


def bench_dsir(domains: dict[str, list[str]], target_domain: str, corpus: Path, tmp: Path,
               workers: list[int]) -> None:
    from data_selection import HashedNgramDSIR, hashed_ngram_dsir

    # nltk 3.10's regex timeout sentinel does not survive pickling into joblib's workers ("timeout
    # not float or None"): give the shared tokenizer an explicit no-timeout so num_proc > 1 runs
    hashed_ngram_dsir.wpt.tokenize("warm up")
    hashed_ngram_dsir.wpt._regexp._timeout = None

    raw_docs = [(dom, t) for dom, docs in domains.items() for t in docs]
    random.Random(0).shuffle(raw_docs)
    raw = tmp / "dsir_raw"
    raw.mkdir()
    for s in range(8):
        with open(raw / f"{s:03d}.jsonl", "w") as f:
            for i in range(s, len(raw_docs), 8):
                f.write(json.dumps({"id": f"{raw_docs[i][0]}-{i}", "text": raw_docs[i][1]}) + "\n")
    target = write_shards(list(read_split(corpus, target_domain, "val")), tmp / "dsir_target", 1)
    k = len(raw_docs) // 5
    n = len(raw_docs)
    share = lambda ids: np.mean([i.startswith(target_domain) for i in ids])
    print(f"dsir: {n:,} raw documents, target {target_domain} val, k = {k:,}; "
          f"{target_domain} share of the raw pool {share([f'{d}-' for d, _ in raw_docs]):.3f}", flush=True)
    for w in workers:
        cache = tmp / f"ds_cache_{w}"
        t0 = time.perf_counter()
        ref = HashedNgramDSIR(sorted(str(p) for p in raw.glob("*.jsonl")),
                              [str(p) for p in target.glob("*.jsonl")], str(cache), num_proc=w,
                              min_example_length=100)
        ref.fit_importance_estimator(num_tokens_to_fit="auto")
        ref.compute_importance_weights()
        ref.resample(str(tmp / f"ds_out_{w}"), num_to_sample=k, cache_dir=str(tmp / f"ds_rs_{w}"))
        t_ref = time.perf_counter() - t0
        ref_ids = [json.loads(line)["id"] for f in (tmp / f"ds_out_{w}").glob("*.jsonl")
                   for line in f.read_text().splitlines()]
        t0 = time.perf_counter()
        select(raw, target, tmp / f"dsir_out_{w}", k, DSIRConfig(min_example_length=100),
               executor=LocalExecutor(w, progress=False))
        t = time.perf_counter() - t0
        ids = [d["id"] for d in iter_output(tmp / f"dsir_out_{w}")]
        print(f"  {w} worker(s): data-selection {n / t_ref:,.0f} docs/s ({t_ref:.1f} s), leanlm "
              f"{n / t:,.0f} docs/s ({t:.1f} s) -> {t_ref / t:.2f}x; {target_domain} share of the "
              f"selection: leanlm {share(ids):.3f}, data-selection {share(ref_ids):.3f}", flush=True)
    # agreement at scale: importance weights (Spearman) and deterministic top-k selections
    ours = np.concatenate([np.load(tmp / f"dsir_out_{workers[0]}" / ".work" / f"weights-{i:05d}.npy")
                           for i in range(8)])
    cache = tmp / f"ds_cache_{workers[0]}" / "log_importance_weights"
    theirs = np.concatenate([np.load(cache / f"{i}.npy") for i in range(len(list(cache.glob("*.npy"))))])
    rank = lambda x: np.argsort(np.argsort(x))
    rho = float(np.corrcoef(rank(ours), rank(theirs))[0, 1])
    ref.resample(str(tmp / "ds_topk"), num_to_sample=k, cache_dir=str(tmp / "ds_topk_c"), top_k=True)
    ref_top = {json.loads(line)["id"] for f in (tmp / "ds_topk").glob("*.jsonl")
               for line in f.read_text().splitlines()}
    select(raw, target, tmp / "dsir_topk", k, DSIRConfig(min_example_length=100, top_k=True),
           executor=LocalExecutor(workers[-1], progress=False))
    our_top = {d["id"] for d in iter_output(tmp / "dsir_topk")}
    print(f"  agreement: Spearman of the {len(ours):,} log importance weights {rho:.6f}; top-{k:,} "
          f"overlap {len(our_top & ref_top) / k:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="a `leanlm corpus build` folder")
    ap.add_argument("--piece", type=int, default=2000, help="characters per document piece")
    ap.add_argument("--target-domain", default="docs")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = [1] if cores == 1 else [1, cores]
    print(f"# bench_data: {machine()}", flush=True)
    domains = pieces(args.corpus, args.piece)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        docs = with_near_duplicates([t for d in domains.values() for t in d], 0.1, seed=0)
        bench_dedup(docs, tmp, workers)
        bench_dsir(domains, args.target_domain, args.corpus, tmp, workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
