"""The pretraining loop over the one ``Transformer``, single-process or under ``torchrun``.

One optimizer step: ``grad_accum`` micro-batches, each ``loss_i / grad_accum`` back-propagated
(gradients add up to those of the mean loss over the whole global batch, since every micro-batch
has the same number of target tokens); FSDP/DDP average them over ranks; the global gradient
norm is clipped; AdamW (Loshchilov & Hutter 2019; decoupled weight decay on matrices only)
steps with the learning rate of the schedule:

    warmup:  lr · (s+1) / warmup
    cosine:  lr · (r + (1 - r) · ½(1 + cos(π · p)))            p = progress after warmup
    wsd:     lr until the last ``decay_fraction`` of steps, then linear to r · lr   (Hu et al. 2024)

Processes form a mesh (``train/dist.py``): data-parallel replicas, tensor-parallel ranks within
each, or pipeline stages (``train/pipeline.py``), whose step is its schedule's.

bf16 autocast keeps fp32 master weights and optimizer state (Micikevicius et al. 2018); under
FSDP the mixed-precision policy does the casting instead. The model is built on the meta
device, parallelized (``parallelize.py``), materialized with ``to_empty`` and initialized
parameter by parameter from a generator seeded by (seed, parameter name): the same weights
whether a parameter is whole or an FSDP shard, so 1 and N processes start identically.
``init_from`` replaces that init with a checkpoint's weights (``set_model_state_dict`` loads them
whole or into the shards). With a ``teacher`` the loss is ``loss.distillation_loss`` on both
models' logits: the student's full logits are materialised (4 bytes × tokens × vocabulary per
micro-batch) instead of going through the fused head + cross-entropy.

Throughput: tokens/s of the global batch; MFU = achieved FLOP/s ÷ peak, with FLOPs per token
= 6·N (matmul parameters, embeddings excluded) + 12·L·d·T (attention scores; PaLM, Chowdhery
et al. 2022, appendix B).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from leanlm.attention import SDPAMetadata
from leanlm.checkpoint import load_model, save_model
from leanlm.data.corpus import load_manifest
from leanlm.data.tokens import MixtureLoader, PackedLoader, load_tokens, tokenize_corpus
from leanlm.errors import LeanLMError
from leanlm.eval.perplexity import autocast_context, stream_loss
from leanlm.fsutil import atomic_write, write_json
from leanlm.loss import distillation_loss
from leanlm.model import Transformer, init_param_
from leanlm.tokenizer import Tokenizer, load_tokenizer
from leanlm.train import checkpointing as ckpt
from leanlm.train.config import TrainConfig
from leanlm.train.dist import DistInfo
from leanlm.train.elastic import Preempted, Preemption, truncate_metrics
from leanlm.train.memory import check_fits
from leanlm.train.metrics import MetricsLogger, flops_per_token, peak_flops
from leanlm.train.parallelize import clip_grad_norm, mesh_shape, parallelize, param_groups
from leanlm.train.pipeline import build_schedule, gathered_stages, pipeline_step


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    r = cfg.min_lr_ratio
    # p reaches 1 at the last step run, max_steps - 1
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
        if step < decay_start:
            return cfg.lr
        p = (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)
        return cfg.lr * (1 - (1 - r) * min(1.0, p))
    p = (step - cfg.warmup_steps + 1) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, seed: int) -> None:
    """Normal(0, std) matrices, ones for norms, zeros for biases — each from its own seeded
    generator, and sliced to the local shard for FSDP parameters (identical for any world size)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    aliases = getattr(model, "param_aliases", {})  # (a pipeline's last stage: its tied head)
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        name = aliases.get(name, name)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(p.shape)
        init_param_(name, full, std, g)  # the model's own rule, on the whole fp32 tensor
        if isinstance(p, DTensor):
            full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)


def domain_weights(value: dict[str, float] | str) -> dict[str, float]:
    """Weights given inline, or read from a JSON file (``{"domain_weights": {...}}`` or a plain dict)."""
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    path = Path(value)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LeanLMError(f"domain_weights={value!r}: not a dict of weights nor a readable JSON "
                          f"file ({e})") from e
    data = data.get("domain_weights", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise LeanLMError(f"{path}: expected a JSON object of domain -> weight")
    return {str(k): float(v) for k, v in data.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.out = Path(cfg.out)
        self.check_data()  # a missing or empty data dir fails here, before any other work
        mesh_shape(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # and a mesh that does not fit
        self.d = DistInfo.setup(cfg)
        self.tok = self._tokenizer()
        self.eos_id = int(self.tok.eos_token_id)  # type: ignore[arg-type]
        cfg.model.bos_token_id = cfg.model.eos_token_id = self.eos_id
        check_fits(cfg, self.d.dp, self.d.device)
        self._prepare_data()
        self.model = self._build_model()
        self.teacher = self._load_teacher()
        self.schedule = None
        if self.d.pp > 1:
            compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
            self.schedule = build_schedule(self.model, self.model.pp_group, self.d.device, cfg.micro_batch,
                                           cfg.seq_len, cfg.parallel.pp_microbatches or cfg.micro_batch,
                                           cfg.parallel.pp_schedule, cfg.grad_accum, compute,
                                           cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay),
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)  # one fused kernel per param
        self.step = 0
        self.losses: list[float] = []
        self.ckpt_root = self.out / "checkpoints"
        self._saver = ckpt.BackgroundSaver() if cfg.async_checkpoint else None
        latest = ckpt.complete_checkpoints(self.ckpt_root)
        if latest:
            state = ckpt.load_checkpoint(latest[-1], self.model, self.optimizer)
            self.restore(state)
            if self.d.rank == 0:  # a restart redoes the steps after the checkpoint: so does the log
                truncate_metrics(self.out / "metrics.jsonl", self.step)
            self.log(f"resumed from {latest[-1]} at step {self.step}")

    # --- setup ----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.d.rank == 0 and not self.quiet:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]leanlm pretrain:[/] {msg}", highlight=False)

    def _tokenizer(self) -> Tokenizer:
        if self.cfg.tokenizer:
            tok = load_tokenizer(self.cfg.tokenizer)
        else:
            from leanlm.assets import default_model_path

            tok = load_tokenizer(default_model_path())
        if tok.eos_token_id is None:
            raise LeanLMError(f"tokenizer {tok.source}: no eos_token (needed as the document separator)")
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise LeanLMError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                              f"{self.cfg.model.vocab_size}: set model.vocab_size={tok.vocab_size}")
        return tok

    def check_data(self) -> None:
        if not self.cfg.data:
            raise LeanLMError("no training data: pass --data DIR (a corpus from `leanlm corpus build`)")
        load_manifest(self.cfg.data)

    def _prepare_data(self) -> None:
        cfg, d = self.cfg, self.d
        cache = self.out / "tokens"
        if d.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.files = tokenize_corpus(cfg.data, self.tok, cache, self.eos_id)
            atomic_write(self.out / "train_config.json", cfg.to_json())
        d.barrier()
        if d.rank != 0:
            self.files = tokenize_corpus(cfg.data, self.tok, cache, self.eos_id)  # cached: no work
        train = {dom: load_tokens(f["train"]) for dom, f in self.files.items()}
        self.val = {dom: load_tokens(f["val"]) for dom, f in self.files.items()}
        args = (cfg.seq_len, self.eos_id, cfg.micro_batch, cfg.grad_accum, d.dp_rank, d.dp, cfg.seed,
                cfg.document_masking)
        self.loader: PackedLoader | MixtureLoader
        if cfg.domain_weights is None:
            self.loader = PackedLoader(np.concatenate(list(train.values())), *args)
        else:
            self.loader = MixtureLoader(train, domain_weights(cfg.domain_weights), *args)

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        with torch.device("meta"):
            model = Transformer(cfg.model)
        self.mode = parallelize(model, cfg, self.d.mesh, self.d.world, self._materialize)
        if cfg.init_from:
            self._init_from(model, cfg.init_from)
        return model

    def _init_from(self, model: nn.Module, path: str) -> None:
        """Overwrite the random init with a checkpoint's weights (whole or into FSDP shards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        src = load_model(path, dtype="float32").state_dict()
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in src.items()}
        if want != got:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:3]
            raise LeanLMError(f"init_from={path}: its weights do not fit the run's model (differing: "
                              f"{', '.join(diff)}): expected a checkpoint of the same shape")
        set_model_state_dict(model, src, options=StateDictOptions(full_state_dict=True))
        self.log(f"initialized from {path}")

    def _load_teacher(self) -> nn.Module | None:
        if not self.cfg.teacher:
            return None
        path, vocab = self.cfg.teacher, self.cfg.model.vocab_size
        teacher = load_model(path, dtype="float32", device=self.d.device).requires_grad_(False)
        if teacher.config.vocab_size != vocab:
            raise LeanLMError(f"teacher {path}: a {teacher.config.vocab_size}-token vocabulary, the model's "
                              f"is {vocab}: distillation needs the same tokenizer")
        return teacher

    def _materialize(self, model: Transformer) -> None:
        from torch.distributed.fsdp import FSDPModule

        model.to_empty(device=self.d.device)
        if not isinstance(model, FSDPModule) and not hasattr(model, "pp_stage"):
            model.tie_weights()  # to_empty gives each module its own tensor; FSDP keeps the tie
        model.init_buffers(self.d.device)
        init_parameters(model, self.cfg.init_std, self.cfg.seed)

    # --- the loop -------------------------------------------------------------------------
    def _autocast(self) -> object:
        if self.mode == "fsdp":  # FSDP's MixedPrecisionPolicy casts parameters itself
            return nullcontext()
        return autocast_context(self.d.device, self.cfg.precision)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss over the global batch, grad norm)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        total = 0.0
        batches = self.loader.next_step()
        for i, batch in enumerate(batches):
            if self.mode == "ddp":  # all-reduce gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(batches) - 1)  # type: ignore[operator]
            batch = batch.to(self.d.device)
            if self.schedule is not None:  # forward and backward of this stage's micro-batches
                with self._autocast():
                    total += pipeline_step(self.schedule, self.model, batch)
                continue
            with self._autocast():
                if self.teacher is None:
                    loss = self.model.loss(batch.inputs, batch.targets, batch.positions,
                                           SDPAMetadata.packed(batch.documents, self.model.sliding_window))
                else:
                    loss = self._distill_loss(batch)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        norm = clip_grad_norm(self.model, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (loss_avg,) = self.d.all_reduce_sum([total])  # (a pipeline: its last stages' losses)
        return loss_avg / (self.d.world // self.d.pp), float(norm)

    def _distill_loss(self, batch: Any) -> torch.Tensor:
        attn = SDPAMetadata.packed(batch.documents, self.model.sliding_window)
        logits = self.model(batch.inputs, batch.positions, attn)
        with torch.no_grad():
            teacher = self.teacher(batch.inputs, batch.positions, attn)
        return distillation_loss(logits, teacher, batch.targets, self.cfg.distill_temperature,
                                 self.cfg.distill_weight)

    def evaluate(self) -> dict[str, float]:
        cfg, d = self.cfg, self.d
        out = {}
        for domain, tokens in self.val.items():
            s, n = stream_loss(self.model, tokens, cfg.seq_len, self.eos_id, cfg.micro_batch,
                               cfg.eval_windows, cfg.document_masking,
                               "fp32" if self.mode == "fsdp" else cfg.precision, d.dp_rank, d.dp, d.device)
            s, n = d.all_reduce_sum([s, float(n)])
            if n:
                out[domain] = s / n
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides model and optimizer (subclasses add theirs)."""
        return {"step": self.step, "data": self.loader.state_dict(), "config": self.cfg.to_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])

    def save(self, background: bool = False) -> Path:
        """Checkpoint this step; in the background (``async_checkpoint``) the previous background
        save completes first, and the returned path is complete only after :meth:`wait_saved`."""
        self.wait_saved()
        args = (self.ckpt_root, self.step, self.model, self.optimizer, self.checkpoint_state(),
                self.cfg.keep_checkpoints, str(self.step))
        if background and self._saver is not None:
            return self._saver.save(*args)
        return ckpt.save_checkpoint(*args)

    def wait_saved(self) -> None:
        """Complete the checkpoint being written in the background, if any."""
        if self._saver is not None:
            self._saver.wait()

    def export(self) -> Path | None:
        """Write the trained model as a Hugging Face checkpoint to OUT/model (rank 0)."""
        state = gathered_stages(self.model) if self.d.pp > 1 else ckpt.full_model_state(self.model)
        path = self.out / "model"
        if self.d.rank == 0:
            with torch.device("meta"):
                plain = Transformer(self.cfg.model)
            missing, unexpected = plain.load_state_dict(state, assign=True, strict=False)
            tied = {"lm_head.weight"} if self.cfg.model.tie_word_embeddings else set()
            if set(missing) - tied or unexpected:
                raise LeanLMError(f"export: state dict mismatch (missing {missing}, unexpected {unexpected})")
            plain.tie_weights()
            save_model(plain, path, tokenizer=self.tok, dtype=self.cfg.export_dtype)
        self.d.barrier()
        return path if self.d.rank == 0 else None

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``stop_after`` more steps), checkpoint, evaluate, export."""
        cfg, d = self.cfg, self.d
        if self.step >= cfg.max_steps and (self.out / "result.json").is_file():
            self.log(f"already trained to step {self.step}: {self.out / 'model'}")
            return {"step": self.step, "losses": [], **json.loads((self.out / "result.json").read_text()),
                    "model": self.out / "model" if d.rank == 0 else None}
        logger = MetricsLogger(self.out / "metrics.jsonl", d.device, enabled=d.rank == 0,
                               progress=cfg.progress and not self.quiet, total=cfg.max_steps,
                               start=self.step)
        fpt = flops_per_token(cfg.model, cfg.seq_len)
        peak = peak_flops(d.device, cfg.peak_tflops)
        tokens_per_step = self.loader.global_batch * cfg.seq_len
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        self.log(f"{self.mode} x{d.world} on {d.device.type}, {cfg.model.num_parameters() / 1e6:.1f}M "
                 f"params, {tokens_per_step:,} tokens/step, steps {self.step}->{end}")
        evals: dict[str, float] = {}
        with logger, Preemption(d.device) as preemption:
            while self.step < end:
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                dt = time.perf_counter() - t0
                self.losses.append(loss)
                if not math.isfinite(loss):
                    raise LeanLMError(f"loss became {loss} at step {self.step}: lower lr or check the data")
                rec = {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr_at(cfg, self.step - 1),
                       "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
                if peak:
                    rec["mfu"] = fpt * tokens_per_step / dt / (peak * d.world)
                logger.step(rec, log=self.step % cfg.log_every == 0 or self.step == end)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    evals = self.evaluate()
                    logger.record({"step": self.step, "eval": evals})
                due = self.step % cfg.ckpt_every == 0 or self.step == end
                saved = self.save(background=cfg.async_checkpoint and self.step < end) if due else None
                if preemption.requested():  # SIGTERM: every rank stops after this same step
                    path = saved or self.save()
                    self.wait_saved()
                    raise Preempted(self.step, path)
            self.wait_saved()
        result: dict[str, Any] = {"step": self.step, "losses": self.losses, "eval": evals}
        if self.step >= cfg.max_steps:
            result["model"] = self.export()
            if d.rank == 0:
                final = self.losses[-1] if self.losses else None
                write_json(self.out / "result.json", {"step": self.step, "eval": evals, "final_loss": final})
        return result

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
