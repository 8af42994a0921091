"""PEFT: LoRA fine-tuning step time and peak memory, leanlm vs Hugging Face peft; QLoRA memory;
and a real fine-tune of the default model with every method.

``--compare`` (default): the same Llama-shaped random model (hidden 512, 8 layers, vocab 8192)
and the same random token batches (4 × 256); LoRA r = 16 on q/k/v/o/gate/up/down; AdamW; bf16
autocast. Each configuration runs in its own process, so the peak RSS is its own (loading
included). Rows: transformers + peft LoRA and leanlm LoRA on the same fp32 base; leanlm LoRA on a
bf16 base and QLoRA on an int4 base (RTN g128, quantized from the bf16 load).

``--finetune --corpus CORPUS``: the default model learns to name the domain of a text snippet
("code", "docs" or "literature") from the default corpus. Held-out accuracy is greedy decoding
of the answer on 150 snippets of documents kept out of training. Each method runs 150 steps;
the table gives trainable parameters, accuracy before and after, and time.

    python benchmarks/bench_peft.py [--compare] [--finetune --corpus CORPUS]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, BATCH, SEQ = 8, 4, 256


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str) -> dict:
    """One configuration: median step time and peak RSS of this process."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SHAPE), dtype=torch.float32)
    data = torch.randint(0, SHAPE["vocab_size"], (STEPS + 2, BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(1))
    if kind == "peft":
        import peft

        model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        step_loss = lambda w: model(input_ids=w[:, :-1], labels=w[:, :-1]).loss  # shifts inside
    else:
        from leanlm import load_model
        from leanlm.peft import LoRAConfig, apply_peft_, mark_trainable_

        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            del hf
            model = load_model(tmp, dtype="float32" if kind == "leanlm" else "bfloat16")
        if kind == "leanlm-qlora":
            from leanlm.quant import RTNConfig, quantize_

            quantize_(model, RTNConfig(bits=4, group_size=128))
        apply_peft_(model, LoRAConfig(r=16, lora_alpha=32, targets=TARGETS))
        mark_trainable_(model)
        step_loss = lambda w: model.loss(w[:, :-1], w[:, 1:])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(STEPS + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(data[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "step_s": statistics.median(times[2:]), "peak_rss_mib": rss_mib(),
            "trainable": sum(p.numel() for p in params), "loss": float(loss)}


def compare() -> None:
    rows = []
    for kind in ("peft", "leanlm", "leanlm-qlora", "leanlm-bf16"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"LoRA r=16 on {', '.join(TARGETS)}; model {SHAPE}; batch {BATCH} x {SEQ}; bf16 autocast")
    print("| run | step (median) | peak RSS | trainable | vs peft time | vs peft memory |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"peft": "transformers + peft LoRA (fp32 base)", "leanlm": "leanlm LoRA (fp32 base)",
             "leanlm-qlora": "leanlm QLoRA (int4 base)", "leanlm-bf16": "leanlm LoRA (bf16 base)"}
    for r in rows:
        print(f"| {names[r['kind']]} | {r['step_s'] * 1e3:.0f} ms | {r['peak_rss_mib']:.0f} MiB | "
              f"{r['trainable']:,} | {ref['step_s'] / r['step_s']:.2f}x | "
              f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x |", flush=True)


def snippets(corpus: Path, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    from leanlm.data.corpus import read_split

    rng = random.Random(seed)
    out = []
    for dom in ("code", "docs", "literature"):
        docs = [d for d in read_split(corpus, dom, split) if len(d) > 400]
        for _ in range(n // 3):
            d = rng.choice(docs)
            start = rng.randrange(0, len(d) - 300)
            out.append((d[start:start + 240], dom))
    rng.shuffle(out)
    return out


def finetune(corpus: Path) -> None:
    from leanlm import load_model, load_tokenizer
    from leanlm.assets import default_model_path
    from leanlm.generate import generate
    from leanlm.peft import load_adapter, method_config
    from leanlm.sampling import SamplingParams
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides
    from leanlm.train.finetune import FineTuner, encode_prompt

    base = default_model_path()
    tok = load_tokenizer(base)
    prompt = lambda s: f"Which kind of text is this: code, docs or literature?\n\n{s}\n\nAnswer:"
    tmp = Path(tempfile.mkdtemp(prefix="bench_peft_"))
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": prompt(s), "completion": f" {d}"}) + "\n"
                             for s, d in snippets(corpus, "train", 1500, 0)))
    held = snippets(corpus, "val", 150, 1)

    def accuracy(model: torch.nn.Module) -> float:
        hits = 0
        cfg = SamplingParams(max_tokens=3, temperature=0.0)
        for s, d in held:
            ids = encode_prompt(tok, [{"role": "user", "content": prompt(s)}])  # as in training
            text = tok.decode(generate(model, [ids], cfg)[0])
            hits += text.strip().split(" ")[0].strip(".,\n") == d if text.strip() else 0
        return hits / len(held)

    before = accuracy(load_model(base, dtype="float32"))
    print(f"default model ({sum(p.numel() for p in load_model(base).parameters()):,} parameters), "
          f"held-out accuracy before fine-tuning {before:.3f} (chance 0.333)", flush=True)
    print("| method | trainable | % of model | held-out accuracy | completion loss | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in ("lora", "dora", "ia3", "adapter", "pfeiffer", "parallel-adapter", "compacter"):
        lr = 1e-2 if method == "ia3" else 2e-3
        cfg = apply_overrides(get_recipe("tiny"), [
            "max_steps=150", "seq_len=256", "micro_batch=8", f"lr={lr}", "warmup_steps=10",
            "eval_every=150", "ckpt_every=1000", f"out={tmp / method}", "progress=false"])
        peft = method_config(method, r=8, alpha=16.0, dropout=0.0, targets=[], bottleneck=32)
        t0 = time.perf_counter()
        ft = FineTuner(cfg, base, peft, train, quiet=True)
        try:
            result = ft.run()
        finally:
            ft.close()
        dt = time.perf_counter() - t0
        trainable = sum(p.numel() for p in ft.model.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in ft.model.named_parameters() if ".adapters." not in n)
        model = load_model(base, dtype="float32")
        load_adapter(model, tmp / method / "adapter")
        acc = accuracy(model.eval())
        print(f"| {method} | {trainable:,} | {100 * trainable / total:.2f}% | {acc:.3f} | "
              f"{result['eval']['completion_loss']:.3f} | {dt:.0f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    print(f"# bench_peft: {machine()}", flush=True)
    if args.compare or not args.finetune:
        compare()
    if args.finetune:
        if args.corpus is None:
            raise SystemExit("--finetune needs --corpus")
        finetune(args.corpus)


if __name__ == "__main__":
    main()
