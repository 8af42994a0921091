"""``bench_quant.py --peers``: leanlm's GPTQ and AWQ against GPTQModel's, on the embedded default
model, at W4 and W3, over several calibration sets.

    python benchmarks/bench_quant.py --peers [--samples 128] [--seq-len 512] [--seeds 5] [--only X]

The same on both sides: the calibration windows (bench_quant's: ``--samples`` x ``--seq-len``
tokens of the corpus's train split, one window per sample, no concatenation; seeds 0 ..
``--seeds``-1, each a different set of windows), bits, group size (``leanlm quantize``'s
``--group-size auto``: the largest of 128/64/32 dividing every K — 32 for this model's K = 320
and 864), act-order, calibration in fp32 from the bf16 checkpoint (except GPTQModel's AWQ: bf16,
because in fp32 it returns a broken model, see ``gptqmodel_peer.load_unquantized``), and the
output: a checkpoint (GPTQ; AWQ GEMM at 4 bits) that leanlm loads and scores with one perplexity
code in bf16 (``tests/quant/test_peers.py`` shows leanlm reads GPTQModel's checkpoints with the
logits of gptqmodel's own CPU kernel). Each quantization runs in a process of its own, which
reports the time of the quantize call alone (loading and saving excluded) and its peak RSS.

Why seeds: GPTQ's result moves with the last bits of its inputs. One calibration set's Δppl is
one draw: across seeds it spreads by ~0.02 ppl at W4 and ~0.04 at W3 on this model, more than
the two tools differ by. So every row is quantized on each seed's windows; the table gives the
mean and standard deviation of Δppl, and the verdicts compare means, with the paired difference
(same seed, both tools) and its standard error beside them.

GPTQ defaults are the same on both sides (GPTQModel's: damp 0.05, raised on a failed Cholesky;
group-aware reordering, GAR, when act-order is off); leanlm does not offload finished layers to
disk. The "(damp 0.01, no GAR)" rows run both tools at the reference implementation's settings.
AWQ: both asymmetric with the clip search (gptqmodel's made to accept output sizes that are not
a multiple of 64: ``gptqmodel_peer.awq_clip_any_width``); GPTQModel's AWQ formats and kernels
are 4-bit only, so AWQ is compared at W4 only (bench_quant.py's default rows have leanlm's W3 AWQ).

Runs where gptqmodel is installed (scripts/setup_peers.sh), ``GPTQMODEL_CPU_WORKERS`` = cores.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import gptqmodel_peer as peer
from common import CACHE, machine
from leanlm import DEFAULT_MODEL, load_model, load_tokenizer
from leanlm.quant import AWQConfig, GPTQConfig, quantize_
from leanlm.quant.api import choose_group_size
from leanlm.quant.formats import save_quantized

WORK = CACHE / "quant-peers"


@dataclass(frozen=True)
class Row:
    tool: str  # leanlm | GPTQModel
    method: str  # gptq | awq
    bits: int
    act_order: bool = False
    reference: bool = False  # GPTQ at the reference implementation's settings: damp 0.01, no GAR

    @property
    def label(self) -> str:
        return self.method.upper() + (" act-order" if self.act_order else "") + \
            (" (damp 0.01, no GAR)" if self.reference else "")

    @property
    def slug(self) -> str:
        return f"{self.tool}-{self.method}-w{self.bits}{'-act' if self.act_order else ''}" \
               f"{'-ref' if self.reference else ''}"


def rows() -> list[Row]:
    out = []
    for bits in (4, 3):
        for act in (False, True):
            out += [Row("leanlm", "gptq", bits, act), Row("GPTQModel", "gptq", bits, act)]
        out += [Row("leanlm", "gptq", bits, reference=True), Row("GPTQModel", "gptq", bits, reference=True)]
    # GPTQModel's AWQ is 4-bit only (so is AutoAWQ's GEMM format): no W3 AWQ pair to compare
    return [*out, Row("leanlm", "awq", 4), Row("GPTQModel", "awq", 4)]


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in bytes. Not
    ``ru_maxrss``: Linux carries that across exec from the parent that forked this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: str) -> None:
    """Quantize one row into ``out`` and print its measurements as the last line (JSON)."""
    job = json.loads(spec)
    row, group, out = Row(**job["row"]), job["group"], Path(job["out"])
    from safetensors.torch import load_file

    calib = load_file(job["calib"])["calib"]
    if row.tool == "leanlm":
        model = load_model(DEFAULT_MODEL, dtype="float32")
        reference = dict(damp_percent=0.01, group_aware=False) if row.reference else {}
        config = (GPTQConfig(row.bits, group, act_order=row.act_order, **reference) if row.method == "gptq"
                  else AWQConfig(row.bits, group))
        loaded = rss()
        seconds = _timed(lambda: quantize_(model, config, calib, progress=False))
        peak = rss("VmHWM")
        model.to(torch.bfloat16)  # as `leanlm quantize` does: the checkpoint's own dtype
        fmt = "awq" if row.method == "awq" and row.bits == 4 else "gptq"
        save_quantized(model, out, load_tokenizer(DEFAULT_MODEL), format=fmt)
    else:
        overrides: dict[str, Any] = dict(damp_percent=0.01, act_group_aware=False) if row.reference else {}
        config = peer.quantize_config(row.method, row.bits, group, row.act_order, **overrides)
        model = peer.load_unquantized(DEFAULT_MODEL, config)  # GPTQ fp32; AWQ bf16 (fp32 breaks it)
        loaded = rss()
        seconds = peer.quantize(model, calib)
        peak = rss("VmHWM")
        model.save(str(out))
    print("RESULT " + json.dumps({"seconds": seconds, "loaded": loaded, "peak": peak}))


def _timed(fn: Callable[[], object]) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_child(row: Row, group: int, calib: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    job = json.dumps({"row": asdict(row), "group": group, "calib": str(calib), "out": str(out)})
    script = Path(__file__).with_name("bench_quant.py")
    proc = subprocess.run([sys.executable, str(script), "--peer-child", job], capture_output=True, text=True,
                          cwd=WORK)  # GPTQModel writes its logs/ into the working directory
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail[:120]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def peers(args: argparse.Namespace, eval_data: Callable[..., tuple],
          perplexity: Callable[..., float]) -> None:
    if not peer.available():
        sys.exit("gptqmodel is not installed here: run this in the peers venv (scripts/setup_peers.sh)")
    from safetensors.torch import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    calib_files = []
    for seed in range(args.seeds):
        tok, val, calib = eval_data(args, seed=seed)
        calib_files.append(WORK / f"calib-seed{seed}.safetensors")
        save_file({"calib": calib.contiguous()}, calib_files[-1])
    fp = load_model(DEFAULT_MODEL, dtype="bfloat16")
    group = choose_group_size(fp, "auto")
    fp_ppl = perplexity(fp, tok, val, args)
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("gptqmodel", "transformers"))
    print(f"# bench_quant --peers: default model, {machine()}; {versions}")
    print(f"# calibration {args.samples} x {args.seq_len} train tokens, the same windows for both tools, "
          f"fp32, seeds 0-{args.seeds - 1} (one set of windows each); group {group}; eval: val splits of "
          f"{', '.join(val)}, {f'the first {args.max_windows} ' if args.max_windows else 'all '}windows of "
          f"{args.eval_len}, bf16, leanlm's loader and perplexity for every checkpoint; Δppl: mean ± sd "
          f"over the seeds; quantize s and RSS: medians")
    print("| tool | method | bits | group | Δppl mean ± sd | Δppl per seed | Δ% (mean) | quantize s | "
          "peak RSS MiB | RSS added MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| — | bf16 | 16 | — | ppl {fp_ppl:.3f} | — | — | — | — | — |", flush=True)
    results: dict[Row, tuple[list[float], float]] = {}
    for row in rows():
        if args.only and args.only not in row.label and args.only != row.tool:  # GPTQModel ∌ "GPTQ"
            continue
        deltas, runs = [], []
        try:
            for seed, calib_file in enumerate(calib_files):
                out = WORK / f"{row.slug}-seed{seed}"
                runs += [run_child(row, group, calib_file, out) for _ in range(args.rounds)]
                deltas.append(perplexity(load_model(out, dtype="bfloat16"), tok, val, args) - fp_ppl)
                shutil.rmtree(out, ignore_errors=True)
        except RuntimeError as e:
            print(f"| {row.tool} | {row.label} | {row.bits} | {group} | failed: {e} |", flush=True)
            continue
        secs = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak"] for r in runs) / 2**20
        added = statistics.median(r["peak"] - r["loaded"] for r in runs) / 2**20
        results[row] = (deltas, secs)
        mean = statistics.mean(deltas)
        sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        print(f"| {row.tool} | {row.label} | {row.bits} | {group} | {mean:+.3f} ± {sd:.3f} | "
              f"{' '.join(f'{d:+.3f}' for d in deltas)} | {100 * mean / fp_ppl:+.2f} | {secs:.1f} | "
              f"{peak:.0f} | {added:.0f} |", flush=True)
    verdicts(results)


def verdicts(results: dict[Row, tuple[list[float], float]]) -> None:
    """leanlm's mean Δppl against GPTQModel's with the same settings (target: at most the peer's
    + 2%), the paired difference over the seeds with its standard error, and the time ratio."""
    print()
    for row, (ours, secs) in results.items():
        twin = Row("GPTQModel", row.method, row.bits, row.act_order, row.reference)
        if row.tool != "leanlm" or twin not in results:
            continue
        theirs, their_secs = results[twin]
        mine, peer_mean = statistics.mean(ours), statistics.mean(theirs)
        diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        ok = mine <= peer_mean * 1.02 if peer_mean > 0 else mine <= peer_mean
        print(f"W{row.bits} {row.label}: leanlm Δppl {mine:+.3f} vs GPTQModel {peer_mean:+.3f} -> "
              f"{'met' if ok else 'NOT met'} (leanlm <= peer + 2%); paired difference "
              f"{statistics.mean(diffs):+.3f} ± {se:.3f} (se, {len(diffs)} seeds); quantize time "
              f"{secs:.1f} s vs {their_secs:.1f} s ({secs / their_secs:.2f}x)")
