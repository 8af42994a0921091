"""Fused SiLU·mul kernel against its fp64 reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import silu_mul


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (7, 2 * 1100)])  # 1100 > BLOCK: two programs
def test_matches_fp64_reference_and_writes_every_element(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(shape[-1])
    h = torch.randn(shape, generator=g) * 4
    out = poisoned((*shape[:-1], shape[-1] // 2))
    y = silu_mul.silu_mul(h, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, silu_mul.reference(h.double())) < 1e-6


def test_strided_rows_and_the_torch_path_in_fp32() -> None:
    h = torch.randn(6, 128)[:, :48]  # rows with a stride of 128
    y = silu_mul.silu_mul(h)
    assert y.shape == (6, 24)
    # fp32 throughout: the kernel's exp and torch's differ in the last bits only
    torch.testing.assert_close(y, silu_mul.reference(h), rtol=1e-6, atol=1e-6)


def test_launcher_rejects_bad_arguments() -> None:
    with pytest.raises(LeanLMError, match="must be even"):
        silu_mul.silu_mul(torch.randn(4, 7))
    with pytest.raises(LeanLMError, match="unit stride"):
        silu_mul.silu_mul(torch.randn(16, 4).t())
    with pytest.raises(LeanLMError, match="out must be"):
        silu_mul.silu_mul(torch.randn(4, 8), out=torch.empty(4, 8))
