"""Tensor-parallel shards of quantized linears, in one process: the row shards' outputs side by
side, and the column shards' partial outputs summed, give the whole layer's output."""

from __future__ import annotations

import copy

import pytest
import torch

from leanlm.quant.linear import QuantLinear, W8A8Linear
from leanlm.quant.llm_int8 import Int8OutlierLinear
from leanlm.quant.primitives import default_g_idx, group_params, quantize_weight
from leanlm.quant.sharding import shard_columns_, shard_rows_


def quant_linear(n: int, k: int, bits: int, group: int, act_order: bool, backend: str) -> QuantLinear:
    torch.manual_seed(k + group)
    w = torch.randn(n, k)
    s, z = group_params(w, bits, group, sym=False)
    g_idx = default_g_idx(k, group)
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    return QuantLinear.from_codes(quantize_weight(w, s, z, bits, g_idx), s, z, g_idx, bits, group,
                                  torch.randn(n), torch.float32, backend)


def pieces(size: int, parts: int) -> list[slice]:
    step = size // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


def run(layer: QuantLinear, x: torch.Tensor, backend: str) -> torch.Tensor:
    layer.backend = backend
    with torch.inference_mode():
        return layer(x)


@pytest.mark.parametrize(("bits", "group", "act_order", "parts", "kernels"), [
    (4, 32, False, 3, ["int4pack"] * 3),            # whole groups on every shard: ordinary layers
    (4, 32, False, 2, ["int4pack", None]),          # rank 1 starts mid-group: every group's scales
    (4, 32, True, 2, [None, None]),                 # act-order: every group's scales, global ids
    (8, -1, False, 2, ["int8pack"] * 2),            # per-channel
    (8, -1, False, 4, [None] * 4),                  # 24 columns: torch's int8 kernel needs 16 | K
])
def test_quant_linear_shards_add_up(bits: int, group: int, act_order: bool, parts: int,
                                    kernels: list[str | None]) -> None:
    whole = quant_linear(64, 96, bits, group, act_order, "auto")
    x = torch.randn(3, 96)
    want = run(copy.deepcopy(whole), x, "reference")
    rows = []
    for index in pieces(64, 2):
        shard = copy.deepcopy(whole)
        shard_rows_(shard, index)
        assert (shard.out_features, shard.in_features) == (32, 96)
        rows.append(run(shard, x, "reference"))
    torch.testing.assert_close(torch.cat(rows, -1), want, rtol=1e-5, atol=1e-5)
    exact, fast = torch.zeros_like(want), torch.zeros_like(want)
    for p, index in enumerate(pieces(96, parts)):
        shard = copy.deepcopy(whole)
        shard_columns_(shard, index, keep_bias=p == 0)
        assert shard.in_features == 96 // parts and (shard.bias is not None) == (p == 0)
        fast += run(shard, x[:, index], "auto")  # the CPU kernel where the shard allows it
        assert shard._kernels["kernel"][0] == kernels[p]
        exact += run(shard, x[:, index], "reference")
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, want, rtol=5e-2, atol=5e-2)  # bf16 activations


@pytest.mark.parametrize("cls", [W8A8Linear, Int8OutlierLinear])
def test_w8a8_column_shards_use_the_global_token_scale(cls: type[W8A8Linear]) -> None:
    torch.manual_seed(0)
    whole = cls.from_linear(torch.nn.Linear(64, 32))
    if cls is Int8OutlierLinear:
        whole.threshold = 1.5
    x = torch.randn(5, 64)
    x[:, 3] *= 20  # one column dominates the token scales (and is an outlier for LLM.int8())
    want = whole(x)
    outlier = cls is Int8OutlierLinear
    mask = (x.abs() > whole.threshold).any(0) if outlier else torch.zeros(64, dtype=torch.bool)
    amax = x.masked_fill(mask, 0).abs().amax(-1, keepdim=True)  # what every rank's reduce returns
    total = torch.zeros_like(want)
    for p, index in enumerate(pieces(64, 2)):
        shard = copy.deepcopy(whole)
        shard_columns_(shard, index, keep_bias=p == 0, amax_reduce=lambda local: torch.maximum(local, amax))
        total += shard(x[:, index])
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    rows = []
    for index in pieces(32, 4):
        shard = copy.deepcopy(whole)
        shard_rows_(shard, index)
        rows.append(shard(x))
    torch.testing.assert_close(torch.cat(rows, -1), want, rtol=1e-6, atol=1e-6)
