"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, T-Few).

Learned vectors rescale activations elementwise: the keys and values of attention and the input
of the MLP's down projection (the intermediate activation):

    k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x),   y = W_down (l_ff ⊙ h)

initialised to ones (the base model). That is d_k + d_v + d_ff parameters per block. A module
listed in ``feedforward_modules`` has its input scaled, the others their output (bias included,
as peft does). Merging: W ← diag(l) W (and b ← l ⊙ b) for outputs, W ← W diag(l) for inputs.
peft stores ``ia3_l`` as [out, 1] for outputs and [1, in] for inputs; so does this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.peft.api import Adapter, PeftConfig, register_adapter
from leanlm.peft.lora import dims


@dataclass
class IA3Config(PeftConfig):
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    peft_type: ClassVar[str] = "IA3"

    def default_targets(self) -> list[str]:
        return ["k_proj", "v_proj", "down_proj"]

    def to_peft_json(self) -> dict[str, Any]:
        return {**super().to_peft_json(), "fan_in_fan_out": False, "init_ia3_weights": True,
                "task_type": "CAUSAL_LM"}


class IA3(Adapter):
    def __init__(self, config: IA3Config, module: nn.Module, name: str, shared: dict) -> None:
        super().__init__()
        k, n = dims(module, name)
        self.feedforward = any(name == f or name.endswith("." + f) for f in config.feedforward_modules)
        device = next(iter(module.parameters()), torch.empty(0)).device
        self.ia3_l = nn.Parameter(torch.ones(k if self.feedforward else n, device=device))

    def pre(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype) if self.feedforward else x

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.feedforward else y * self.ia3_l.to(y.dtype)

    def _scale(self, module: nn.Module, inverse: bool) -> None:
        if not isinstance(module, nn.Linear):
            raise LeanLMError("merging (IA)³ into a quantized base would need re-quantization")
        if getattr(module, "is_packed", False):
            module.unpack_()  # merging writes the plain weight
        scale = self.ia3_l.detach().float()
        scale = 1 / scale if inverse else scale
        with torch.no_grad():
            w = module.weight.float()
            w = w * scale[None, :] if self.feedforward else w * scale[:, None]
            module.weight.copy_(w.to(module.weight.dtype))
            if module.bias is not None and not self.feedforward:
                module.bias.copy_((module.bias.float() * scale).to(module.bias.dtype))

    def merge(self, module: nn.Module) -> None:
        self._scale(module, inverse=False)

    def unmerge(self, module: nn.Module) -> None:
        self._scale(module, inverse=True)

    def to_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = state["ia3_l"]
        return {"ia3_l": scale[None, :] if self.feedforward else scale[:, None]}

    def from_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ia3_l": state["ia3_l"].reshape(-1)}


register_adapter("ia3", IA3Config, IA3)
