"""Bottleneck adapters: series (Houlsby, Pfeiffer), parallel (scaled), and Compacter.

Series adapter (Houlsby et al. 2019): a bottleneck with a skip connection inserted after a
sublayer's output projection,

    h ← h + W_up σ(W_down h),      W_down [m, d], W_up [d, m], m ≪ d,

placed after attention and after the MLP (Houlsby: targets ``self_attn.o_proj`` and
``mlp.down_proj``) or after the MLP only (Pfeiffer et al. 2020: ``mlp.down_proj``). W_up starts
at zero, so the model starts as the base model. LLM-Adapters (Hu et al. 2023) compares these
placements on LLaMA.

Parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): the bottleneck reads the sublayer's *input* and is added to its output, scaled:

    y = sublayer(x) + s · W_up σ(W_down x)            (s = 4 in the paper; target ``mlp``)

Compacter (Mahabadi et al. 2021): the bottleneck's matrices are parameterised hypercomplex
multiplication (PHM) layers, sums of Kronecker products with the small factors shared by every
adapter of the model and the large ones of rank one:

    W = Σ_{i=1..n} A_i ⊗ (s_i t_iᵀ),    A_i [n, n] shared,  s_i [d/n, 1],  t_i [1, m/n]

which cuts the adapter to about (d + m) · n parameters per matrix (placement: Pfeiffer's).
None of these can be merged into the base weights (σ is not linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.peft.api import Adapter, PeftConfig, register_adapter

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class BottleneckConfig(PeftConfig):
    """Series adapters: ``placement`` houlsby (after attention and MLP) or pfeiffer (after MLP)."""

    bottleneck: int = 64
    activation: str = "relu"
    placement: str = "houlsby"
    peft_type: ClassVar[str] = "BOTTLENECK"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise LeanLMError(f"activation {self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise LeanLMError(f"placement {self.placement!r}: expected houlsby or pfeiffer")
        if self.bottleneck < 1:
            raise LeanLMError(f"bottleneck must be >= 1, got {self.bottleneck}")

    def default_targets(self) -> list[str]:
        return ["self_attn.o_proj", "mlp.down_proj"] if self.placement == "houlsby" else ["mlp.down_proj"]


@dataclass
class ParallelAdapterConfig(PeftConfig):
    bottleneck: int = 64
    activation: str = "relu"
    scaling: float = 4.0
    peft_type: ClassVar[str] = "PARALLEL_ADAPTER"

    def default_targets(self) -> list[str]:
        return ["mlp"]


@dataclass
class CompacterConfig(PeftConfig):
    bottleneck: int = 64
    activation: str = "relu"
    phm_dim: int = 4  # n: Kronecker factors per matrix
    peft_type: ClassVar[str] = "COMPACTER"

    def default_targets(self) -> list[str]:
        return ["mlp.down_proj"]


def _width(module: nn.Module, name: str, side: str) -> int:
    """The hidden width an adapter on ``module`` reads (``in``) or writes (``out``)."""
    if hasattr(module, "out_features"):
        return module.in_features if side == "in" else module.out_features
    for attr in ("o_proj", "down_proj"):  # attention / MLP blocks: hidden in, hidden out
        sub = getattr(module, attr, None)
        if sub is not None:
            return sub.out_features
    raise LeanLMError(f"cannot tell the hidden size of {name} ({type(module).__name__})")


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


class Bottleneck(Adapter):
    """Series adapter on a module's output: y + W_up σ(W_down y)."""

    def __init__(self, config: BottleneckConfig, module: nn.Module, name: str, shared: dict) -> None:
        super().__init__()
        d = _width(module, name, "out")
        self.down = nn.Linear(d, config.bottleneck, device=_device(module))
        self.up = nn.Linear(config.bottleneck, d, device=_device(module))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.activation]

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = y.to(self.down.weight.dtype)
        return y + self.up(self.act(self.down(h))).to(y.dtype)


class ParallelAdapter(Adapter):
    """y + s · W_up σ(W_down x) with x the module's input."""

    def __init__(self, config: ParallelAdapterConfig, module: nn.Module, name: str, shared: dict) -> None:
        super().__init__()
        d_in, d_out = _width(module, name, "in"), _width(module, name, "out")
        self.down = nn.Linear(d_in, config.bottleneck, device=_device(module))
        self.up = nn.Linear(config.bottleneck, d_out, device=_device(module))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act, self.scaling = ACTIVATIONS[config.activation], config.scaling

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        return y + (self.scaling * self.up(self.act(self.down(h)))).to(y.dtype)


class PHMLinear(nn.Module):
    """x Wᵀ + b with W = Σ_i A_i ⊗ (s_i t_iᵀ): shared rule A [n, n, n], rank-one factors."""

    def __init__(self, d_in: int, d_out: int, rule: nn.Parameter, device: torch.device) -> None:
        super().__init__()
        n = rule.shape[0]
        if d_in % n or d_out % n:
            raise LeanLMError(f"Compacter's phm_dim {n} must divide the adapter sizes {d_in} and {d_out}")
        self.rule = rule
        self.s = nn.Parameter(torch.empty(n, d_out // n, 1, device=device))
        self.t = nn.Parameter(torch.empty(n, 1, d_in // n, device=device))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device))
        for p in (self.s, self.t):  # each Kronecker product then has unit-variance-like entries
            nn.init.normal_(p, std=math.sqrt(1.0 / math.sqrt(d_in)))

    def weight(self) -> torch.Tensor:
        """[d_out, d_in] = Σ_i kron(A_i, s_i t_i)."""
        b = self.s @ self.t  # [n, d_out/n, d_in/n]
        n = self.rule.shape[0]
        w = torch.einsum("iab,icd->acbd", self.rule, b)  # [n, d_out/n, n, d_in/n]
        return w.reshape(n * b.shape[1], n * b.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class Compacter(Adapter):
    def __init__(self, config: CompacterConfig, module: nn.Module, name: str, shared: dict) -> None:
        super().__init__()
        n, m, d = config.phm_dim, config.bottleneck, _width(module, name, "out")
        if "rule" not in shared:  # one set of A_i for every Compacter layer of the model
            shared["rule"] = nn.Parameter(torch.randn(n, n, n, device=_device(module)) / n)
        self.down = PHMLinear(d, m, shared["rule"], _device(module))
        self.up = PHMLinear(m, d, shared["rule"], _device(module))
        with torch.no_grad():
            self.up.s.zero_()  # starts as the identity
        self.act = ACTIVATIONS[config.activation]

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = y.to(self.up.bias.dtype)
        return y + self.up(self.act(self.down(h))).to(y.dtype)

    def to_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rule = state.pop("down.rule")
        state.pop("up.rule")
        return {**state, "shared.compacter.phm_rule": rule}

    def from_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rule = state.pop("shared.compacter.phm_rule")
        return {**state, "down.rule": rule, "up.rule": rule}


register_adapter("adapter", BottleneckConfig, Bottleneck, placement="houlsby")
register_adapter("pfeiffer", BottleneckConfig, Bottleneck, placement="pfeiffer")
register_adapter("parallel-adapter", ParallelAdapterConfig, ParallelAdapter)
register_adapter("compacter", CompacterConfig, Compacter)
