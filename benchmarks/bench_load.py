"""Loading cost: peak memory and time of loading a bf16 checkpoint, leanlm vs transformers.

Each loader runs in a fresh subprocess; peak memory is the process's peak resident set
(ru_maxrss) minus its resident set just before loading (after imports), divided by the size of
the safetensors file. Each loader then runs one forward pass, so that weights which are mapped
lazily are counted once touched. leanlm builds on the meta device and reads each tensor once into
its final buffer (or maps it with ``mmap=True``), so the target is under 1.3x the file size.
``pack=True`` (what ``leanlm generate``/``serve``/``eval`` do) repacks each linear from the file
mapping into oneDNN's layout; the other loaders' weights are packed by their first forward, which
is not timed here (the whole process is: ``bench_cpu_start.py``).

    python benchmarks/bench_load.py [--preset llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from common import machine, random_checkpoint

CHILD = r"""
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import psutil, torch
which, path = sys.argv[1], sys.argv[2]
if which == "transformers":
    import transformers
else:
    import leanlm
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
with torch.inference_mode():  # one forward touches every weight: lazily mapped pages count too
    if which == "transformers":
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        m(torch.zeros(1, 1, dtype=torch.long))
    else:
        m = leanlm.load_model(path, mmap=(which == "leanlm-mmap"), pack=(which == "leanlm-pack"))
        m(torch.zeros(1, 1, dtype=torch.long))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    args = ap.parse_args()
    path = random_checkpoint(args.preset, torch.bfloat16)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"machine: {machine()}")
    print(f"checkpoint: {args.preset} bf16, {size / 2**30:.2f} GiB of safetensors")
    results = {}
    for which in ("leanlm", "leanlm-mmap", "leanlm-pack", "transformers"):
        out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[which] = r
        delta = (r["peak"] - r["base"]) / size
        print(f"  {which:13s} load {r['seconds']:5.1f} s   peak +{(r['peak'] - r['base']) / 2**30:5.2f} GiB"
              f" = {delta:.2f}x file size   (process peak {r['peak'] / size:.2f}x)")
    lean, hf = results["leanlm"], results["transformers"]
    print(f"leanlm peak / transformers peak (above baseline): "
          f"{(lean['peak'] - lean['base']) / (hf['peak'] - hf['base']):.2f}")


if __name__ == "__main__":
    main()
