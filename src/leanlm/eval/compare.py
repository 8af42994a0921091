"""``leanlm compare``: what each quantization method and bit width costs on one model.

The grid is methods × bits at one group size, plus the full-precision model. Every cell is
quantized from a fresh copy of the model (in fp32, calibrated on the same windows), then
measured with the same protocol (after Li et al. 2024, "Evaluating Quantized LLMs"):

- quality: perplexity under the GPTQ protocol (``perplexity.py``) and the zero-shot tasks;
- agreement with the full model: mean next-token KL divergence on the perplexity windows and the
  fraction of task answers that flip (``agreement.py``);
- efficiency: the model's bytes in memory and of its checkpoint on disk, peak memory while
  generating, prefill and decode tokens/s at batch 1 in bf16 (``efficiency.py``), and the time
  quantization took.

Each cell is written to ``OUT/cells/<cell>.json`` when it is done (atomically), so an interrupted
grid resumes where it stopped; a cell whose method fails records the error and the grid goes on.
``report.md`` holds the table and the plots (``report.py``) are redrawn from the cells.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.fsutil import write_json


@dataclass
class GridConfig:
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq", "awq"])
    bits: list[int] = field(default_factory=lambda: [8, 4, 3])
    group_size: int = 128
    tasks: list[str] = field(default_factory=list)
    seq_len: int = 512
    max_windows: int = 0  # perplexity / KL windows (0 = all)
    calib_samples: int = 128
    calib_seq_len: int = 512
    speed: bool = True  # measure tokens/s and generation memory

    def __post_init__(self) -> None:
        from leanlm.quant import REGISTRY

        bad = [m for m in self.methods if m not in REGISTRY]
        if bad:
            raise LeanLMError(f"unknown method {bad[0]!r}: expected some of {tuple(REGISTRY)}")
        if not self.methods or not self.bits:
            raise LeanLMError("the grid needs at least one method and one bit width")


def cell_name(method: str, bits: int, group_size: int) -> str:
    return f"{method}-w{bits}-g{group_size}"


def _efficiency(model: torch.nn.Module, checkpoint: Path | None, speed: bool) -> dict:
    from leanlm.eval.efficiency import disk_bytes, model_bytes, peak_generation_bytes, tokens_per_s

    model = model.to(torch.bfloat16)  # the serving dtype: the packed int4/int8 kernels need bf16
    out: dict[str, Any] = {"memory_mib": model_bytes(model) / 2**20}
    if checkpoint is not None:
        out["disk_mib"] = disk_bytes(checkpoint) / 2**20
    if speed:
        decode, prefill = tokens_per_s(model)
        out |= {"decode_tok_s": decode, "prefill_tok_s": prefill}
        if checkpoint is not None:
            peak, added = peak_generation_bytes(checkpoint)
            out |= {"peak_rss_mib": peak / 2**20, "generation_mib": added / 2**20}
    return out


def run_grid(model_path: Path, out: Path, cfg: GridConfig, ppl_texts: list[str],
             calib_texts: list[str] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Measure every cell not already in ``out/cells``; returns all cells, the full model first."""
    from leanlm.checkpoint import load_model
    from leanlm.data.text import default_texts
    from leanlm.eval.evaluate import evaluate
    from leanlm.quant import REGISTRY, calibration_tokens, method_config, quantize_
    from leanlm.quant.formats import save_quantized
    from leanlm.tokenizer import load_tokenizer

    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_path)
    reference = load_model(model_path, dtype="float32").eval()
    measure = lambda m, ref=None, known=None: evaluate(
        m, tok, ppl_texts, cfg.tasks, cfg.seq_len, None, cfg.max_windows, ref, keep_predictions=True,
        reference_tasks=known)
    full_path = cells / "full.json"
    if full_path.is_file():
        full = json.loads(full_path.read_text())
    else:
        log("full precision: measuring")
        copy = load_model(model_path, dtype="float32").eval()  # _efficiency casts it to bf16
        # against itself: the KL is measured (0 up to rounding), not assumed
        full = {"cell": "full", "method": "full", "bits": 16, "group_size": None,
                **measure(reference, copy), **_efficiency(copy, model_path, cfg.speed)}
        write_json(full_path, full)
    results, calib = [full], None
    for method in cfg.methods:
        for bits in cfg.bits:
            name = cell_name(method, bits, cfg.group_size)
            path = cells / f"{name}.json"
            if path.is_file():
                done = json.loads(path.read_text())
                if "error" not in done:  # a cell that failed is tried again
                    log(f"{name}: done before, kept")
                    results.append(done)
                    continue
            log(f"{name}: quantizing and measuring")
            cell: dict[str, Any] = {"cell": name, "method": method, "bits": bits,
                                    "group_size": cfg.group_size}
            try:
                config = method_config(method, bits=bits, group_size=cfg.group_size)
                calibrated = REGISTRY[method].calibrated
                if calibrated and calib is None:
                    calib = calibration_tokens(calib_texts or default_texts(), tok, cfg.calib_samples,
                                               cfg.calib_seq_len)
                model = load_model(model_path, dtype="float32").eval()
                t0 = time.perf_counter()
                quantize_(model, config, calib if calibrated else None, progress=False)
                cell["quantize_s"] = time.perf_counter() - t0
                cell |= measure(model, reference, full.get("tasks"))
                model = model.to(torch.bfloat16)
                with tempfile.TemporaryDirectory() as tmp:
                    save_quantized(model, tmp, tok)
                    cell |= _efficiency(model, Path(tmp), cfg.speed)
            except Exception as e:  # one failing method is reported in its cell; the grid goes on
                cell["error"] = f"{type(e).__name__}: {e}"
                log(f"{name}: failed: {cell['error']}")
            write_json(path, cell)
            results.append(cell)
    return results
