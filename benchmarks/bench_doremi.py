"""DoReMi on the default corpus: does the DoReMi mixture reach the uniform mixture's worst-domain
validation loss in fewer steps? (Xie et al. 2023's main claim, at a small scale.)

1. ``leanlm data doremi``: reference (uniform weights) and Group DRO proxy, ``--steps`` each;
2. two models of the same recipe trained from scratch for ``--steps``: one on the uniform mixture,
   one on the DoReMi weights, each evaluated on every domain's validation split every
   ``--eval-every`` steps;
3. the uniform model's final worst-domain loss L_u, and the first evaluated step at which the
   DoReMi model's worst-domain loss is at or below L_u.

    python benchmarks/bench_doremi.py --corpus CORPUS [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CACHE, machine
from leanlm.data.corpus import load_manifest
from leanlm.train import get_recipe
from leanlm.train.config import apply_overrides
from leanlm.train.doremi import DoReMiConfig, doremi
from leanlm.train.trainer import Trainer

SMALL = ["model.vocab_size=8192", "model.hidden_size=128", "model.num_layers=2",
         "model.intermediate_size=384", "model.num_heads=4", "model.num_kv_heads=4",
         "seq_len=128", "micro_batch=16", "lr=3e-3", "warmup_steps=20", "ckpt_every=100",
         "eval_windows=24"]


def train(cfg_overrides: list[str], out: Path) -> list[dict]:
    cfg = apply_overrides(get_recipe("tiny"), [*cfg_overrides, f"out={out}"])
    t = Trainer(cfg, quiet=True)
    try:
        t.run()
    finally:
        t.close()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1, help="iterated DoReMi rounds")
    ap.add_argument("--out", type=Path, default=CACHE / "doremi")
    args = ap.parse_args()
    print(f"# bench_doremi: {machine()}", flush=True)
    common = [*SMALL, f"data={args.corpus}", f"max_steps={args.steps}",
              f"eval_every={args.eval_every}", "progress=false"]
    t0 = time.perf_counter()
    base = apply_overrides(get_recipe("tiny"), common)
    result = doremi(args.corpus, args.out / "doremi", base, DoReMiConfig(rounds=args.rounds), quiet=True)
    for i, w in enumerate(result.get("rounds", [])):
        print(f"  round {i + 1}: " + ", ".join(f"{d} {v:.3f}" for d, v in w.items()), flush=True)
    print(f"DoReMi weights ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{d} {w:.3f}" for d, w in result["domain_weights"].items()), flush=True)
    domains = list(load_manifest(args.corpus)["domains"])
    uniform = json.dumps({d: 1.0 for d in domains})
    runs = {"uniform": train([*common, f"domain_weights={uniform}"], args.out / "uniform"),
            "doremi": train([*common, f"domain_weights={args.out / 'doremi' / 'weights.json'}"],
                            args.out / "doremi_model")}
    for name, evals in runs.items():
        print(f"{name}: " + "; ".join(f"step {e['step']}: worst {max(e['eval'].values()):.3f} "
                                      f"({max(e['eval'], key=e['eval'].get)})" for e in evals), flush=True)
        print("  final per-domain: " + ", ".join(f"{d} {v:.3f}" for d, v in runs[name][-1]["eval"].items()))
    target = max(runs["uniform"][-1]["eval"].values())
    hit = next((e["step"] for e in runs["doremi"] if max(e["eval"].values()) <= target), None)
    print(f"uniform final worst-domain loss {target:.3f} at step {runs['uniform'][-1]['step']}; "
          f"DoReMi reaches it at step {hit} "
          f"({'fewer' if hit is not None and hit < runs['uniform'][-1]['step'] else 'not fewer'} steps)")


if __name__ == "__main__":
    main()
