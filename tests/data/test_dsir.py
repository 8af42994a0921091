"""DSIR against the authors' ``data-selection`` package on the same raw/target data and settings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from leanlm.data.dsir import DSIRConfig, importance_weights, select
from leanlm.data.io import iter_output
from leanlm.data.pipeline import LocalExecutor
from leanlm.errors import LeanLMError

VOCAB_A = [f"alpha{i}" for i in range(300)] + ["the", "of", "and"]
VOCAB_B = [f"beta{i}" for i in range(300)] + ["the", "of", "and"]


def mixed_docs(n: int, seed: int, share_a: tuple[float, float]) -> list[dict]:
    """Documents whose words come from vocabulary A with a per-document share drawn in ``share_a``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        p = rng.uniform(*share_a)
        n_words = rng.randrange(60, 260)
        words = [rng.choice(VOCAB_A if rng.random() < p else VOCAB_B) for _ in range(n_words)]
        for j in range(8, len(words), 9):
            words[j] += rng.choice([",", ".", ";"])
        docs.append({"id": f"s{seed}-{i}", "text": " ".join(words)})
    return docs


def write(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dsir")
    for j in range(3):
        write(root / "raw" / f"{j}.jsonl", mixed_docs(120, j, (0.0, 1.0)))
    write(root / "target" / "t.jsonl", mixed_docs(80, 99, (0.8, 1.0)))
    return root


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_weights_and_top_k_agree_with_data_selection(data: Path, tmp_path: Path) -> None:
    ds = pytest.importorskip("data_selection")
    config = DSIRConfig(min_example_length=100, top_k=True)
    ours, _ = importance_weights(data / "raw", data / "target", config,
                                       executor=LocalExecutor(1, progress=False))
    raw_files = sorted(str(p) for p in (data / "raw").glob("*.jsonl"))
    ref = ds.HashedNgramDSIR(raw_files, [str(data / "target" / "t.jsonl")], str(tmp_path / "cache"),
                             num_proc=1, min_example_length=100)
    ref.fit_importance_estimator(num_tokens_to_fit="auto")
    ref.compute_importance_weights()
    theirs = np.concatenate([np.load(tmp_path / "cache" / "log_importance_weights" / f"{i}.npy")
                             for i in range(len(raw_files))])
    assert spearman(np.concatenate(ours), theirs) >= 0.99
    np.testing.assert_allclose(np.concatenate(ours), theirs, rtol=1e-9, atol=1e-6)  # same features
    k = 100
    ref.resample(str(tmp_path / "ref_out"), num_to_sample=k, top_k=True)
    ref_ids = {json.loads(line)["id"] for f in (tmp_path / "ref_out").glob("*.jsonl")
               for line in f.read_text().splitlines()}
    select(data / "raw", data / "target", tmp_path / "out", k, config,
           executor=LocalExecutor(1, progress=False))
    our_ids = {d["id"] for d in iter_output(tmp_path / "out")}
    assert len(our_ids) == len(ref_ids) == k
    assert len(our_ids & ref_ids) / k >= 0.95


def test_sampling_favours_the_target_domain(data: Path, tmp_path: Path) -> None:
    stats = select(data / "raw", data / "target", tmp_path / "out", 60,
                   DSIRConfig(min_example_length=50), executor=LocalExecutor(2, progress=False))
    chosen = list(iter_output(tmp_path / "out"))
    def share(docs: list[dict]) -> float:  # mean fraction of words from vocabulary A
        return float(np.mean([np.mean([w.startswith("alpha") for w in d["text"].split()]) for d in docs]))

    raw = [json.loads(line) for f in sorted((data / "raw").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
    # log w sums over a document's n-grams, so long mixed documents compete with short pure ones
    assert share(chosen) > share(raw) + 0.15
    assert stats["documents"] == 60 and stats["stages"]["dsir"]["removed"] == {"dsir:not_selected": 300}


def test_asking_for_more_than_eligible_is_an_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(LeanLMError, match="only .* are at least 10000 words long"):
        select(data / "raw", data / "target", tmp_path / "out", 5,
               DSIRConfig(min_example_length=10_000), executor=LocalExecutor(1, progress=False))
