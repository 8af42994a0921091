"""Instruction fine-tuning with adapters, on leanlm's trainer.

Data: JSONL, one example per line, either ``{"prompt": ..., "completion": ...}`` or a chat
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message (the assistant's) is
the completion. The prompt is rendered with the tokenizer's chat template when it has one
(``add_generation_prompt``), and an example becomes ``<eos> prompt completion <eos>`` — the
pretraining document format, so the separator is also the BOS.

Loss only on the completion: the targets of prompt tokens are ignored (-100), so the model learns
to answer, not to write prompts. Examples are packed into rows of ``seq_len`` tokens with document
masking (each example attends only to itself; positions restart), in a seeded order per epoch;
an example longer than a row is truncated at its end.

:class:`FineTuner` is the :class:`~leanlm.train.trainer.Trainer` with three parts replaced: the
model is a pretrained checkpoint with an adapter attached (only its parameters train — the
optimizer, mixed precision, gradient checkpointing, accumulation and checkpoints are the
trainer's), the data is the instruction loader, and the evaluation is the completion loss on the
held-out examples. The best evaluation's adapter is kept in ``OUT/best``, the last in
``OUT/adapter`` (peft's format).

It lives with the trainer it extends, so the adapter package itself imports neither the trainer
nor the data layer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.attention import SDPAMetadata
from leanlm.checkpoint import load_model
from leanlm.config import ModelConfig
from leanlm.data.tokens import Batch, restart_positions
from leanlm.errors import LeanLMError
from leanlm.fsutil import atomic_write, read_json_lines
from leanlm.peft.api import PeftConfig, apply_peft_, mark_trainable_, save_adapter
from leanlm.train.config import TrainConfig
from leanlm.train.parallelize import apply_ac
from leanlm.train.trainer import Trainer

IGNORE = -100
Example = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def encode_prompt(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """``<eos>`` + the prompt: the chat template (with the generation prompt) when the tokenizer
    has one, else the messages' text. Generation with the fine-tuned model starts from this."""
    if tok.chat_template:
        ids = tok.encode_chat(messages, add_generation_prompt=True)
    else:
        ids = tok.encode("\n".join(m["content"] for m in messages), add_special_tokens=False)
    return [tok.eos_token_id, *ids]


def read_examples(path: str | Path, tok: Any) -> list[Example]:
    """Tokenized (prompt, completion) pairs; a malformed line is an error naming it."""
    out: list[Example] = []
    path = Path(path)
    for lineno, ex in read_json_lines(path, "fine-tuning data"):
        if isinstance(ex, dict) and isinstance(ex.get("messages"), list) and ex["messages"]:
            msgs = ex["messages"]
            last = msgs[-1]
            if not (isinstance(last, dict) and last.get("role") == "assistant" and
                    isinstance(last.get("content"), str)):
                raise LeanLMError(f"{path}:{lineno}: the last message must be the assistant's answer "
                                  "(a dict with role 'assistant' and string content)")
            prompt_msgs, completion = msgs[:-1], last["content"]
        elif isinstance(ex, dict) and all(isinstance(ex.get(k), str) for k in ("prompt", "completion")):
            prompt_msgs, completion = [{"role": "user", "content": ex["prompt"]}], ex["completion"]
        else:
            fields = sorted(ex) if isinstance(ex, dict) else type(ex).__name__
            raise LeanLMError(f"{path}:{lineno}: expected string fields 'prompt' and 'completion', or "
                              f"'messages' (a list of chat messages); got {fields}")
        out.append((encode_prompt(tok, prompt_msgs),
                    [*tok.encode(completion, add_special_tokens=False), tok.eos_token_id]))
    if not out:
        raise LeanLMError(f"{path}: no examples")
    return out


def pack(examples: list[Example], order: np.ndarray, seq_len: int, eos_id: int) -> list[Batch]:
    """Rows of seq_len + 1 tokens, examples in ``order`` packed greedily (one Batch per row)."""
    rows, cur_t, cur_m, cur_d, doc = [], [], [], [], 0
    width = seq_len + 1

    def flush() -> None:
        nonlocal cur_t, cur_m, cur_d, doc
        pad = width - len(cur_t)
        toks = np.array(cur_t + [eos_id] * pad)
        mask = np.array(cur_m + [False] * pad)
        docs = np.array(cur_d + [doc] * pad)
        rows.append((toks, mask, docs))
        cur_t, cur_m, cur_d, doc = [], [], [], 0

    for i in order:
        prompt, completion = examples[i]
        toks = (prompt + completion)[:width]
        mask = ([False] * len(prompt) + [True] * len(completion))[:width]
        if len(cur_t) + len(toks) > width:
            flush()
        cur_t += toks
        cur_m += mask
        cur_d += [doc] * len(toks)
        doc += 1
    if cur_t:
        flush()
    out = []
    for toks, mask, docs in rows:
        t = torch.from_numpy(toks.astype(np.int64))
        d = torch.from_numpy(docs[:-1].astype(np.int64))
        targets = torch.where(torch.from_numpy(mask[1:]), t[1:], torch.full_like(t[1:], IGNORE))
        starts = torch.cat([torch.ones(1, dtype=torch.bool), d[1:] != d[:-1]])
        out.append(Batch(t[None, :-1], targets[None], restart_positions(starts[None]), d[None]))
    return out


def stack(rows: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(r, f) for r in rows]) for f in ("inputs", "targets", "positions",
                                                                      "documents")))


class InstructionLoader:
    """Packed instruction rows dealt out as the trainer's global batches (seeded, resumable)."""

    def __init__(self, examples: list[Example], seq_len: int, eos_id: int, micro_batch: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.examples, self.seq_len, self.eos_id, self.seed = examples, seq_len, eos_id, seed
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.global_batch = micro_batch * grad_accum * world
        self.epoch, self.cursor = 0, 0
        self._rows: tuple[int, list[Batch]] | None = None
        if len(self._epoch_rows()) < self.global_batch:
            raise LeanLMError(f"{len(examples)} examples pack into {len(self._epoch_rows())} rows of "
                              f"{seq_len} tokens, fewer than one batch of {self.global_batch}")

    def _epoch_rows(self) -> list[Batch]:
        if self._rows is None or self._rows[0] != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            self._rows = (self.epoch, pack(self.examples, order, self.seq_len, self.eos_id))
        return self._rows[1]

    def next_step(self) -> list[Batch]:
        if self.cursor + self.global_batch > len(self._epoch_rows()):
            self.epoch, self.cursor = self.epoch + 1, 0
        rows = self._epoch_rows()[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        mine = [rows[(a * self.world + self.rank) * self.micro_batch:][:self.micro_batch]
                for a in range(self.grad_accum)]
        return [stack(m) for m in mine]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("global_batch") != self.global_batch:
            raise LeanLMError("cannot resume: the checkpoint was made with another batch size")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class FineTuner(Trainer):
    """The trainer on a pretrained model with an adapter, instruction data and completion loss."""

    def __init__(self, cfg: TrainConfig, base: str | Path, peft: PeftConfig, train_file: str | Path,
                 val_file: str | Path | None = None, val_fraction: float = 0.05,
                 quantize: str | None = None, quiet: bool = False) -> None:
        self.base, self.peft, self.quantize = Path(base), peft, quantize
        if not (self.base / "config.json").is_file():
            raise LeanLMError(f"{self.base}: no config.json (expected a Hugging Face model directory)")
        self.train_file, self.val_file, self.val_fraction = Path(train_file), val_file, val_fraction
        self.best = float("inf")
        cfg = replace(cfg, model=ModelConfig.from_json_file(self.base / "config.json"),
                      tokenizer=str(self.base), data=str(train_file), check_memory=False)
        super().__init__(cfg, quiet)

    def check_data(self) -> None:
        if not self.train_file.is_file():
            raise LeanLMError(f"fine-tuning data {self.train_file} does not exist")

    def _prepare_data(self) -> None:
        cfg, d = self.cfg, self.d
        if d.world != 1:
            raise LeanLMError("fine-tuning runs in one process (no torchrun) for now")
        examples = read_examples(self.train_file, self.tok)
        if self.val_file is not None:
            val = read_examples(self.val_file, self.tok)
        else:  # a seeded held-out share of the training file
            order = np.random.default_rng(cfg.seed).permutation(len(examples))
            n_val = max(1, int(len(examples) * self.val_fraction)) if len(examples) > 1 else 0
            val = [examples[i] for i in order[:n_val]]
            examples = [examples[i] for i in order[n_val:]]
        self.val_examples = val
        self.loader = InstructionLoader(examples, cfg.seq_len, self.eos_id, cfg.micro_batch,
                                        cfg.grad_accum, seed=cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "train_config.json", cfg.to_json())

    def _build_model(self) -> torch.nn.Module:
        model = load_model(self.base, dtype="float32").to(self.d.device)  # fp32 master weights
        if self.quantize == "int4":  # QLoRA on a base quantized here
            from leanlm.quant import RTNConfig, quantize_

            quantize_(model, RTNConfig(bits=4, group_size=128))
        apply_peft_(model, self.peft)
        mark_trainable_(model)
        apply_ac(model, self.cfg.ac, self.cfg.ac_every)
        self.mode = "none"
        return model

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean completion-token loss on the held-out examples (adapter kept in OUT/best)."""
        self.model.eval()
        total, count = 0.0, 0
        rows = pack(self.val_examples, np.arange(len(self.val_examples)), self.cfg.seq_len, self.eos_id)
        for i in range(0, len(rows), self.cfg.micro_batch):
            b = stack(rows[i:i + self.cfg.micro_batch]).to(self.d.device)
            n = int((b.targets != IGNORE).sum())
            with self._autocast():
                loss = self.model.loss(b.inputs, b.targets, b.positions,
                                       SDPAMetadata.packed(b.documents, self.model.sliding_window))
            total += float(loss) * n
            count += n
        self.model.train()
        result = {"completion_loss": total / max(count, 1)}
        if result["completion_loss"] < self.best:
            self.best = result["completion_loss"]
            save_adapter(self.model, self.out / "best")
        return result

    def export(self) -> Path:
        return save_adapter(self.model, self.out / "adapter")
