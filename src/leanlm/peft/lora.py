"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024), on any linear —
``nn.Linear`` or a quantized ``QuantLinear`` base (QLoRA, Dettmers et al. 2023).

LoRA freezes W [out, in] and learns a rank-r update:

    y = W x + b + s · B A dropout(x),     A [r, in], B [out, r],   s = α / r   (rsLoRA: α / √r)

A is initialised like a linear layer (Kaiming-uniform, a = √5) and B with zeros, so training
starts from the base model. Merging folds the update into the weights: W ← W + s·B A.

DoRA decomposes the weight into a magnitude m (one per output row) and a direction, and adapts
the direction with LoRA:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row,     m initialised to ‖W‖_row

computed, as in the paper (§4.3) and peft, with the norm treated as a constant in the backward
pass: y = W x + b + (m/‖·‖ − 1) ⊙ W x + (m/‖·‖) ⊙ s·B A x. Parameter names follow peft
(``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``), so its files load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.peft.api import Adapter, PeftConfig, register_adapter


@dataclass
class LoRAConfig(PeftConfig):
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        if self.r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise LeanLMError(f"LoRA needs r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got "
                              f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}")

    def default_targets(self) -> list[str]:
        return ["q_proj", "v_proj"]  # peft's default for Llama

    @classmethod
    def from_cli(cls, alpha: float | None = None, dropout: float | None = None, **options: Any) -> LoRAConfig:
        """``--alpha`` and ``--dropout`` are ``lora_alpha`` and ``lora_dropout``."""
        return super().from_cli(lora_alpha=alpha, lora_dropout=dropout, **options)  # type: ignore[return-value]

    def to_peft_json(self) -> dict[str, Any]:
        return {**super().to_peft_json(), "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "task_type": "CAUSAL_LM"}


def base_weight(module: nn.Module) -> torch.Tensor:
    """W of a plain or quantized linear (dequantized), in fp32."""
    if isinstance(module, nn.Linear):  # a weight packed for CPU inference reads back plain
        return (module.dense_weight() if getattr(module, "is_packed", False) else module.weight).float()
    if hasattr(module, "dequantize"):
        return module.dequantize(torch.float32)
    raise LeanLMError(f"LoRA targets linear layers; got {type(module).__name__}")


def dims(module: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) features of the linear ``module`` — of the whole layer where it is a
    tensor-parallel shard (``unsharded_features``, set by :mod:`leanlm.parallel`), so that an
    adapter attached to a sharded model has its checkpoint's shapes until it is sharded too."""
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        raise LeanLMError(f"{name} is a {type(module).__name__}, not a linear layer: LoRA and IA3 "
                          "target linears (q_proj, v_proj, down_proj …)")
    return getattr(module, "unsharded_features", (module.in_features, module.out_features))


class LoRA(Adapter):
    def __init__(self, config: LoRAConfig, module: nn.Module, name: str, shared: dict) -> None:
        super().__init__()
        k, n = dims(module, name)
        dtype = torch.float32
        self.lora_A = nn.Linear(k, config.r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(config.r, n, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.lora_magnitude_vector = None
        if config.use_dora:
            with torch.no_grad():
                norm = base_weight(module).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)
        self.to(next(iter(module.parameters()), torch.empty(0)).device)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(h)) * self.scaling
        if self.lora_magnitude_vector is None:
            return y + lora.to(y.dtype)
        with torch.no_grad():  # DoRA: the norm is a constant for the gradient
            norm = (base_weight(module) + self.delta().float()).norm(dim=1)
        scale = (self.lora_magnitude_vector / norm).to(y.dtype)
        bias = getattr(module, "bias", None)
        base = y if bias is None else y - bias.to(y.dtype)
        return y + (scale - 1) * base + scale * lora.to(y.dtype)

    def shard_problem(self) -> str | None:
        if self.lora_magnitude_vector is not None:
            return ("DoRA adapters cannot be sharded for tensor parallelism (their row norms need whole "
                    "weight rows): merge them before sharding, or use LoRA")
        return None

    def shard_(self, split: str, index: slice) -> list[nn.Parameter]:
        """S-LoRA's tensor-parallel layout (Sheng et al. 2023, §5): the adapter is cut like its
        base so that it needs no communication of its own. Column-parallel base (rank keeps
        output rows ``index``): A [r, in] replicated, B [out, r] → B[index]; the rank computes
        its rows of s·B A x from the whole x. Row-parallel base (rank keeps input columns
        ``index``): A → A[:, index], B replicated; s·B (A_p x_p) is this rank's partial of
        s·B A x (A x = Σ_p A_p x_p and B is linear), added to the base's partial output before
        the one all-reduce that sums them. DoRA's row norms ‖W + s·B A‖ need whole rows of W:
        it is not sharded. The whole factor's gradient is a sum over the ranks (Σ_p B_pᵀ ∂L/∂y_p
        for A; Σ_p ∂L/∂y ⊗ A_p x_p for B): it is returned for the caller to all-reduce."""
        problem = self.shard_problem()
        if problem:
            raise LeanLMError(problem)
        cut, whole = (self.lora_B, self.lora_A) if split == "rows" else (self.lora_A, self.lora_B)
        w = cut.weight.detach()
        kept = w[index] if split == "rows" else w[:, index]
        cut.weight = nn.Parameter(kept.clone(), requires_grad=cut.weight.requires_grad)
        if split == "rows":
            cut.out_features = kept.shape[0]
        else:
            cut.in_features = kept.shape[1]
        return [whole.weight]

    def _set_weight(self, module: nn.Module, w: torch.Tensor) -> None:
        if not isinstance(module, nn.Linear):
            raise LeanLMError("merging into a quantized base would need re-quantization: dequantize "
                              "the model first, or keep the adapter unmerged")
        if getattr(module, "is_packed", False):
            module.unpack_()  # merging writes the plain weight
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype))

    def merge(self, module: nn.Module) -> None:
        w = base_weight(module)
        merged = w + self.delta().float()
        if self.lora_magnitude_vector is not None:
            self._orig = w.clone()  # DoRA's merge is not additive: keep W for unmerge
            merged = merged * (self.lora_magnitude_vector.float() / merged.norm(dim=1))[:, None]
        self._set_weight(module, merged)

    def unmerge(self, module: nn.Module) -> None:
        if self.lora_magnitude_vector is not None:
            self._set_weight(module, self._orig)
            del self._orig
        else:
            self._set_weight(module, base_weight(module) - self.delta().float())


register_adapter("lora", LoRAConfig, LoRA)
register_adapter("dora", LoRAConfig, LoRA, use_dora=True)
