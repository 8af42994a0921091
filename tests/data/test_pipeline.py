"""The pipeline: statistics, executors, resumption after a crash or a kill, the data CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from leanlm.data.filters import LengthFilter
from leanlm.data.io import iter_output
from leanlm.data.pipeline import Context, Doc, LocalExecutor, Pipeline, Stage, StageStats
from leanlm.errors import LeanLMError


def make_inputs(root: Path, files: int = 6, docs: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({"id": f"{f}-{i}", "text": "word " * (i % 13)}) for i in range(docs)]
        (root / f"{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def output_of(out: Path) -> list[dict]:
    return list(iter_output(out))


@dataclass
class CrashOnce(Stage):
    """Raises in one task while ``flag`` exists (a crash in the middle of a run)."""

    flag: str
    task: int
    name = "crash_once"

    def __call__(self, docs: Iterator[Doc], stats: StageStats, ctx: Context) -> Iterator[Doc]:
        for i, doc in enumerate(docs):
            if ctx.task == self.task and i == 5 and os.path.exists(self.flag):
                raise RuntimeError("simulated crash")
            yield doc


def test_stats_count_removals_per_rule(tmp_path: Path) -> None:
    inp = make_inputs(tmp_path / "in", files=2, docs=26)
    stats = Pipeline([LengthFilter(min_chars=10), LengthFilter(max_chars=40)]).run(
        inp, tmp_path / "out", LocalExecutor(1, progress=False))
    # text lengths are 5·(i % 13): < 10 for i%13 in {0, 1}; > 40 for i%13 >= 9
    assert stats["stages"]["length#1"]["docs_in"] == 52
    assert stats["stages"]["length#1"]["removed"] == {"length:min_chars": 8}
    assert stats["stages"]["length#2"]["removed"] == {"length:max_chars": 16}
    assert stats["documents"] == 2 * 2 * 7 == len(output_of(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["00000.jsonl.gz", "00001.jsonl.gz"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_crash_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    inp = make_inputs(tmp_path / "in")
    flag = tmp_path / "crash"
    flag.touch()
    stages = [CrashOnce(str(flag), task=3), LengthFilter(min_chars=10)]
    ex = LocalExecutor(2, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pipeline(stages).run(inp, tmp_path / "out", ex)
    assert not (tmp_path / "out" / "00003.jsonl.gz").exists()  # no partial shard under its name
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / ".done").glob("*.json")}
    assert done and "00003.json" not in done
    flag.unlink()
    Pipeline(stages).run(inp, tmp_path / "out", ex)
    Pipeline(stages).run(inp, tmp_path / "clean", ex)
    assert output_of(tmp_path / "out") == output_of(tmp_path / "clean")
    assert all((tmp_path / "out" / ".done" / n).stat().st_mtime_ns == t for n, t in done.items())
    with pytest.raises(LeanLMError, match="different job"):
        Pipeline([LengthFilter(min_chars=11)]).run(inp, tmp_path / "out", ex)


def test_killed_cli_run_resumes_to_the_same_output(tmp_path: Path) -> None:
    inp = make_inputs(tmp_path / "in", files=40, docs=400)
    cmd = [sys.executable, "-m", "leanlm.cli", "data", "filter", str(inp), str(tmp_path / "out"),
           "--rule", "gopher_repetition", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "out" / ".done"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(done.glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(done.glob("*.json")))
    assert 3 <= finished < 40, "the run should be killed part-way"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    clean = subprocess.run([*cmd[:6], str(tmp_path / "clean"), *cmd[7:]], capture_output=True)
    assert clean.returncode == 0
    assert output_of(tmp_path / "out") == output_of(tmp_path / "clean")
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n{oops\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "leanlm.cli", "data", *a],
                                    capture_output=True, text=True)
    r = run("filter", str(tmp_path / "in"), str(tmp_path / "out"), "--rule", "length", "--workers", "1")
    assert r.returncode == 2 and "a.jsonl:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    r = run("filter", str(tmp_path / "in"), str(tmp_path / "out2"), "--rule", "length", "--workers", "1",
            "--on-error", "skip")
    assert r.returncode == 0 and "skipped 1 bad lines" in r.stderr
    r = run("filter", str(tmp_path / "in"), str(tmp_path / "o3"), "--set", "gopher_quality.min_wordz=3")
    assert r.returncode == 2 and "has no parameter 'min_wordz'" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("dedup", str(tmp_path / "empty"), str(tmp_path / "o4"))
    assert r.returncode == 2 and "no input files under" in r.stderr
    r = run("stats", str(tmp_path / "in"), "--on-error", "skip")
    assert r.returncode == 0 and "total" in r.stdout
