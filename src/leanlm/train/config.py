"""``TrainConfig``: everything one pretraining run needs, torch-free, overridable as key=value.

A recipe (``recipes.py``) is a function returning one of these; the CLI applies ``--set
key=value`` overrides on top (``model.<field>=value`` reaches into the model config), so a run
is fully described by its recipe name plus overrides, which the trainer writes to
``OUT/train_config.json``. ``parallel.<field>=value`` sets the process mesh
(:class:`ParallelConfig`); ``parallel=fsdp`` is ``parallel.mode=fsdp``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError


@dataclass
class ParallelConfig:
    """How the processes share the work: a mesh of pp × dp × tp ranks, whose product must be the
    world size (``train.parallelize.mesh_shape`` checks it, and the model's divisibility by
    ``tp`` and ``pp``, before any process builds the model).

    ``mode`` is the data parallelism over the dp ranks: ``auto`` (FSDP2 when dp > 1), ``none``,
    ``ddp`` or ``fsdp``. ``tp`` > 1 shards every block with the one tensor-parallel plan
    (:mod:`leanlm.parallel`) inside each data-parallel replica and pipeline stage;
    ``sequence_parallel`` splits the norms and the residual stream by sequence between the tp
    ranks (Korthikanti et al. 2022), ``loss_parallel`` computes the cross-entropy on each rank's
    vocabulary shard without gathering the logits.
    """

    mode: str = "auto"  # auto (fsdp when dp > 1) | none | ddp | fsdp
    dp: int = 0  # data-parallel ranks; 0 = world size / (tp · pp)
    tp: int = 1  # tensor-parallel ranks
    pp: int = 1  # pipeline stages
    sequence_parallel: bool = True  # with tp > 1
    loss_parallel: bool = True  # with tp > 1
    pp_schedule: str = "1f1b"  # with pp > 1: gpipe | 1f1b | interleaved (interleaved 1F1B)
    pp_microbatches: int = 0  # with pp > 1: pipeline micro-batches per micro_batch; 0 = micro_batch
    pp_virtual: int = 1  # with pp_schedule=interleaved: stages per rank (rank r runs r, r+pp, ...)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "none", "ddp", "fsdp"):
            raise LeanLMError(f"train config: parallel.mode must be 'auto', 'none', 'ddp' or 'fsdp', "
                              f"got {self.mode!r}")
        if self.pp_schedule not in ("gpipe", "1f1b", "interleaved"):
            raise LeanLMError(f"train config: parallel.pp_schedule must be 'gpipe', '1f1b' or "
                              f"'interleaved', got {self.pp_schedule!r}")
        if self.pp_virtual > 1 and self.pp_schedule != "interleaved":
            raise LeanLMError(f"train config: parallel.pp_virtual={self.pp_virtual} stages per rank "
                              "needs parallel.pp_schedule=interleaved")
        for name, low in (("dp", 0), ("tp", 1), ("pp", 1), ("pp_microbatches", 0), ("pp_virtual", 1)):
            if getattr(self, name) < low:
                raise LeanLMError(f"train config: parallel.{name} must be >= {low}"
                                  f"{' (0: derived)' if low == 0 else ''}, "
                                  f"got {getattr(self, name)}")


@dataclass
class TrainConfig:
    model: ModelConfig
    data: str = ""  # a corpus dir (leanlm corpus build) with <domain>/{train,val}-*.jsonl
    tokenizer: str = ""  # a tokenizer dir; default: the shipped default model's
    out: str = "runs/run"
    seed: int = 0
    # batch: global batch = micro_batch * grad_accum * world_size sequences of seq_len tokens
    seq_len: int = 512
    micro_batch: int = 8
    grad_accum: int = 1
    document_masking: bool = True
    # sample each sequence's domain by these weights ({"code": 0.5, ...}, or a JSON file such as
    # the weights.json of `leanlm data doremi`); None: the domains' natural proportions
    domain_weights: dict[str, float] | str | None = None
    # start from a Hugging Face checkpoint's weights (same shapes) instead of a random init
    init_from: str = ""
    # knowledge distillation (Hinton et al. 2015): a teacher with the same vocabulary; the loss is
    # (1 - w)·CE(data) + w·T²·KL(teacher_T ‖ student_T), w = distill_weight, T = distill_temperature
    teacher: str = ""
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # optimisation: AdamW with linear warmup, then cosine or warmup-stable-decay (WSD)
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps in the final linear decay
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_std: float = 0.02
    # systems
    precision: str = "bf16"  # bf16 (autocast / FSDP param dtype, fp32 master weights) | fp32
    ac: str = "none"  # none | full | selective (op-level: keep matmul outputs, recompute the rest)
    ac_every: int = 1  # checkpoint every n-th block (layer-selective AC)
    compile: bool = False
    # the process mesh and data parallelism (a plain string is its mode: "fsdp" = mode fsdp)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    reshard_after_forward: bool = True  # True = ZeRO-3, False = ZeRO-2
    cpu_offload: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # bookkeeping
    eval_every: int = 200
    eval_windows: int = 0  # per domain; 0 = the whole validation split
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # write checkpoints in the background (DCP async_save)
    log_every: int = 10
    peak_tflops: float = 0.0  # for MFU; 0 = the device's known peak (or none on CPU)
    progress: bool = True
    export_dtype: str = "float32"  # dtype of the exported HF checkpoint (OUT/model)
    check_memory: bool = True  # refuse to start when the memory estimate exceeds what is free

    def __post_init__(self) -> None:
        if isinstance(self.parallel, str):
            self.parallel = ParallelConfig(mode=self.parallel)
        elif isinstance(self.parallel, dict):  # (as written to train_config.json)
            self.parallel = ParallelConfig(**self.parallel)
        checks = [
            (self.schedule in ("cosine", "wsd"), "schedule must be 'cosine' or 'wsd'"),
            (self.precision in ("bf16", "fp32"), "precision must be 'bf16' or 'fp32'"),
            (self.ac in ("none", "full", "selective"), "ac must be 'none', 'full' or 'selective'"),
            (self.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'"),
            (self.seq_len >= 2 and self.micro_batch >= 1 and self.grad_accum >= 1,
             "seq_len >= 2, micro_batch >= 1 and grad_accum >= 1 are required"),
            (self.max_steps >= 1 and self.warmup_steps >= 0, "max_steps >= 1, warmup_steps >= 0"),
            (self.ac_every >= 1, "ac_every must be >= 1"),
            (self.lr > 0 and 0.0 <= self.min_lr_ratio <= 1.0 and 0.0 <= self.decay_fraction <= 1.0,
             "lr > 0, and min_lr_ratio and decay_fraction in [0, 1], are required"),
            (self.eval_every >= 0 and self.eval_windows >= 0,
             "eval_every, eval_windows >= 0 (0 = off / all)"),
            (self.ckpt_every >= 1 and self.log_every >= 1 and self.keep_checkpoints >= 1,
             "ckpt_every, log_every and keep_checkpoints must be >= 1"),
            (0.0 <= self.distill_weight <= 1.0 and self.distill_temperature > 0,
             "distill_weight must be in [0, 1] and distill_temperature > 0"),
            (self.export_dtype in ("float32", "bfloat16", "float16"),
             "export_dtype must be float32, bfloat16 or float16"),
            (self.seq_len <= self.model.max_position_embeddings,
             f"seq_len {self.seq_len} > the model's context {self.model.max_position_embeddings}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LeanLMError(f"train config: {msg}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_hf()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"


def _parse(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        return tuple(float(x) for x in value.split(","))
    if current is None:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``["lr=1e-3", "model.num_layers=4", "parallel.tp=2"]`` -> a new, validated config."""
    top: dict[str, Any] = {}
    model: dict[str, Any] = {}
    par: dict[str, Any] = {}
    nested = {"model.": (model, cfg.model, {f.name for f in dataclasses.fields(ModelConfig)}),
              "parallel.": (par, cfg.parallel, {f.name for f in dataclasses.fields(ParallelConfig)})}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "parallel"}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise LeanLMError(f"override {item!r}: expected key=value")
        key = key.strip().replace("-", "_")
        if key == "parallel":  # the data-parallel mode, as before the mesh had dimensions
            key = "parallel.mode"
        prefix = next((p for p in nested if key.startswith(p)), "")
        target, obj, valid = nested[prefix] if prefix else (top, cfg, fields)
        name = key[len(prefix):]
        current = getattr(obj, name, None)
        if name not in valid:
            raise LeanLMError(f"override {item!r}: unknown setting {key!r} (known: "
                              f"{', '.join(prefix + v for v in sorted(valid))})")
        try:
            target[name] = _parse(value, current)
        except ValueError as e:
            raise LeanLMError(f"override {item!r}: {e}") from None
    if "num_layers" in model:  # re-derive per-layer types and head size for the new shape
        model.setdefault("layer_types", None)
    if {"hidden_size", "num_heads"} & model.keys():
        model.setdefault("head_dim", None)
    model_cfg = dataclasses.replace(cfg.model, **model) if model else cfg.model
    par_cfg = dataclasses.replace(cfg.parallel, **par) if par else cfg.parallel
    return dataclasses.replace(cfg, model=model_cfg, parallel=par_cfg, **top)
