"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024), as AutoAWQ does it.

A few input channels carry large activations; their weights matter most. AWQ protects them
without mixed precision by scaling: for a per-input-channel s > 0,

    y = (W diag(s)) (diag(s)⁻¹ x)        exact in full precision,

and the rounding error of the salient columns of W·diag(s) shrinks relative to their scale.
diag(s)⁻¹ is folded into the op that produces x: the preceding RMSNorm/LayerNorm weight (and
bias), or the output rows of the preceding linear (v_proj before o_proj without GQA; up_proj
before down_proj in a gated MLP, since act(g)⊙(s⁻¹u) = s⁻¹(act(g)⊙u)).

Scale search per group of linears reading one input (:func:`~leanlm.quant.api.block_sublayers`),
with x̄ the mean |x| per channel and w̄ the mean of |W| normalised by its group maximum:

    s(α) = x̄^α / w̄^(1-α)  (AutoAWQ "duo scaling"; x̄^α alone with duo_scaling=False),
    s ← s / sqrt(max s · min s),     α ∈ {0, 1/20, …, 19/20},

choosing the α whose fake-quantized weights Q(W·s)/s give the smallest mean squared error of
the inspected module's output (the whole attention or MLP, or the linear itself). Then a clip
search per linear (not q/k, whose errors the softmax amplifies): per (row, group) the weights
are clipped to ±m·(1 - i/20), i < 10, picking the m with the smallest error of the group's
partial outputs on 512 calibration tokens. Finally the scaled, clipped weights are quantized
by round-to-nearest with a zero point (AWQ's default: asymmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.quant.api import (
    Method,
    Sublayer,
    WeightOnlyConfig,
    block_sublayers,
    register_method,
    run_module,
    set_module,
)
from leanlm.quant.calibration import LayerInputs, capture_inputs
from leanlm.quant.primitives import fake_quantize, qparams, quantize_codes
from leanlm.quant.rtn import rtn_quantize, to_quant_linear

NO_CLIP = ("q_proj", "k_proj")


@dataclass
class AWQConfig(WeightOnlyConfig):
    sym: bool = False
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1 or self.clip_grid < 1 or not 0.0 <= self.max_shrink < 1.0:
            raise LeanLMError("AWQ needs n_grid >= 1, clip_grid >= 1 and 0 <= max_shrink < 1")


def apply_scale(block: nn.Module, sub: Sublayer, scales: torch.Tensor) -> None:
    """Fold diag(s)⁻¹ into ``sub.prev`` and diag(s) into the columns of ``sub``'s linears (exact)."""
    prev = block.get_submodule(sub.prev)
    with torch.no_grad():
        s = scales.to(prev.weight.device, torch.float32)
        if isinstance(prev, nn.Linear):
            prev.weight.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
        else:  # a norm: y = w ⊙ x̂ (+ b)
            prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
        for name in sub.names:
            fc = block.get_submodule(name)
            fc.weight.copy_((fc.weight.float() * s[None, :]).to(fc.weight.dtype))


def _group_normalised_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |W| / (group max |W|): w̄ per input channel."""
    gs = w.shape[1] if group_size == -1 else group_size
    parts = [(c.abs() / (c.abs().amax(1, keepdim=True) + 1e-6)) for c in w.float().split(gs, 1)]
    return torch.cat(parts, 1).mean(0)


@register_method("awq", AWQConfig)
class AWQ(Method):
    calibrated = True
    quantizes_head = False
    propagate_quantized = False

    def quantize_block(self, block: nn.Module, inputs: LayerInputs, targets: set[str]) -> None:
        subs = block_sublayers(block, targets)
        feats = self._capture(block, inputs, subs)
        plans = []
        for s in subs:
            if s.prev is not None:
                plans.append((s, self._search_scale(block, s, feats[s.names[0]], inputs)))
        for s, scales in plans:
            apply_scale(block, s, scales)
            feats[s.names[0]] = [x / scales.to(x.dtype) for x in feats[s.names[0]]]
        for s in subs:
            x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[s.names[0]]])
            for name in s.names:
                if name not in targets:
                    continue
                linear = block.get_submodule(name)
                if self.config.clip and not name.endswith(NO_CLIP):
                    self._clip(linear, x)
                set_module(block, name, to_quant_linear(linear, *rtn_quantize(linear.weight, self.config),
                                                        self.config))

    def _capture(self, block: nn.Module, inputs: LayerInputs, subs: list[Sublayer]) -> dict[str, list]:
        """The input of each sub-layer, per micro-batch (kept: the scale search re-runs on them)."""
        feats: dict[str, list[torch.Tensor]] = {s.names[0]: [] for s in subs}
        readers = {n: block.get_submodule(n) for n in feats}
        capture_inputs(readers, inputs, lambda x, meta: block(x, meta),
                       lambda name, x: feats[name].append(x), stop_after=subs[-1].names[0])
        return feats

    def _search_scale(self, block: nn.Module, sub: Sublayer, feats: list[torch.Tensor],
                      inputs: LayerInputs) -> torch.Tensor:
        cfg = self.config
        inspect = run_module(block, sub.inspect)
        metas = [meta for _, meta in inputs.batches]
        with torch.no_grad():
            x_mean = sum(f.float().abs().reshape(-1, f.shape[-1]).sum(0) for f in feats)
            x_mean = x_mean / sum(f.numel() // f.shape[-1] for f in feats)
            fcs = [block.get_submodule(n) for n in sub.names]
            originals = [fc.weight.detach().clone() for fc in fcs]
            w_mean = _group_normalised_mean(torch.cat(originals), cfg.group_size)
            reference = [inspect(f, m) for f, m in zip(feats, metas, strict=True)]
            best, best_err = None, float("inf")
            for step in range(cfg.n_grid):
                ratio = step / cfg.n_grid
                if cfg.duo_scaling:
                    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
                else:
                    s = x_mean.pow(ratio).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for fc, w in zip(fcs, originals, strict=True):
                    scaled = fake_quantize(w.float() * s, cfg.bits, cfg.group_size, cfg.sym) / s
                    fc.weight.copy_(scaled.to(w.dtype))
                err = sum(float((inspect(f, m).float() - r.float()).pow(2).sum())
                          for f, m, r in zip(feats, metas, reference, strict=True))
                if err < best_err:
                    best, best_err = s.clone(), err
            for fc, w in zip(fcs, originals, strict=True):
                fc.weight.copy_(w)
        return best

    def _clip(self, linear: nn.Linear, x: torch.Tensor, rows_per_chunk: int = 64) -> None:
        cfg = self.config
        w = linear.weight.detach().float()
        n, k = w.shape
        gs = k if cfg.group_size == -1 else cfg.group_size
        groups = -(-k // gs)
        pad = groups * gs - k
        step = max(1, x.shape[0] // cfg.clip_tokens)
        xs = torch.nn.functional.pad(x[::step][:cfg.clip_tokens].float(), (0, pad))
        xg = xs.view(-1, groups, gs).transpose(0, 1)  # [G, T, gs]
        wp = torch.nn.functional.pad(w, (0, pad)).view(n, groups, gs)
        best_all = []
        with torch.no_grad():
            for wc in wp.split(rows_per_chunk):  # [c, G, gs]
                wt = wc.transpose(0, 1)  # [G, c, gs]
                org = torch.bmm(xg, wt.transpose(1, 2))  # [G, T, c]
                org_max = wc.abs().amax(-1, keepdim=True)  # [c, G, 1]
                best = org_max.clone()
                best_err = torch.full_like(org_max, float("inf"))
                for i in range(int(cfg.max_shrink * cfg.clip_grid)):
                    mx = org_max * (1 - i / cfg.clip_grid)
                    cur = torch.clamp(wc, -mx, mx)
                    scale, zero = qparams(cur, cfg.bits, cfg.sym)
                    q = (quantize_codes(cur, scale[..., None], zero[..., None], cfg.bits)
                         - zero[..., None]) * scale[..., None]
                    out = torch.bmm(xg, q.transpose(0, 1).transpose(1, 2))
                    err = (out - org).pow(2).mean(1).transpose(0, 1)[..., None]  # [c, G, 1]
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = torch.where(better, mx, best)
                best_all.append(best)
            mx = torch.cat(best_all).expand(n, groups, gs).reshape(n, -1)[:, :k]
            linear.weight.copy_(torch.clamp(w, -mx, mx).to(linear.weight.dtype))

