"""oneDNN's int8 x int8 GEMM (VNNI/AMX) against the integer product, and W8A8Linear on it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from leanlm import kernels
from leanlm.kernels import cpu_int8
from leanlm.quant.linear import W8A8Linear

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="no oneDNN quantized linear in this torch")


@pytest.mark.parametrize("m,k,n", [(1, 96, 160), (3, 320, 200), (17, 864, 64), (64, 2048, 512)])
def test_int8_mm_is_the_exact_integer_product(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m + k + n)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g)
    y = cpu_int8.int8_mm(xq, cpu_int8.pack(w8), scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, cpu_int8.reference(xq, w8, scale), rtol=1e-6, atol=0)


def test_w8a8_linear_runs_onednn_on_cpu_and_matches_int_mm() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(320, 200, bias=True)
    layer = W8A8Linear.from_linear(dense)
    x = torch.randn(5, 7, 320)
    y = layer(x)
    assert layer._packed is not None  # the oneDNN path ran
    with kernels.prepacking(False):  # torch._int_mm
        expected = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, dense(x), rtol=0.05, atol=0.05)  # W8A8 is close to the float layer
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._packed is None
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.mul_(-1)  # a changed weight is packed again
    torch.testing.assert_close(layer(x) - layer.bias, -(y - layer.bias), rtol=1e-5, atol=1e-5)
