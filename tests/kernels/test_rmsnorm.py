"""Fused residual-add + RMSNorm kernel against its fp64 reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import rmsnorm


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (7, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_fp64_reference_and_writes_every_element(shape: tuple[int, ...], with_residual: bool) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    r = torch.randn(shape, generator=g) if with_residual else None
    out = poisoned(shape)
    y, s = rmsnorm.rms_norm(x, w, 1e-6, r, out=out)
    assert y.data_ptr() == out.data_ptr()
    ry, rs = rmsnorm.reference(x.double(), w.double(), 1e-6, None if r is None else r.double())
    assert rel_err(y, ry) < 1e-3
    assert rel_err(s, rs) < 1e-6


def test_strided_rows_and_bf16() -> None:
    x = torch.randn(6, 128)[:, :48]  # rows with a stride of 128
    w = torch.rand(48) + 0.5
    y, _ = rmsnorm.rms_norm(x, w, 1e-5)
    assert rel_err(y, rmsnorm.reference(x.double(), w.double(), 1e-5)[0]) < 1e-3
    xb, wb = x.bfloat16(), w.bfloat16()
    yb, _ = rmsnorm.rms_norm(xb, wb, 1e-5)
    assert yb.dtype == torch.bfloat16
    # the interpreter upcasts bf16 math, so compare loosely against the module's own bf16 result
    assert torch.allclose(yb.float(), rmsnorm.reference(xb, wb, 1e-5)[0].float(), rtol=2e-2, atol=2e-2)


def test_launcher_rejects_bad_arguments() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(LeanLMError, match="weight has 8 elements"):
        rmsnorm.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(LeanLMError, match="residual must match"):
        rmsnorm.rms_norm(x, torch.ones(16), 1e-6, torch.randn(4, 8))
    with pytest.raises(LeanLMError, match="unit stride"):
        rmsnorm.rms_norm(torch.randn(16, 4).t(), torch.ones(16), 1e-6)
