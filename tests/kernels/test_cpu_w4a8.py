"""W4A8 on VNNI: the packing, the reference's meaning, the C++ op against it, and QuantLinear's switch."""

from __future__ import annotations

import pytest
import torch

from leanlm import kernels
from leanlm.kernels import cpu_w4a8
from leanlm.kernels.packing import unpack_codes

needs_vnni = pytest.mark.skipif(not cpu_w4a8.available(), reason="needs AVX512-VNNI and leanlm's C++ ops")


def w4_layer(n: int, k: int, gs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [n, k], torch's (s, m) pairs [k/gs, n, 2] bf16, the dequantized weight [n, k] fp32)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sz = torch.stack([torch.rand(k // gs, n, generator=g) * 0.1 + 0.01,
                      torch.randn(k // gs, n, generator=g) * 0.05], -1).to(torch.bfloat16).contiguous()
    per_col = sz.float().repeat_interleave(gs, 0).transpose(0, 1)  # [n, k, 2]
    return codes, sz, (codes.float() - 8) * per_col[..., 0] + per_col[..., 1]


def test_pack_round_trips_and_puts_four_columns_in_a_lane() -> None:
    codes = torch.randint(0, 16, (128, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = cpu_w4a8.pack(codes)
    assert packed.shape == (128, 24) and packed.dtype == torch.uint8
    assert torch.equal(cpu_w4a8.unpack(packed, 128, 48), codes)
    # block 1, octet 2, line 3, lane 5: row 64 + 48 + 5, columns 16..19 (low) and 20..23 (high)
    line = packed.view(-1)[((1 * 6 + 2) * 4 + 3) * 64:][:64]
    row = 64 + 48 + 5
    assert torch.equal(line[20:24] & 15, codes[row, 16:20])
    assert torch.equal(line[20:24] >> 4, codes[row, 20:24])


@pytest.mark.parametrize("gs", [32, 128])
def test_reference_is_the_product_up_to_the_activations_rounding(gs: int) -> None:
    """Each group's x is off by at most half its scale a after rounding, so the reference is
    within Σ_k |q_k s| a/2 (+ bf16's rounding) of x·w; a wrong group or scale is far outside."""
    codes, sz, w = w4_layer(128, 256, gs, seed=gs)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = cpu_w4a8.reference(x, codes, sz, gs).float()
    _, a = cpu_w4a8.quantize_activations(x, gs)  # [m, G, 1]
    qs = (codes.float().view(128, -1, gs) * sz[..., 0].float().t()[..., None]).abs().sum(-1)  # [n, G]
    bound = (a[..., 0] / 2) @ qs.t() + 2.0**-8 * (x.float().abs() @ w.abs().t()) + 1e-6
    assert bool(((y - x.float() @ w.t()).abs() <= bound).all())
    assert float((y - x.float() @ w.t()).abs().max()) > 0  # it does round


@needs_vnni
@pytest.mark.parametrize(("n", "k", "gs"),
                         [(64, 64, 32), (192, 256, 64), (128, 384, 128), (320, 320, 32), (64, 96, 32)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 33])
def test_w4a8_mm_is_the_reference(n: int, k: int, gs: int, m: int) -> None:
    """The integer dots are exact and x̂ the same, so only fp32's order of sums and the output's
    rounding to bf16 differ: 2⁻⁸ of the output's size (a wrong nibble or row is off by far more)."""
    codes, sz, w = w4_layer(n, k, gs, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = cpu_w4a8.mm(x, cpu_w4a8.pack(codes), cpu_w4a8.block_scales(sz), gs)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want = cpu_w4a8.reference(x, codes, sz, gs).float()
    bound = 2.0**-8 * (x.float().abs() @ w.abs().t()) + 1e-6
    assert bool(((y.float() - want).abs() <= bound).all()), float(((y.float() - want).abs() / bound).max())


@needs_vnni
def test_w4a8_mm_rows_do_not_depend_on_the_batch() -> None:
    codes, sz, _ = w4_layer(128, 256, 32, seed=0)
    packed, szb = cpu_w4a8.pack(codes), cpu_w4a8.block_scales(sz)
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = cpu_w4a8.mm(x, packed, szb, 32)
    for r in (0, 4, 12):
        assert torch.equal(cpu_w4a8.mm(x[r:r + 1], packed, szb, 32)[0], whole[r])


@needs_vnni
def test_w4a8_mm_refuses_what_it_cannot_read() -> None:
    codes, sz, _ = w4_layer(64, 64, 32, seed=0)
    packed, szb = cpu_w4a8.pack(codes), cpu_w4a8.block_scales(sz)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_w4a8.mm(x, packed[:32], szb, 32)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_w4a8.mm(x.float(), packed, szb, 32)
    with pytest.raises(RuntimeError, match="sz must be"):
        cpu_w4a8.mm(x, packed, sz, 32)  # torch's [G, N, 2], not block-major
    with pytest.raises(RuntimeError, match="group size"):
        cpu_w4a8.mm(x, packed, szb, 12)


def rtn_layer(n: int = 192, k: int = 256, gs: int = 64):
    from leanlm.quant import RTNConfig
    from leanlm.quant.rtn import rtn_quantize, to_quant_linear

    linear = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    config = RTNConfig(4, gs, sym=False)
    layer = to_quant_linear(linear, *rtn_quantize(linear.weight, config), config)
    layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


@needs_vnni
def test_quant_linear_takes_w4a8_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default; on, every row count of a bf16 input runs the VNNI kernel, whose result is
    the reference's; the packing becomes the one copy of the codes, and the state dict keeps them."""
    torch.manual_seed(0)
    layer = rtn_layer()
    codes = layer.codes().clone()
    calls = []
    real = cpu_w4a8.mm
    monkeypatch.setattr(cpu_w4a8, "mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        x = torch.randn(3, 256).to(torch.bfloat16)
        off = layer(x)
        assert calls == []
        with kernels.w4a8_activations(True):
            for m in (1, 3, 8, 40):
                xm = torch.randn(m, 256).to(torch.bfloat16)
                sz = torch.stack([layer.scales.float(), (8 - layer.zeros.float()) * layer.scales.float()], -1)
                want = cpu_w4a8.reference(xm, codes, sz.transpose(0, 1).to(torch.bfloat16), 64).float()
                torch.testing.assert_close(layer(xm).float(), want + layer.bias.float(), rtol=0.01, atol=0.01)
            on = layer(x)
        assert calls == [1, 3, 8, 40, 3]
        assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes)
        assert not torch.equal(on, off) and torch.equal(layer(x), off)  # off again: bf16 activations
    assert torch.equal(unpack_codes(layer.state_dict()["qweight"], 4, 256), codes)


@needs_vnni
def test_a_forced_w4a8_backend_runs_and_explains_where_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = rtn_layer()
    layer.backend = "w4a8"
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    want = x.float() @ layer.dequantize(torch.float32).t() + layer.bias.float()
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    monkeypatch.setattr(cpu_w4a8, "available", lambda: False)
    assert "AVX512-VNNI" in rtn_layer().kernel_problem("w4a8")
