"""int8 activations on VNNI: the packing, the reference's meaning, the C++ op against it, and
QuantLinear's switch."""

from __future__ import annotations

import pytest
import torch

from leanlm import kernels
from leanlm.kernels import cpu_vnni
from leanlm.kernels.packing import unpack_codes

needs_vnni = pytest.mark.skipif(not cpu_vnni.available(), reason="needs AVX512-VNNI and leanlm's C++ ops")


def layer(n: int, k: int, gs: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [n, k], (s, m) pairs [k/gs, n, 2] bf16, the dequantized weight (q − h)·s + m [n, k])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    sz = torch.stack([torch.rand(k // gs, n, generator=g) * 0.1 / 2 ** (bits - 4) + 0.001,
                      torch.randn(k // gs, n, generator=g) * 0.05], -1).to(torch.bfloat16).contiguous()
    per_col = sz.float().repeat_interleave(gs, 0).transpose(0, 1)  # [n, k, 2]
    return codes, sz, (codes.float() - 2 ** (bits - 1)) * per_col[..., 0] + per_col[..., 1]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trips_and_puts_four_columns_in_a_lane(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (128, 48), dtype=torch.uint8, generator=g)
    packed = cpu_vnni.pack(codes, bits)
    assert packed.shape == (128, 48 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(cpu_vnni.unpack(packed, 128, 48, bits), codes)
    # block 1, octet 2, line 3, lane 5: row 64 + 48 + 5, columns 16..19 (first quad), 20..23 (second)
    row, flat = 64 + 48 + 5, packed.view(-1)
    if bits == 4:
        line = flat[((1 * 6 + 2) * 4 + 3) * 64:][20:24]
        first, second = line & 15, line >> 4
    else:
        octet = flat[(1 * 6 + 2) * 512:]
        first, second = octet[3 * 64 + 20:][:4], octet[256 + 3 * 64 + 20:][:4]
    assert torch.equal(first, codes[row, 16:20]) and torch.equal(second, codes[row, 20:24])


@pytest.mark.parametrize(("gs", "bits"), [(32, 4), (128, 4), (32, 8), (256, 8)])
def test_reference_is_the_product_up_to_the_activations_rounding(gs: int, bits: int) -> None:
    """Each group's x is off by at most half its scale a after rounding, so the reference is
    within Σ_k |q_k s| a/2 (+ bf16's rounding) of x·w; a wrong group or scale is far outside."""
    codes, sz, w = layer(128, 256, gs, bits, seed=gs)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = cpu_vnni.reference(x, codes, sz, gs, bits).float()
    _, a = cpu_vnni.quantize_activations(x, gs)  # [m, G, 1]
    qs = (codes.float().view(128, -1, gs) * sz[..., 0].float().t()[..., None]).abs().sum(-1)  # [n, G]
    bound = (a[..., 0] / 2) @ qs.t() + 2.0**-8 * (x.float().abs() @ w.abs().t()) + 1e-6
    assert bool(((y - x.float() @ w.t()).abs() <= bound).all())
    assert float((y - x.float() @ w.t()).abs().max()) > 0  # it does round


@needs_vnni
@pytest.mark.parametrize(("n", "k", "gs"), [(64, 64, 32), (192, 256, 64), (128, 384, 128), (320, 320, 32),
                                           (64, 96, 32), (64, 320, 320)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_mm_is_the_reference(n: int, k: int, gs: int, m: int, bits: int) -> None:
    """The integer dots are exact and x̂ the same, so only fp32's order of sums and the output's
    rounding to bf16 differ: 2⁻⁸ of the output's size (a wrong nibble or row is off by far more)."""
    codes, sz, w = layer(n, k, gs, bits, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = cpu_vnni.mm(x, cpu_vnni.pack(codes, bits), cpu_vnni.block_scales(sz), gs, bits)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want = cpu_vnni.reference(x, codes, sz, gs, bits).float()
    bound = 2.0**-8 * (x.float().abs() @ w.abs().t()) + 1e-6
    assert bool(((y.float() - want).abs() <= bound).all()), float(((y.float() - want).abs() / bound).max())


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_mm_rows_do_not_depend_on_the_batch(bits: int) -> None:
    codes, sz, _ = layer(128, 256, 32, bits, seed=0)
    packed, szb = cpu_vnni.pack(codes, bits), cpu_vnni.block_scales(sz)
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = cpu_vnni.mm(x, packed, szb, 32, bits)
    for r in (0, 4, 12):
        assert torch.equal(cpu_vnni.mm(x[r:r + 1], packed, szb, 32, bits)[0], whole[r])


@needs_vnni
def test_vnni_mm_refuses_what_it_cannot_read() -> None:
    codes, sz, _ = layer(64, 64, 32, 4, seed=0)
    packed, szb = cpu_vnni.pack(codes, 4), cpu_vnni.block_scales(sz)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_vnni.mm(x, packed[:32], szb, 32, 4)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_vnni.mm(x.float(), packed, szb, 32, 4)
    with pytest.raises(RuntimeError, match="sz must be"):
        cpu_vnni.mm(x, packed, sz, 32, 4)  # [G, N, 2], not block-major
    with pytest.raises(RuntimeError, match="group size"):
        cpu_vnni.mm(x, packed, szb, 12, 4)
    with pytest.raises(RuntimeError, match="K·bits/8"):
        cpu_vnni.mm(x, packed, szb, 32, 8)  # a 4-bit packing read as 8 bits
    with pytest.raises(RuntimeError, match="bits must be"):
        cpu_vnni.mm(x, packed, szb, 32, 3)


def rtn_layer(bits: int = 4, gs: int = 64, n: int = 192, k: int = 256):
    from leanlm.quant import RTNConfig
    from leanlm.quant.rtn import rtn_quantize, to_quant_linear

    linear = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    config = RTNConfig(bits, gs, sym=False)
    quant = to_quant_linear(linear, *rtn_quantize(linear.weight, config), config)
    quant.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return quant


@needs_vnni
@pytest.mark.parametrize(("bits", "gs"), [(4, 64), (8, -1), (8, 128)])
def test_quant_linear_takes_vnni_only_when_asked(monkeypatch: pytest.MonkeyPatch, bits: int, gs: int) -> None:
    """Off by default; on, every row count of a bf16 input runs the VNNI kernel, whose result is
    the reference's (a per-channel weight's activations rounded per 128 columns, not per row);
    the packing becomes the one copy of the codes, and the state dict keeps them."""
    torch.manual_seed(0)
    quant = rtn_layer(bits, gs)
    codes = quant.codes().clone()
    group = 128 if gs == -1 else gs  # per channel: the activations rounded per 128 columns all the same
    s = quant.scales.float()
    sz = torch.stack([s, (2 ** (bits - 1) - quant.zeros.float()) * s], -1).transpose(0, 1).to(torch.bfloat16)
    sz = sz.repeat(256 // group // sz.shape[0], 1, 1)  # a per-channel (s, m) for each group
    calls = []
    real = cpu_vnni.mm
    monkeypatch.setattr(cpu_vnni, "mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        x = torch.randn(3, 256).to(torch.bfloat16)
        off = quant(x)
        assert calls == []
        with kernels.quantizing_activations(True):
            for m in (1, 3, 8, 40):
                xm = torch.randn(m, 256).to(torch.bfloat16)
                want = cpu_vnni.reference(xm, codes, sz, group, bits).float() + quant.bias.float()
                torch.testing.assert_close(quant(xm).float(), want, rtol=0.01, atol=0.01)
            on = quant(x)
        assert calls == [1, 3, 8, 40, 3]
        assert quant.qweight.numel() == 0 and torch.equal(quant.codes(), codes)
        assert not torch.equal(on, off) and torch.equal(quant(x), off)  # off again: bf16 activations
    assert torch.equal(unpack_codes(quant.state_dict()["qweight"], bits, 256), codes)


@needs_vnni
def test_a_forced_vnni_backend_runs_and_explains_where_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    quant = rtn_layer()
    quant.backend = "vnni"
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.inference_mode():
        y = quant(x)
    want = x.float() @ quant.dequantize(torch.float32).t() + quant.bias.float()
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    assert "3 bits" in rtn_layer(bits=3).kernel_problem("vnni")
    monkeypatch.setattr(cpu_vnni, "available", lambda: False)
    assert "AVX512-VNNI" in rtn_layer().kernel_problem("vnni")


@needs_vnni
def test_act_order_groups_gather_the_input() -> None:
    """GPTQ's act-order: columns belong to groups in a permuted order (g_idx); the packing sorts
    them by group and the input is gathered to match, so the product is still x·ŵᵀ."""
    from leanlm.quant.linear import QuantLinear

    g = torch.Generator().manual_seed(3)
    n, k, gs = 128, 256, 32
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // gs, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (n, k // gs), generator=g, dtype=torch.uint8)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)].int()
    quant = QuantLinear.from_codes(codes, scales, zeros, g_idx, 4, gs)
    x = torch.randn(5, k, generator=g).to(torch.bfloat16)
    want = x.float() @ quant.dequantize(torch.float32).t()
    with torch.inference_mode(), kernels.quantizing_activations(True):
        y = quant(x)
    assert "vnni" in quant._kernels and quant._kernels["vnni"][2] is not None  # packed with a permutation
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    assert torch.equal(quant.codes(), codes)
