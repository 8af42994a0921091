"""Perplexity filtering with the embedded default model: random strings go, prose stays."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from leanlm.data.io import iter_output
from leanlm.data.pipeline import LocalExecutor
from leanlm.data.ppl_filter import PerplexityConfig, band, ppl_filter
from leanlm.errors import LeanLMError

PROSE = [
    "The module provides functions for working with files and directories in a portable way.",
    "Return a new list containing all items from the iterable in ascending order.",
    "This function is called when the interpreter exits, after all threads have finished.",
    "If the optional argument is given, it is used as the default value for missing keys.",
    "The following example shows how to read a configuration file and print its sections.",
    "Raise an exception if the path does not exist or cannot be opened for reading.",
]


def gibberish(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(string.ascii_letters + "#@%") for _ in range(rng.randrange(3, 9)))
                    for _ in range(15))


def test_band_is_a_percentile_range_over_all_files() -> None:
    scores = [np.array([1.0, 50.0, 3.0]), np.array([100.0, 2.0, np.inf])]
    assert [k.tolist() for k in band(scores, 0, 50)] == [[0, 2], [1]]
    with pytest.raises(LeanLMError, match="percentile band"):
        PerplexityConfig(low=60, high=50)


def test_gibberish_is_filtered_out(tmp_path: Path) -> None:
    rng = random.Random(0)
    docs = [{"id": f"p{i}", "text": t} for i, t in enumerate(PROSE)]
    docs += [{"id": f"g{i}", "text": gibberish(rng)} for i in range(4)]
    rng.shuffle(docs)
    (tmp_path / "in").mkdir()
    for j in range(2):
        (tmp_path / "in" / f"{j}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[j::2]))
    stats = ppl_filter(tmp_path / "in", tmp_path / "out", PerplexityConfig(high=60),
                       executor=LocalExecutor(1, progress=False))
    kept = {d["id"] for d in iter_output(tmp_path / "out")}
    assert kept == {f"p{i}" for i in range(6)}
    assert stats["stages"]["perplexity"]["removed"] == {"perplexity:outside_band": 4}
    info = json.loads((tmp_path / "out" / ".work" / "scores.json").read_text())
    assert info["documents"] == 10 and info["percentiles"]["100"] > 5 * info["percentiles"]["0"]
