"""Group-wise quantization arithmetic."""

from __future__ import annotations

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.quant.primitives import (
    check_scheme,
    default_g_idx,
    dequantize_weight,
    group_params,
    quantize_weight,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_error_is_within_half_a_step(bits: int, group_size: int, sym: bool) -> None:
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(48, 160) * torch.rand(48, 1) * 3  # K=160: a partial last group for 64 and 128
    scales, zeros = group_params(w, bits, group_size, sym)
    g_idx = default_g_idx(160, group_size)
    codes = quantize_weight(w, scales, zeros, bits, g_idx)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert scales.shape == zeros.shape == (48, 1 if group_size == -1 else -(-160 // group_size))
    what = dequantize_weight(codes, scales, zeros, g_idx)
    # contiguous groups: the broadcast path (no gather) gives the same weights, in bf16 too
    assert torch.equal(dequantize_weight(codes, scales, zeros, None, group_size=group_size), what)
    s16 = scales.to(torch.bfloat16)
    assert torch.equal(dequantize_weight(codes, s16, zeros, None, torch.bfloat16, group_size),
                       dequantize_weight(codes, s16, zeros, g_idx).to(torch.bfloat16))
    step = scales[:, g_idx.long()]
    # symmetric codes lose one level at the top (z = 2^(b-1)): the max may clip by one step
    slack = 1.0 if sym else 0.5
    assert bool(((w - what).abs() <= step * slack + 1e-6).all())
    if bits == 8:
        sqnr = 10 * torch.log10(w.pow(2).mean() / (w - what).pow(2).mean())
        assert sqnr > 35


def test_symmetric_zero_is_the_midpoint_and_empty_groups_are_safe() -> None:
    w = torch.zeros(2, 32)
    w[0] = torch.linspace(-1, 1, 32)
    s, z = group_params(w, 4, 32, sym=True)
    assert z.flatten().tolist() == [8.0, 8.0] and bool((s > 0).all())
    codes = quantize_weight(w, s, z, 4, default_g_idx(32, 32))
    assert bool((codes[1] == 8).all())  # an all-zero row dequantizes to exactly 0


@pytest.mark.parametrize(("bits", "group"), [(5, 128), (4, 48), (16, -1), (4, 0)])
def test_unsupported_schemes_are_refused(bits: int, group: int) -> None:
    with pytest.raises(LeanLMError, match="unsupported"):
        check_scheme(bits, group)
