"""Fault tolerance: a rank killed mid-run under ``torchrun --max-restarts 1`` and a SIGTERM'd run
both end with the uninterrupted run's losses, exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import pretrain_command, pretrain_records, step_records
from leanlm.train.elastic import EXIT_PREEMPTED, truncate_metrics

pytestmark = pytest.mark.dist

STEPS = 12
SETS = ("micro_batch=2", "parallel=fsdp")


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = out / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in step_records(out)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout} s")


def workers(agent: int) -> list[int]:
    """The worker processes torchrun's agent ``agent`` started (its child processes)."""
    out = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("whole") / "run"
    return [r["loss"] for r in pretrain_records(tiny_data, out, *SETS, "ckpt_every=5", nproc=2, steps=STEPS)]


def test_a_killed_rank_restarts_from_the_last_checkpoint(tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args, env = pretrain_command(tiny_data, out, *SETS, "ckpt_every=5", "progress=false", nproc=2,
                                 steps=STEPS, max_restarts=1)
    args.remove("--quiet")  # the log says where the restart resumed
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 7, proc)
    victim = workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "steps 5->12" in stderr  # the restarted ranks resumed from step 5's checkpoint
    records = step_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # the log reads as one run
    assert [r["loss"] for r in records] == uninterrupted
    assert (out / "model" / "model.safetensors").is_file()


def test_sigterm_writes_a_checkpoint_and_the_rerun_matches(tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args, env = pretrain_command(tiny_data, out, *SETS, "ckpt_every=100", nproc=2, steps=STEPS)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 3, proc)
    ranks = workers(proc.pid)
    for pid in ranks:  # as a scheduler signals every task; the ranks see it at different steps
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "preempted (SIGTERM)" in stderr, stderr[-3000:]
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= int(saved[0].split("-")[1]) < STEPS  # written on the signal
    rerun, env = pretrain_command(tiny_data, out, *SETS, "ckpt_every=100", nproc=2, steps=STEPS)
    assert subprocess.run(rerun, env=env, capture_output=True, timeout=300).returncode == 0
    assert [r["loss"] for r in step_records(out)] == uninterrupted


def test_sigterm_in_one_process_exits_143(tiny_data, tmp_path):
    args, env = pretrain_command(tiny_data, tmp_path / "run", "ckpt_every=100", steps=STEPS)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "run the same command again to resume" in stderr


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4, "loss": 1.0}\n{"step": 5, "eval": {}}\n{"step": 6, "loss": 0.9}\n'
                    '{"step": 7, "lo')  # the crash cut the last line short
    assert truncate_metrics(path, 5) == 2
    assert path.read_text() == '{"step": 4, "loss": 1.0}\n{"step": 5, "eval": {}}\n'
    assert truncate_metrics(path, 5) == 0 and truncate_metrics(tmp_path / "missing.jsonl", 5) == 0
