"""Training metrics: FLOPs per token, peak FLOP/s for MFU, memory, and the JSONL + progress log."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from leanlm.config import ModelConfig

# dense bf16 tensor-core peaks (TFLOP/s) by device name fragment
_GPU_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """6·N (matmul parameters, input embedding excluded) + 12·L·d·T (attention, PaLM appendix B)."""
    n = m.num_parameters(False) + m.hidden_size * m.vocab_size  # + the output head
    return 6 * n + 12 * m.num_layers * m.num_heads * m.head_dim * seq_len


def peak_flops(device: torch.device, tflops: float) -> float:
    if tflops:
        return tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in _GPU_PEAKS.items() if k in name), 0.0)
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Appends records to a JSONL file and drives a rich progress bar (rank 0 only)."""

    def __init__(self, path: Path, device: torch.device, enabled: bool, progress: bool, total: int,
                 start: int) -> None:
        self.path, self.device, self.enabled, self.show = path, device, enabled, progress and enabled
        self.total, self.start = total, start
        self._progress: Any = None

    def __enter__(self) -> MetricsLogger:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def record(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self._progress is not None and "eval" in rec:
                ev = "  ".join(f"{k} {v:.3f}" for k, v in rec["eval"].items())
                self._progress.console.print(f"step {rec['step']} eval: {ev}")

    def step(self, rec: dict[str, Any], log: bool) -> None:
        if not self.enabled:
            return
        rec["mem_gib"] = peak_memory_gib(self.device)
        if log:
            self.record(rec)
        if self._progress is not None:
            info = f"loss {rec['loss']:.3f}  {rec['tokens_per_s']:,.0f} tok/s"
            if "mfu" in rec:
                info += f"  MFU {rec['mfu']:.1%}"
            self._progress.update(self._task, completed=rec["step"], info=info)
