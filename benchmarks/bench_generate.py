"""Decode speed: leanlm vs transformers generate vs the GEMV floor, same model, same run.

Batch 1, bf16, greedy, on a random-weight checkpoint of a preset shape (default llama-3.2-1b).
Decode time per token = (time to generate P+N tokens - time to generate P+1 tokens) / (N-1), so
prefill is excluded for both. The floor is the model's own weight matrices multiplied by one
bf16 activation vector each, in order, with no model code, on the very oneDNN-prepacked copies
leanlm decodes with (``kernels/cpu_linear.py``; other copies of the same weights ran up to 1.5x
slower or faster, by where they lie in memory): what a decode step would cost if all the Python
and all the non-matmul ops were free. Decode on CPU is memory-bound, so the floor is the weights'
bytes over memory bandwidth. "leanlm, F.linear" is leanlm with ``LEANLM_KERNELS=reference``
(plain ``F.linear``, which re-lays-out each bf16 weight on every call): the gain from prepacking.

    python benchmarks/bench_generate.py [--preset llama-3.2-1b] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import leanlm
from common import machine, random_checkpoint, unpacked_linears
from leanlm.generate import generate
from leanlm.sampling import SamplingParams


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_token(run, n_new: int, repeats: int) -> float:
    """Median over repeats of (t(n_new) - t(1)) / (n_new - 1)."""
    run(2)  # warm-up
    samples = []
    for _ in range(repeats):
        samples.append((timed(lambda: run(n_new)) - timed(lambda: run(1))) / (n_new - 1))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = random_checkpoint(args.preset, torch.bfloat16)
    ours = leanlm.load_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))

    def run_ours(n: int) -> list[int]:
        return generate(ours, prompt.tolist(),
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]

    @torch.inference_mode()
    def run_hf(n: int) -> list[int]:
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, args.prompt_len:].tolist()

    run_ours(2)  # packs the weights: the floor multiplies by the model's own packed copies
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    packed = [m._packed[1] if m._packed and m._packed[1] is not None  # (None: memory was short)
              else torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()) for m in linears]
    xs = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in linears]

    @torch.inference_mode()
    def gemvs() -> None:
        for w, x in zip(packed, xs, strict=True):
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def run_unpacked(n: int) -> list[int]:
        with unpacked_linears():
            return run_ours(n)

    # A random model's top logits are near-ties, so bf16 rounding differences (our decode
    # attention runs in fp32) can flip a token; exact parity is tested in fp32 (tests/test_model.py).
    a, b = run_ours(16), run_hf(16)
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    # Interleave the four measurements so that machine noise hits them alike.
    rounds = {"leanlm": [], "leanlm, F.linear": [], "transformers": [], "gemv floor": []}
    for _ in range(args.repeats):
        rounds["leanlm"].append(per_token(run_ours, args.new_tokens, 1))
        rounds["leanlm, F.linear"].append(per_token(run_unpacked, args.new_tokens, 1))
        rounds["transformers"].append(per_token(run_hf, args.new_tokens, 1))
        gemvs()
        rounds["gemv floor"].append(statistics.median(timed(gemvs) for _ in range(3)))
    med = {k: statistics.median(v) * 1e3 for k, v in rounds.items()}
    print(f"machine: {machine()}")
    print(f"model: {args.preset} (random weights, bf16), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, batch 1, median of {args.repeats}")
    print(f"greedy tokens equal to transformers' (bf16): first {agree} of {len(a)}")
    for k, v in med.items():
        print(f"  {k:16s} {v:7.1f} ms/token  {1e3 / v:6.2f} tok/s")
    print(f"leanlm speed-up over transformers: {med['transformers'] / med['leanlm']:.2f}x "
          f"(with F.linear: {med['transformers'] / med['leanlm, F.linear']:.2f}x)")
    print(f"leanlm vs GEMV floor: {med['leanlm'] / med['gemv floor']:.3f}x "
          f"(overhead {med['leanlm'] - med['gemv floor']:.1f} ms/token)")


if __name__ == "__main__":
    main()
