"""Communication volume per training step and rank: FSDP vs TP + SP vs PP, from the plan.

An analytic model lists the collectives one optimizer step issues on one rank (kind, elements,
bytes per element); a bandwidth-optimal implementation (ring, or any that meets the lower bound)
sends per rank, on p ranks,

    all-gather of an N-element output      (p-1)/p · N
    reduce-scatter of an N-element input   (p-1)/p · N
    all-reduce of N elements               2·(p-1)/p · N
    send of N elements                     N

With P_b the parameters of block b (each FSDP2-padded to a multiple of p rows), P_root those of
the root (embedding, final norm, tied head), L layers, h the width, V the vocabulary, a step of
one micro-batch [b, s] (``accum`` micro-batches repeat it):

* **FSDP2** over p ranks: per micro-batch each block all-gathers P_b for forward, again for
  backward when ``reshard_after_forward`` (ZeRO-3), and reduce-scatters its gradient; the root
  (never resharded after forward) one all-gather and one reduce-scatter:
  ((2 or 1)·Σ P_b + P_root)·e_param + (Σ P_b + P_root)·e_grad elements, times (p-1)/p.
* **TP + SP** (:mod:`leanlm.parallel.plan`) over p ranks: forward, 2L + 1 all-gathers of the
  [b, s, h] stream (each block's attention and MLP input, the head's input) and 2L + 1
  reduce-scatters (o_proj, down_proj, the vocabulary-parallel embedding); backward, the same
  mirrored: 4·(2L + 1)·b·s·h·(p-1)/p elements. The vocabulary-parallel loss all-reduces 3
  floats per token (row max, then the exponentials' sum and the target logit, in chunks of
  ``CHUNK`` rows); the 2L + 1 norm weights' partial gradients are all-reduced (h each).
* **PP** over p stages, v per rank (interleaved 1F1B; v = 1 otherwise), m micro-batches: each
  of a rank's stages sends its [b/m, s, h] output forward (all but the last stage) and its
  input's gradient back (all but the first) once per micro-batch: up to 2·v·b·s·h elements per
  rank; the first and last rank sum the tied embedding's gradient (V·h, all-reduced).
* Every mode: the loss (1 float64, all-reduced for the log) and the gradient norm (1 float64;
  FSDP: torch's ``clip_grad_norm_`` reduces one partial norm per parameter tensor).

``--check`` runs the trainer for each mode on 2 gloo processes with the tiny recipe (fp32; the
default tokenizer's 8192-token vocabulary), profiles its second step (``torch.profiler``, the
``c10d::`` ops with their shapes) and compares the measured collectives, kind by kind and size
by size, with the model's. Without it: the table for the llama-3.2-1b shape.

    python benchmarks/comm_volume.py [--check] [--batch 32] [--seq 2048] [--world 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from common import machine
from leanlm import DEFAULT_MODEL, ModelConfig, Transformer
from leanlm.loss import CHUNK, CUDA_CHUNK
from leanlm.train.pipeline import stage_layers

MODES = {"fsdp": ["parallel=fsdp"], "tp": ["parallel.tp=2"], "pp": ["parallel.pp=2"],
         "pp-interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2",
                            "model.num_layers=4"]}


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather (N = output) | reduce_scatter (N = input) | all_reduce | send | recv
    elements: int
    itemsize: int
    ranks: int  # the group's size p

    def sent(self) -> float:
        """Bytes this rank sends, bandwidth-optimally, on its group of p ranks."""
        p = self.ranks
        factor = {"all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p,
                  "all_reduce": 2 * (p - 1) / p, "send": 1.0, "recv": 0.0}[self.kind]
        return factor * self.elements * self.itemsize


def bookkeeping(p: int, norm_elements: int = 1, norm_itemsize: int = 8) -> list[Collective]:
    """The loss for the log (float64) and the gradient norm's one reduction."""
    return [Collective("all_reduce", 1, 8, p), Collective("all_reduce", norm_elements, norm_itemsize, p)]


def fsdp(m: ModelConfig, p: int, reshard_after_forward: bool = True, accum: int = 1,
         param_itemsize: int = 2, grad_itemsize: int = 4) -> list[Collective]:
    with torch.device("meta"):
        model = Transformer(m)
    model.tie_weights()

    def padded(module: torch.nn.Module, recurse: bool = True) -> int:  # (dim 0 to a multiple of p)
        return sum(math.ceil(t.shape[0] / p) * p * t[0].numel()
                   for t in dict(module.named_parameters(recurse=recurse)).values())

    blocks = [padded(block) for block in model.layers]
    root = padded(model) - sum(blocks)
    gathers = 2 if reshard_after_forward else 1
    out = [Collective("all_gather", root, param_itemsize, p),
           Collective("reduce_scatter", root, grad_itemsize, p)]
    for n in blocks:
        out += [Collective("all_gather", n, param_itemsize, p)] * gathers
        out.append(Collective("reduce_scatter", n, grad_itemsize, p))
    # (torch's clip_grad_norm_ reduces each parameter's partial norm: one element per tensor)
    return out * accum + bookkeeping(p, len(list(model.parameters())), 4)


def tensor_parallel(m: ModelConfig, p: int, batch: int, seq: int, act_itemsize: int = 2,
                    chunk: int = CHUNK) -> list[Collective]:
    stream = batch * seq * m.hidden_size
    n = 2 * m.num_layers + 1  # each block's attention and MLP, the head / the embedding
    out = [Collective("all_gather", stream, act_itemsize, p),
           Collective("reduce_scatter", stream, act_itemsize, p)]
    out = out * (2 * n)  # forward, and backward mirrored
    for start in range(0, batch * seq, chunk):  # the loss: row max, then (Σ exp, target logit)
        rows = min(chunk, batch * seq - start)
        out += [Collective("all_reduce", rows, 4, p), Collective("all_reduce", 2 * rows, 4, p)]
    out += [Collective("all_reduce", m.hidden_size, 4, p)] * n  # the norms' partial gradients
    return out + bookkeeping(p)


def pipeline(m: ModelConfig, p: int, rank: int, batch: int, seq: int, microbatches: int,
             virtual: int = 1, act_itemsize: int = 4) -> list[Collective]:
    stages = [rank + k * p for k in range(virtual)]
    if any(not stage_layers(m.num_layers, p * virtual, s) for s in stages):
        raise ValueError(f"{m.num_layers} layers do not fill {p * virtual} stages")
    act = Collective("send", batch // microbatches * seq * m.hidden_size, act_itemsize, 2)
    recv = Collective("recv", act.elements, act_itemsize, 2)
    out = []
    for s in stages:  # forward to s + 1, backward to s - 1; and what comes in from them
        out += ([act, recv] * (s < p * virtual - 1) + [act, recv] * (s > 0)) * microbatches
    if m.tie_word_embeddings and rank in (0, p - 1):  # (the first and the last rank alone)
        out.append(Collective("all_reduce", m.vocab_size * m.hidden_size, 4, 2))
    return out + bookkeeping(p)


def sent(colls: list[Collective]) -> float:
    return sum(c.sent() for c in colls)


# --- the check: the trainer on 2 gloo processes, profiled --------------------------------------
KINDS = {"c10d::_allgather_base_": ("all_gather", 0),
         "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
         "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
         "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
         "c10d::allreduce_": ("all_reduce", 0), "c10d::send": ("send", 0), "c10d::recv_": ("recv", 0)}


def _numel(dims: list) -> int:
    """Elements of one tensor's dims, or of a tensor list's."""
    if dims and isinstance(dims[0], list):
        return sum(_numel(d) for d in dims)
    return math.prod(dims)


def profiled(trace: Path) -> Counter:
    """(kind, elements) -> count of the c10d collectives in a chrome trace (other c10d ops by name)."""
    found: Counter = Counter()
    for e in json.loads(trace.read_text())["traceEvents"]:
        name = e.get("name", "")
        if name.startswith("c10d::"):
            kind, arg = KINDS.get(name, (name, 0))
            found[kind, _numel(e["args"]["Input Dims"][arg])] += 1
    return found


def worker(mode: str, data: str, out: str) -> None:
    """One rank of ``--check``: a warm-up step (FSDP's lazy init, the pipeline's shapes), then a
    profiled one; writes the trace, rank by rank."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides
    from leanlm.train.trainer import Trainer

    cfg = apply_overrides(get_recipe("tiny"), [
        f"data={data}", f"tokenizer={DEFAULT_MODEL}", f"out={out}", "model.vocab_size=8192",
        "precision=fp32", "eval_every=0", "progress=false", "ckpt_every=1000000", *MODES[mode]])
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.train_step()
    prof.export_chrome_trace(str(Path(out) / f"trace{dist.get_rank()}.json"))
    trainer.close()


def expected(mode: str, m: ModelConfig, batch: int, seq: int) -> list[list[Collective]]:
    """The model's collectives of ``mode`` (a 2-process --check run), rank by rank."""
    if mode == "fsdp":
        return [fsdp(m, 2, accum=1, param_itemsize=4)] * 2
    if mode == "tp":
        return [tensor_parallel(m, 2, batch, seq, act_itemsize=4)] * 2
    virtual = 2 if mode == "pp-interleaved" else 1
    return [pipeline(m, 2, r, batch, seq, batch, virtual) for r in range(2)]


def check() -> bool:
    """Run every mode on 2 gloo processes; print measured against modelled; True if all agree."""
    from leanlm.data.corpus import build_corpus, default_sources
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides

    ok = True
    print("| mode | rank | collectives (measured = model) | elements sent (measured / model) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / "corpus"
        build_corpus(data, {"code": default_sources()["code"]}, max_domain_bytes=300_000)
        for mode, sets in MODES.items():
            cfg = apply_overrides(get_recipe("tiny"), ["model.vocab_size=8192", *sets])
            out = Path(root) / mode
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", __file__, "--worker", mode, str(data), str(out)],
                           check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
            for rank, model in enumerate(expected(mode, cfg.model, cfg.micro_batch, cfg.seq_len)):
                got = profiled(out / f"trace{rank}.json")
                want = Counter((c.kind, c.elements) for c in model)
                # (elements: the check runs in fp32, its scalars in float64 / fp32; the trace gives
                # no dtype for tensor lists)
                same = got == want
                ok &= same
                measured = sum(Collective(k, n, 1, 2).sent() * c for (k, n), c in got.items())
                modelled = sent([Collective(c.kind, c.elements, 1, 2) for c in model])
                print(f"| {mode} | {rank} | {sum(got.values())} {'=' if same else '!='} {sum(want.values())} "
                      f"| {measured:,.0f} / {modelled:,.0f} |")
                if not same:
                    print(f"  measured only: {dict(got - want)}; model only: {dict(want - got)}")
    return ok


def table(world: int, batch: int, seq: int) -> None:
    """GB each rank sends per step for the llama-3.2-1b shape, every mode on ``world`` ranks and
    the same global batch (TP and PP: one replica takes all of it; PP: one sequence per
    micro-batch, the busiest rank)."""
    m = ModelConfig.from_preset("llama-3.2-1b")
    rows = {
        f"FSDP2 dp={world}, ZeRO-3 (bf16 gathers, fp32 reduce-scatters)": fsdp(m, world),
        f"FSDP2 dp={world}, ZeRO-2 (reshard_after_forward=False)": fsdp(m, world, False),
        f"TP+SP tp={world} (bf16 activations, loss-parallel)": tensor_parallel(m, world, batch, seq,
                                                                              chunk=CUDA_CHUNK),
    }
    for virtual in (1, 2):
        name = "1F1B" if virtual == 1 else f"interleaved 1F1B v={virtual}"
        ranks = [pipeline(m, world, r, batch, seq, batch, virtual) for r in range(world)]
        rows[f"PP pp={world} {name}, m={batch} (fp32 stream)"] = max(ranks, key=sent)
    print(f"| llama-3.2-1b, {world} ranks, {batch} x {seq} tokens a step | collectives | GB sent per rank |")
    print("|---|---:|---:|")
    for name, colls in rows.items():
        print(f"| {name} | {len(colls)} | {sent(colls) / 1e9:.2f} |")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="measure on 2 gloo processes against the model")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    print(f"# comm_volume; {machine()}", flush=True)
    if args.check and not check():
        sys.exit(1)
    table(args.world, args.batch, args.seq)


if __name__ == "__main__":
    main()
