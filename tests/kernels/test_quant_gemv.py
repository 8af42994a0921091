"""The decode GEMV on the slice-interleaved layout against the fp64 reference on QuantLinear's own
packing (so the layout conversion is checked too)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err
from test_quant_gemm import quantized

from leanlm.errors import LeanLMError
from leanlm.kernels import quant_gemm as qg
from leanlm.kernels import quant_gemv as qv


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bits,group,k", [(4, 128, 512), (4, 32, 256), (4, 512, 768), (4, -1, 512),
                                          (8, 64, 256), (8, 256, 256), (2, 128, 1024)])
@pytest.mark.parametrize("config", [None, {"block_n": 8, "num_warps": 2, "prefetch": 1},
                                    {"block_n": 32, "num_warps": 8, "prefetch": 1, "chunks": 2},
                                    {"block_n": 16, "chunks": 4}])
def test_matches_fp64_reference(m: int, bits: int, group: int, k: int, config: dict | None) -> None:
    n = 37  # not a multiple of any BLOCK_N; (4, 512, 768): a partial last group
    w = quantized(n, k, bits, group, False, seed=m + bits + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    ref = qg.reference(x.double(), w["qweight"], w["scales"].double(), w["zeros"], w["g_idx"], bits,
                       bias.double())
    words = qv.interleave(w["qweight"], bits, k)
    y = qv.quant_gemv(x, words, w["scales"], w["zeros"], bits, group, bias, out=poisoned((m, n)),
                      config=config)
    assert rel_err(y, ref) < 1e-3
    back = qv.reference(x.double(), words, w["scales"].double(), w["zeros"], bits, group) + bias.double()
    assert rel_err(back, ref) < 1e-12  # the layout holds exactly the canonical codes


def test_bf16_activations() -> None:
    w = quantized(64, 512, 4, 128, False, seed=0)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = qg.reference(x.double(), w["qweight"], w["scales"].double(), w["zeros"], w["g_idx"], 4)
    y = qv.quant_gemv(x, qv.interleave(w["qweight"], 4, 512), w["scales"].bfloat16(), w["zeros"], 4, 128)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("k,group", [(200, 128), (512, 48), (768, 384)])
def test_unsupported_shapes_are_refused(k: int, group: int) -> None:
    """K not a whole number of chunks, a group not a multiple of 32, a group straddling chunks."""
    assert not qv.supports(k, 4, group)
    w = quantized(8, k, 4, group, False, seed=0)
    with pytest.raises(LeanLMError, match="quant_gemv needs"):
        qv.quant_gemv(torch.randn(1, k), torch.zeros(8, k // 8, dtype=torch.int32), w["scales"], w["zeros"],
                      4, group)
