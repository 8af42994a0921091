"""Weight-only quantized GEMM kernel against the fp64 reference, on QuantLinear's own layout."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import quant_gemm as qg
from leanlm.kernels.packing import pack_codes, pad_codes
from leanlm.quant.primitives import default_g_idx, num_groups


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


def _check_gemv(m: int, n: int, k: int, bits: int, group: int, act_order: bool, seed: int = 0,
                split_k: int | None = None, config: dict | None = None, bias: bool = True) -> None:
    w = quantized(n, k, bits, group, act_order, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7))
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 8)) if bias else None
    ref = qg.reference(x.double(), w["qweight"], w["scales"].double(), w["zeros"], w["g_idx"], bits,
                       None if b is None else b.double())
    y = qg.quant_gemm(x, w["qweight"], w["scales"], w["zeros"], w["g_idx"] if act_order else None, bits,
                      group, b, out=poisoned((m, n)), split_k=split_k, config=config)
    assert rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bits,group,act_order", [(4, 128, False), (4, 64, True), (4, -1, False),
                                                  (8, 32, False), (8, 64, True), (2, 64, False),
                                                  (2, 32, True)])
def test_gemv_matches_fp64_reference(m: int, split_k: int, bits: int, group: int, act_order: bool) -> None:
    # N = 37 is not a multiple of any BLOCK_N; K = 320 ends in a partial group of 64 or 128
    _check_gemv(m, 37, 320, bits, group, act_order, seed=bits + m, split_k=split_k)


@pytest.mark.parametrize("config", [dict(block_n=16, block_k=32), dict(block_n=32, block_k=64, num_warps=2),
                                    dict(block_n=64, block_k=128, split_k=2, num_stages=2),
                                    dict(block_n=8, block_k=256),  # 4 whole groups per K-tile
                                    dict(block_n=16, block_k=512, split_k=1),
                                    dict(block_n=16, block_k=64),  # K = 448: no K mask
                                    dict(block_n=16, block_k=64, prefetch=False),
                                    dict(block_n=32, block_k=128, split_k=2, prefetch=False)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemv_config_overrides(config: dict, bits: int) -> None:
    _check_gemv(1, 45, 448, bits, 64, False, seed=bits, config=config)
    _check_gemv(3, 45, 448, bits, 64, True, seed=bits, config=config)


@pytest.mark.parametrize("bits,k", [(4, 198), (2, 200), (8, 202)])  # rows of 99, 50, 202 bytes
def test_gemv_byte_rows_fall_back_from_int32_words(bits: int, k: int) -> None:
    w = quantized(8, k, bits, 32, False, seed=0)
    assert qg._words(w["qweight"]).dtype == torch.uint8
    _check_gemv(1, 40, k, bits, 32, False, seed=bits)
    _check_gemv(2, 40, k, bits, 32, True, seed=bits, split_k=2)
    _check_gemv(1, 40, k, bits, -1, False, seed=bits, config=dict(block_k=64))


def test_gemv_unaligned_qweight_storage_reads_bytes() -> None:
    w = quantized(24, 256, 4, 64, False, seed=3)
    base = torch.zeros(24, 129, dtype=torch.uint8)
    base[:, 1:] = w["qweight"]
    shifted = base[:, 1:]  # a storage offset of one byte: no int32 view
    assert qg._words(w["qweight"]).dtype == torch.int32 and qg._words(shifted).dtype == torch.uint8
    x = torch.randn(1, 256)
    args = (w["scales"], w["zeros"], None, 4, 64)
    assert torch.allclose(qg.quant_gemm(x, shifted, *args), qg.quant_gemm(x, w["qweight"], *args),
                          rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group,block_k,expected", [(128, 64, (0, 1)), (64, 256, (0, 4)), (-1, 512, (0, 1)),
                                                    (48, 64, (1, 1)), (4, 64, (1, 1))])
def test_group_modes(group: int, block_k: int, expected: tuple[int, int]) -> None:
    assert qg._group_mode(False, group, 4096, block_k, 8) == expected
    assert qg._group_mode(True, group, 4096, block_k, 8) == (2, 1)


@pytest.mark.parametrize("group,config", [(48, None), (48, dict(block_k=64)), (4, dict(block_k=32))])
def test_gemv_groups_not_aligned_to_tiles(group: int, config: dict | None) -> None:
    _check_gemv(1, 33, 240, 4, group, False, seed=group, config=config)
    _check_gemv(3, 33, 240, 2, group, False, seed=group, config=config, split_k=2)


def test_gemv_bf16_and_no_bias() -> None:
    w = quantized(40, 384, 4, 128, False, seed=5)
    x = torch.randn(1, 384)
    y = qg.quant_gemm(x.bfloat16(), w["qweight"], w["scales"].bfloat16(), w["zeros"], None, 4, 128,
                      out=poisoned((1, 40), torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = qg.reference(x.double(), w["qweight"], w["scales"].bfloat16().double(), w["zeros"], w["g_idx"], 4)
    assert rel_err(y.float(), ref) < 2e-2
    _check_gemv(1, 40, 384, 4, 128, False, seed=5, bias=False)


class _Launches:
    def __init__(self, kernel: object, name: str, seen: list[str]) -> None:
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        self.seen.append(self.name)
        return self.kernel[grid]


def test_dispatch_picks_gemv_for_decode_and_dot_for_larger_m(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(qg, "_gemv_kernel", _Launches(qg._gemv_kernel, "gemv", seen))
    monkeypatch.setattr(qg, "_quant_gemm_kernel", _Launches(qg._quant_gemm_kernel, "dot", seen))
    w = quantized(32, 128, 4, 64, False, seed=4)
    args = (w["qweight"], w["scales"], w["zeros"], None, 4, 64)
    for m in (1, qg.GEMV_MAX_M, qg.GEMV_MAX_M + 1, 16):
        qg.quant_gemm(torch.randn(m, 128), *args)
    qg.quant_gemm(torch.randn(16, 128), *args, config=dict(kernel="gemv"))
    qg.quant_gemm(torch.randn(1, 128), *args, config=dict(kernel="dot", block_n=32))
    assert seen == ["gemv", "gemv", "dot", "dot", "gemv", "dot"]
    assert qg._path(1) == "gemv" and qg._path(16) == "dot"


def test_gemv_config_heuristic() -> None:
    cpu = torch.device("cpu")
    block_n, block_k, split, warps = qg._gemv_config(1, 11008, 4096, 128, cpu, 4)
    assert block_k == 512 and split == 1 and warps == 4 and block_n in (16, 32, 64)
    assert qg._gemv_config(1, 11008, 4096, 48, cpu, 4)[1] == 32
    assert qg._gemv_config(1, 64, 4096, 128, cpu, 4)[2] > 1  # few N-tiles: split K


def test_config_rejects_bad_keys_and_tiles() -> None:
    w = quantized(32, 64, 4, 32, False, seed=0)
    args = (w["qweight"], w["scales"], w["zeros"], None, 4, 32)
    with pytest.raises(LeanLMError, match="config keys must be among"):
        qg.quant_gemm(torch.randn(1, 64), *args, config=dict(blockn=32))
    with pytest.raises(LeanLMError, match="block_k must be a power of 2"):
        qg.quant_gemm(torch.randn(1, 64), *args, config=dict(block_k=48))
    with pytest.raises(LeanLMError, match="config kernel must be"):
        qg.quant_gemm(torch.randn(1, 64), *args, config=dict(kernel="mma"))
    with pytest.raises(LeanLMError, match="dot kernel needs"):
        qg.quant_gemm(torch.randn(20, 64), *args, config=dict(block_k=64))
