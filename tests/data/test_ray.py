"""The Ray executor (a local Ray instance) gives the same output as the local one."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanlm.data.dedup import DedupConfig, deduplicate
from leanlm.data.dsir import DSIRConfig, select
from leanlm.data.filters import GopherRepetition, LengthFilter
from leanlm.data.io import iter_output
from leanlm.data.pipeline import LocalExecutor, Pipeline

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[object]:
    from leanlm.data.pipeline import RayExecutor

    ex = RayExecutor(num_cpus=2, progress=False)
    yield ex
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_in")
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(20, 200))) for _ in range(120)]
    docs += [d.replace("w1 ", "w2 ", 1) for d in docs[:20]]  # near duplicates
    for f in range(4):
        lines = [json.dumps({"id": f"{f}-{i}", "text": docs[i]}) for i in range(f, len(docs), 4)]
        (root / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_pipeline_dedup_and_dsir_match_the_local_executor(ray_executor: object, corpus: Path,
                                                          tmp_path: Path) -> None:
    local = LocalExecutor(1, progress=False)
    stages = [LengthFilter(min_chars=200), GopherRepetition()]
    assert Pipeline(stages).run(corpus, tmp_path / "p_ray", ray_executor) == \
        Pipeline(stages).run(corpus, tmp_path / "p_local", local)
    assert list(iter_output(tmp_path / "p_ray")) == list(iter_output(tmp_path / "p_local"))
    d_ray = deduplicate(corpus, tmp_path / "d_ray", DedupConfig(), executor=ray_executor)
    d_local = deduplicate(corpus, tmp_path / "d_local", DedupConfig(), executor=local)
    assert d_ray == d_local and d_ray["dedup"]["duplicates"] >= 15
    assert list(iter_output(tmp_path / "d_ray")) == list(iter_output(tmp_path / "d_local"))
    config = DSIRConfig(min_example_length=20)
    select(corpus, corpus / "0.jsonl", tmp_path / "s_ray", 30, config, executor=ray_executor)
    select(corpus, corpus / "0.jsonl", tmp_path / "s_local", 30, config, executor=local)
    assert list(iter_output(tmp_path / "s_ray")) == list(iter_output(tmp_path / "s_local"))
