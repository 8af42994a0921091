"""The whole process, as a user runs it: ``leanlm generate`` against transformers, load + generate.

Each run is a fresh Python process timed from start to exit (imports, loading the checkpoint,
generating, printing), the two tools alternating, median of ``--rounds``; and each process's
peak resident memory (``VmHWM``, read at exit) over the safetensors' size. The checkpoint is a
random-weight bf16 checkpoint of a preset shape (default llama-3.2-1b, 2.3 GiB) with the
embedded default model's tokenizer; greedy, the same prompt, ``--new-tokens`` tokens (96 and 16
by default). transformers runs ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` +
``generate`` (eager, SDPA: what its users run from a script); leanlm runs its CLI
(``load_model(pack=True)``: each linear repacked once, straight from the file mapping).

Besides leanlm as it loads by default, a row with its projections fused (``LEANLM_FUSE=1``).

    python benchmarks/bench_cpu_start.py [--preset llama-3.2-1b] [--new-tokens 96 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, random_checkpoint
from leanlm import DEFAULT_MODEL

PROMPT = "The history of the city begins with a small settlement on the river, where"
PEAK = """
import atexit, sys
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write(f"\\nVmHWM {int(line.split()[1]) * 1024}\\n")
atexit.register(peak)
"""
LEANLM = PEAK + """
from leanlm.cli import main
sys.argv = ["leanlm", "generate", sys.argv[1], "--prompt", sys.argv[2], "--max-new-tokens", sys.argv[3]]
main()
"""
TRANSFORMERS = PEAK + """
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
path, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
ids = tok(prompt, return_tensors="pt").input_ids
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids.shape[1]:]))
print(f"{out.shape[1] - ids.shape[1]} tokens", file=sys.stderr)
"""


def checkpoint(preset: str) -> Path:
    path = random_checkpoint(preset)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


# leanlm as it loads by default (on the CPU: each projection packed apart), with q/k/v and gate/up
# fused before packing (LEANLM_FUSE=1, a GPU load's default), and transformers
TOOLS = {"leanlm": (LEANLM, {}), "leanlm, projections fused": (LEANLM, {"LEANLM_FUSE": "1"}),
         "transformers": (TRANSFORMERS, {})}


def run(script: str, path: Path, new: int, env: dict[str, str]) -> tuple[float, int]:
    """(seconds from process start to exit, peak resident bytes)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, str(path), PROMPT, str(new)], capture_output=True,
                         text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    peak = int(next(line for line in out.stderr.splitlines() if line.startswith("VmHWM")).split()[1])
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[96, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = checkpoint(args.preset)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"# bench_cpu_start: {args.preset} bf16 ({size / 2**30:.2f} GiB of safetensors), whole process, "
          f"median of {args.rounds}; {machine()}", flush=True)
    print("| new tokens | tool | whole process (s) | speed-up over transformers | peak RSS / file |")
    print("|---:|---|---:|---:|---:|")
    for new in args.new_tokens:
        times: dict[str, list[float]] = {name: [] for name in TOOLS}
        peaks: dict[str, list[int]] = {name: [] for name in TOOLS}
        for _ in range(args.rounds):
            for name, (script, env) in TOOLS.items():
                seconds, peak = run(script, path, new, env)
                times[name].append(seconds)
                peaks[name].append(peak)
        theirs = statistics.median(times["transformers"])
        for name in TOOLS:
            ours = statistics.median(times[name])
            print(f"| {new} | {name} | {ours:.2f} | {theirs / ours:.2f}x | {max(peaks[name]) / size:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
