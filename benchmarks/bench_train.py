"""Training throughput and memory: leanlm's training step vs a plain transformers loop.

Both train the same Llama shape (default: the embedded default model's, 10M parameters, vocab
8192) on the same random token batches, bf16 autocast with fp32 master weights, fused AdamW
and gradient clipping, no document masking (transformers has none):

* leanlm: ``model.loss(tokens, ...)`` — the trainer's step, whose head + loss is the fused,
  chunked linear cross-entropy (``leanlm/loss.py``), with activation checkpointing off, full or
  selective (``train/parallelize.py``);
* transformers: ``LlamaForCausalLM(input_ids, labels=...)`` with SDPA attention.

Each configuration runs in its own process (so the peak RSS is its own) and the processes are
interleaved over ``--rounds``; the script prints the median tokens/s and peak memory per
configuration and the leanlm / transformers ratio. On a CUDA GPU, ``--cuda`` instead trains a
Llama-3.2-1B-shaped model and reports MFU (model FLOPs / peak bf16 FLOP/s).

    python benchmarks/bench_train.py [--rounds 3] [--steps 5] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ["leanlm", "leanlm+ac=full", "leanlm+ac=selective", "transformers"]


def shape(args: argparse.Namespace) -> dict:
    if args.cuda:
        from leanlm import ModelConfig

        c = ModelConfig.from_preset("llama-3.2-1b")
        return dict(vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_layers, inter=c.intermediate_size,
                    heads=c.num_heads, kv=c.num_kv_heads, tie=True)
    return dict(vocab=8192, hidden=320, layers=6, inter=864, heads=5, kv=5, tie=True)


def worker(name: str, args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps of configuration ``name``; return tokens/s and peak memory."""
    import resource

    s = shape(args)
    device = torch.device("cuda" if args.cuda else "cpu")
    torch.manual_seed(0)
    if name.startswith("leanlm"):
        from leanlm import ModelConfig, Transformer
        from leanlm.train.parallelize import apply_ac, apply_compile

        cfg = ModelConfig(model_type="llama", vocab_size=s["vocab"], hidden_size=s["hidden"],
                          intermediate_size=s["inter"], num_layers=s["layers"], num_heads=s["heads"],
                          num_kv_heads=s["kv"], max_position_embeddings=max(1024, args.seq),
                          tie_word_embeddings=s["tie"])
        model = Transformer(cfg).to(device)
        model.init_weights()
        if "+ac=" in name:
            apply_ac(model, name.split("+ac=")[1].split("+")[0])
        if "+compile" in name:  # per block, as the trainer's compile=true
            apply_compile(model)
        if "+chunk=" in name:  # rows per chunk of the fused head + loss
            import leanlm.loss

            chunk = int(name.split("+chunk=")[1].split("+")[0])
            leanlm.loss.CHUNK = leanlm.loss.CUDA_CHUNK = chunk

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            return model.loss(x[:, :-1], x[:, 1:])
    else:
        import transformers

        hf_cfg = transformers.LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
            max_position_embeddings=max(1024, args.seq), tie_word_embeddings=s["tie"],
            attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(hf_cfg).to(device)

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts labels itself
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = torch.randint(0, s["vocab"], (args.steps + 1, args.batch, args.seq + 1), device=device)

    def step(x: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(batches[0])  # warm-up (allocations, optimizer state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(batches[i + 1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tps = args.batch * args.seq / statistics.median(times)
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    out = {"tokens_per_s": tps, "peak_mem_gib": mem}
    if args.cuda:
        from leanlm.config import ModelConfig
        from leanlm.train.metrics import flops_per_token, peak_flops

        out["mfu"] = flops_per_token(ModelConfig.from_preset("llama-3.2-1b"), args.seq) * tps / peak_flops(
            device, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--cuda", action="store_true", help="1B-shaped model on the GPU, with MFU")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated; also e.g. leanlm+compile (torch.compile per block), "
                    "leanlm+chunk=N (rows per chunk of the fused head + loss)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    from common import machine

    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    base = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
            "--seq", str(args.seq)] + (["--cuda"] if args.cuda else [])
    for r in range(args.rounds):
        for c in configs:
            proc = subprocess.run([*base, "--worker", c], capture_output=True, text=True,
                                  env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            if proc.returncode:
                sys.exit(f"{c} failed:\n{proc.stderr[-3000:]}")
            results[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {c:22s} {results[c][-1]['tokens_per_s']:9,.0f} tok/s  "
                  f"peak {results[c][-1]['peak_mem_gib']:.2f} GiB", flush=True)
    s = shape(args)
    print(f"\n{machine()}; shape {s}, batch {args.batch} x {args.seq}, bf16 autocast, {args.steps} steps "
          f"x {args.rounds} rounds (medians)")
    med = {c: {k: statistics.median(x[k] for x in results[c]) for k in results[c][0]} for c in configs}
    peer = results.get("transformers")
    print(f"| config | tokens/s | vs transformers (median of per-round ratios) | peak memory GiB |"
          f"{' MFU |' if args.cuda else ''}")
    print(f"| --- | ---: | ---: | ---: |{' ---: |' if args.cuda else ''}")
    for c in configs:
        m = med[c]
        ratio = "-"
        if peer:  # each round's configurations ran back to back: compare within a round
            pairs = zip(results[c], peer, strict=True)
            ratio = f"{statistics.median(a['tokens_per_s'] / b['tokens_per_s'] for a, b in pairs):.2f}x"
        mfu = f" {m['mfu']:.1%} |" if "mfu" in m else ""
        print(f"| {c} | {m['tokens_per_s']:,.0f} | {ratio} | {m['peak_mem_gib']:.2f} |{mfu}")


if __name__ == "__main__":
    main()
