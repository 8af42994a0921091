"""The cost of checkpointing every step: none, synchronous DCP saves, and background saves.

The ``default`` recipe's model (10M parameters: 40 MB of fp32 weights, 120 MB with AdamW's two
moments) trains ``--steps`` steps in one process, fp32, in three settings that alternate over
``--rounds`` (fresh output directories each time): no checkpoint in the loop, a synchronous
checkpoint after every step (``dcp.save``: the loop waits for the shards), and a background one
(``async_checkpoint=true``: ``dcp.async_save``; the loop waits for a copy in host memory, a thread
writes the shards while the next steps run). Reported: median wall time per step of the loop
(the trainer's own step records do not include the save), and each setting's overhead over no
checkpointing. The issue's target: background overhead at most a third of synchronous overhead.
``--threads N`` gives the step N intra-op threads (default: every core); with fewer threads than
cores the background writer has a core of its own, as on a GPU host, where the step does not
run on the host's cores.

    python benchmarks/bench_checkpoint.py [--steps 8] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine
from leanlm import DEFAULT_MODEL
from leanlm.data.corpus import build_corpus, default_sources
from leanlm.train import get_recipe
from leanlm.train.config import apply_overrides
from leanlm.train.trainer import Trainer

SETTINGS = {"none": ["ckpt_every=1000000"], "sync": ["ckpt_every=1"],
            "background": ["ckpt_every=1", "async_checkpoint=true"]}


def corpus(root: Path) -> Path:
    """A one-domain corpus of 2 MB of stdlib code for the recipe's loader."""
    build_corpus(root / "corpus", {"code": default_sources()["code"]}, max_domain_bytes=2_000_000)
    return root / "corpus"


def run(setting: str, data: Path, steps: int) -> float:
    """Seconds per step of the training loop (its first step, which builds caches, excluded)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = apply_overrides(get_recipe("default"), [
            f"data={data}", f"tokenizer={DEFAULT_MODEL}", f"out={out}", f"max_steps={steps + 1}",
            "precision=fp32", "eval_every=0", "progress=false", "micro_batch=4", "grad_accum=1",
            "keep_checkpoints=2", *SETTINGS[setting]])
        trainer = Trainer(cfg, quiet=True)
        trainer.run(stop_after=1)
        start = time.perf_counter()
        trainer.run(stop_after=steps)
        seconds = time.perf_counter() - start
        trainer.close()
    return seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_checkpoint: default recipe (10M params), fp32, micro-batch 4 x 512, one process, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} intra-op threads; "
          f"{machine()}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        data = corpus(Path(root))
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                times[setting].append(run(setting, data, args.steps))
    med = {s: statistics.median(t) for s, t in times.items()}
    print("| checkpoint every step | s / step | overhead over none |")
    print("|---|---:|---:|")
    for s in SETTINGS:
        print(f"| {s} | {med[s]:.3f} | {med[s] - med['none']:+.3f} s |")
    sync, bg = med["sync"] - med["none"], med["background"] - med["none"]
    print(f"background overhead / synchronous overhead: {bg / sync:.2f} (target <= 0.33)")


if __name__ == "__main__":
    main()
