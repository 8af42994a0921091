"""The C++ CPU RMSNorm and rotary ops against their torch references, and where they run."""

from __future__ import annotations

import pytest
import torch

from leanlm import kernels
from leanlm.kernels import cpu_ops, rmsnorm, rotary

pytestmark = pytest.mark.skipif(cpu_ops.ops() is None, reason="the C++ ops cannot be built here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 320), (2, 5, 100)])
def test_rms_norm_matches_the_reference(dtype: torch.dtype, with_residual: bool, shape: tuple) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x, r = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(shape[-1], generator=g).to(dtype)
    residual = r if with_residual else None
    y, s = cpu_ops.rms_norm(x, w, 1e-6, residual)
    want_y, want_s = rmsnorm.reference(x, w, 1e-6, residual)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(s, want_s)  # the residual sum is rounded as torch adds
    if dtype == torch.float32:  # the mean's summation order differs: fp32 rounding apart
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    else:  # the fp32 mean then rounds to 8 or 11 bits: the same values but for a rare last bit
        assert (y != want_y).float().mean() < 0.01
        torch.testing.assert_close(y.float(), want_y.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "heads", "seq", "d", "cos_batch"), [(1, 5, 1, 64, 1), (2, 3, 9, 32, 2),
                                                                    (3, 4, 6, 128, 1)])
def test_rotary_equals_the_reference_bit_for_bit(dtype: torch.dtype, b: int, heads: int, seq: int,
                                                 d: int, cos_batch: int) -> None:
    g = torch.Generator().manual_seed(d + seq)
    x = torch.randn(b, seq, heads, d, generator=g).to(dtype).transpose(1, 2)  # as projections make it
    cos, sin = (torch.randn(cos_batch, 1, seq, d, generator=g).to(dtype) for _ in range(2))
    out = cpu_ops.rotary(x, cos, sin)
    assert torch.equal(out, rotary.reference(x, cos, sin))
    assert torch.equal(cpu_ops.rotary(x.contiguous(), cos, sin), out)  # any strides in


def test_runs_only_where_it_can() -> None:
    x, w = torch.randn(2, 8), torch.ones(8)
    assert cpu_ops.runs(x, w)
    assert not cpu_ops.runs(x, w.bfloat16())  # mixed dtypes: the reference
    assert not cpu_ops.runs(x.double(), w.double())
    assert not cpu_ops.runs(x, w.requires_grad_())  # autograd through the weight: the reference
    with kernels.kernel_mode("reference"):
        assert not cpu_ops.runs(x, torch.ones(8))


def test_the_ops_refuse_bad_arguments() -> None:
    with pytest.raises(RuntimeError, match="x and weight must share a dtype"):
        cpu_ops.ops().rms_norm(torch.randn(2, 8), None, torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="cos/sin"):
        cpu_ops.ops().rotary(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))
