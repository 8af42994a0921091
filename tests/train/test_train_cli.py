"""`leanlm corpus build`, `leanlm tokenizer train`, `leanlm pretrain`, `leanlm eval` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def leanlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanlm.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_corpus_tokenizer_pretrain_eval(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(80):
        (src / f"n{i}.md").write_text(f"Note {i}: the king said {i * 7} times that code is poetry.\n" * 5)
    out = leanlm("corpus", "build", str(tmp_path / "corpus"), "--source", f"notes={src}",
                 "--val-fraction", "0.2")
    assert out.returncode == 0, out.stderr
    assert "notes" in out.stdout
    out = leanlm("tokenizer", "train", str(tmp_path / "corpus"), str(tmp_path / "tok"), "--vocab-size", "300")
    assert out.returncode == 0, out.stderr
    out = leanlm("pretrain", "--recipe", "tiny", "--data", str(tmp_path / "corpus"), "--tokenizer",
                 str(tmp_path / "tok"), "--out", str(tmp_path / "run"), "--max-steps", "12",
                 "--set", "precision=fp32", "--set", "eval_windows=3", "--set", "lr=1e-2", "--quiet")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    out = leanlm("eval", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "corpus"),
                 "--seq-len", "64", "--max-windows", "3", "--json")
    assert out.returncode == 0, out.stderr
    loss = json.loads(out.stdout)["domains"]["notes"]["loss"]
    assert abs(loss - result["eval"]["notes"]) / result["eval"]["notes"] < 0.01


def test_pretrain_errors_are_one_line(tmp_path):
    out = leanlm("pretrain", "--recipe", "tiny", "--data", str(tmp_path / "missing"), "--quiet")
    assert out.returncode == 2 and out.stderr.startswith("error:") and "does not exist" in out.stderr
    out = leanlm("pretrain", "--recipe", "nope")
    assert out.returncode == 2 and "unknown recipe 'nope'" in out.stderr
    out = leanlm("corpus", "build", str(tmp_path / "c"), "--source", "x")
    assert out.returncode == 2 and "expected DOMAIN=PATH" in out.stderr
    out = leanlm("eval", "--data", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stderr.startswith("error:")
