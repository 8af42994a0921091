"""`leanlm compare` on a tiny model: the grid, its report and plots, resuming, a failing cell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from eval_fixtures import tiny_eval_files

from conftest import build_hf_model


def test_grid_report_resume_and_a_failing_cell(tmp_path: Path) -> None:
    model, text, task = tiny_eval_files(tmp_path, task_name="t")
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "leanlm.cli", "compare", str(model), "--out", str(out), "--ppl", str(text),
            "--methods", "rtn,gptq", "--bits", "8,4,5", "--group-size", "32", "--tasks", str(task),
            "--calib", str(text), "--calib-samples", "4", "--seq-len", "32", "--no-speed"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {"full", "rtn-w8-g32", "rtn-w4-g32", "rtn-w5-g32", "gptq-w8-g32", "gptq-w4-g32",
                          "gptq-w5-g32"}
    assert "error" in cells["rtn-w5-g32"] and "bits" in cells["rtn-w5-g32"]["error"]  # 5 bits: unsupported
    ok = {k: v for k, v in cells.items() if "error" not in v}
    assert len(ok) == 5
    assert all(v["perplexity"]["ppl"] > 1 and 0 <= v["tasks"]["t"]["acc"] <= 1 for v in ok.values())
    # fewer bits, further from the full model; memory shrinks. The full model against a second copy
    # of itself is 0 up to rounding (once in five CI runs 2.8e-9, against w8's ~5e-7)
    assert 0 <= cells["full"]["kl"] <= 0.05 * cells["rtn-w8-g32"]["kl"]
    assert 0 < cells["rtn-w8-g32"]["kl"] < cells["rtn-w4-g32"]["kl"]
    assert cells["rtn-w4-g32"]["memory_mib"] < cells["rtn-w8-g32"]["memory_mib"] < cells["full"]["memory_mib"]
    report = (out / "report.md").read_text()
    assert "| rtn | 4 | 32 |" in report and "failed:" in report
    assert all((out / f).stat().st_size > 1000 for f in ("ppl_vs_bits.png", "quality_vs_size.png",
                                                          "decode_speed.png"))
    # an interrupted grid resumes: finished cells are kept, a missing one is measured again
    (out / "cells" / "gptq-w4-g32.json").unlink()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "rtn-w8-g32: done before, kept" in again.stderr and "gptq-w4-g32: quantizing" in again.stderr
    assert (out / "cells" / "gptq-w4-g32.json").is_file()


def test_peak_generation_memory_is_measured_in_a_fresh_process(tmp_path: Path) -> None:
    from leanlm.eval.efficiency import peak_generation_bytes

    model = tmp_path / "m"
    build_hf_model("llama").save_pretrained(model)
    peak, added = peak_generation_bytes(model, prompt=16, new_tokens=4)
    assert peak > 50 * 2**20 and 0 <= added < peak  # a python + torch process, and the generation's share
