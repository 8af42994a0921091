"""Weight-only quantized GEMM kernel against the fp64 reference, on QuantLinear's own layout."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import quant_gemm as qg
from leanlm.quant.primitives import default_g_idx, num_groups, pack_codes, pad_codes


def quantized(n: int, k: int, bits: int, group: int, act_order: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    groups = num_groups(k, group)
    g_idx = default_g_idx(k, group)
    if act_order:  # GPTQ desc_act: groups decided along a permutation of the columns
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return dict(qweight=pack_codes(pad_codes(codes, bits), bits),
                scales=torch.rand(n, groups, generator=g) * 0.1 + 0.01,
                zeros=torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8),
                g_idx=g_idx, bits=bits, group_size=group)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("bits,group,act_order", [(4, 128, False), (4, 32, True), (4, -1, False),
                                                  (8, 64, False), (2, 32, True)])
def test_matches_fp64_reference(m: int, bits: int, group: int, act_order: bool) -> None:
    n, k = 96, 200  # k is not a multiple of the group: a partial last group
    w = quantized(n, k, bits, group, act_order, seed=m + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    ref = qg.reference(x.double(), w["qweight"], w["scales"].double(), w["zeros"], w["g_idx"], bits,
                       bias.double())
    g_idx = w["g_idx"] if act_order else None
    y = qg.quant_gemm(x, w["qweight"], w["scales"], w["zeros"], g_idx, bits, group, bias,
                      out=poisoned((m, n)), split_k=1)
    assert rel_err(y, ref) < 1e-3
    split = qg.quant_gemm(x, w["qweight"], w["scales"], w["zeros"], g_idx, bits, group, bias,
                          out=poisoned((m, n)), split_k=2)  # fp32 atomics across the K split
    assert rel_err(split, ref) < 1e-3


def test_in_kernel_g_idx_equals_contiguous_path_for_default_groups() -> None:
    w = quantized(64, 256, 4, 64, False, seed=1)
    x = torch.randn(3, 256)
    args = (w["qweight"], w["scales"], w["zeros"])
    a = qg.quant_gemm(x, *args, None, 4, 64)
    b = qg.quant_gemm(x, *args, w["g_idx"], 4, 64)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_activations() -> None:
    w = quantized(64, 128, 4, 64, False, seed=2)
    x = torch.randn(2, 128)
    y = qg.quant_gemm(x.bfloat16(), w["qweight"], w["scales"].bfloat16(), w["zeros"], None, 4, 64)
    assert y.dtype == torch.bfloat16
    ref = qg.reference(x.double(), w["qweight"], w["scales"].bfloat16().double(), w["zeros"], w["g_idx"], 4)
    assert rel_err(y.float(), ref) < 2e-2


def test_launcher_rejects_bad_arguments() -> None:
    w = quantized(32, 64, 4, 32, False, seed=0)
    args = (w["qweight"], w["scales"], w["zeros"], None)
    with pytest.raises(LeanLMError, match="runs \\(2, 4, 8\\)-bit codes, got 3"):
        qg.quant_gemm(torch.randn(1, 64), *args, 3, 32)
    with pytest.raises(LeanLMError, match="qweight must be \\[N, 48\\] bytes for K=96"):
        qg.quant_gemm(torch.randn(1, 96), *args, 4, 32)
    with pytest.raises(LeanLMError, match="scales and zeros must be \\[32, 4\\]"):
        qg.quant_gemm(torch.randn(1, 64), *args, 4, 16)
