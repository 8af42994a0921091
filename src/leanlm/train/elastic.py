"""Surviving failures and preemption: restart from the last complete checkpoint; checkpoint on SIGTERM.

The survey's fault-tolerant training systems (Varuna, Bamboo, Oobleck; torchelastic in PyTorch)
share one contract with the training loop, which is all this module adds to it:

- **Elastic restart.** Under ``torchrun --max-restarts N`` (with ``--rdzv-backend c10d
  --rdzv-endpoint HOST:PORT`` across machines) the agent watches its workers; when one dies
  (killed, out of memory, a lost machine) it stops the others and starts the whole group again,
  up to N times. The new processes build the :class:`~leanlm.train.trainer.Trainer`, which
  resumes from the newest *complete* checkpoint (checkpoints are written to a temporary name and
  renamed, so a crash mid-write leaves the previous one): model, optimizer, data position and
  RNG. The steps after it are then the uninterrupted run's, bit for bit; the work since the
  checkpoint (at most ``ckpt_every`` steps) is lost and redone. :func:`truncate_metrics` cuts the
  metrics log back to the checkpoint's step, so it reads as one run.
- **Preemption.** A scheduler (Slurm, Kubernetes, a spot instance's notice) sends SIGTERM, and
  torchrun forwards it to every worker. The handler only sets a flag (:class:`Preemption`); after
  the step in flight the ranks agree on it — an all-reduce (MAX) of the flag, one integer per
  step, since the signal reaches ranks at different moments and a checkpoint is a collective
  that every rank must enter at the same step — write a checkpoint, and stop with
  :class:`Preempted` (the command exits with 143 = 128 + SIGTERM). Rerunning the same command
  resumes from it.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from leanlm.errors import LeanLMError
from leanlm.fsutil import atomic_write

EXIT_PREEMPTED = 128 + signal.SIGTERM


class Preempted(LeanLMError):
    """Training stopped on SIGTERM after writing a checkpoint at ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"preempted (SIGTERM): checkpoint {path} written at step {step}; "
                         f"run the same command again to resume")
        self.step, self.path = step, path


class Preemption:
    """``with Preemption(device) as p: ... if p.requested(): ...`` — SIGTERM sets a flag that
    every rank reads at the same step (see the module docstring). The previous handler comes
    back on exit. Outside the main thread (where Python cannot install handlers) it never fires."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signalled = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        """Whether any rank has been signalled (a collective when there are several ranks)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signalled
        flag = torch.tensor([int(self.signalled)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` (metrics JSONL) past ``step``, those of the steps a restart
    redoes; returns how many were dropped. Lines that are not JSON objects with a step are kept."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write(path, "".join(line + "\n" for line in kept))
    return dropped
