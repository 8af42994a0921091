"""The C++ CPU ops (RMSNorm, rotary, the int4 GEMM) against their references, and where they run."""

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


def int4_layer(n: int, k: int, gs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, sz, w): random 4-bit codes in leanlm's int4pack layout, torch's (scale, offset)
    per group and output row, and the fp32 weight they mean: (q − 8)·s + offset."""
    from leanlm.quant.linear import int4pack

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    sz = torch.stack([torch.rand(k // gs, n, generator=g) * 0.1 + 0.01,
                      torch.randn(k // gs, n, generator=g) * 0.05], -1).to(torch.bfloat16).contiguous()
    per_col = sz.float().repeat_interleave(gs, 0).transpose(0, 1)  # [n, k, 2]
    return int4pack(codes), sz, (codes.float() - 8) * per_col[..., 0] + per_col[..., 1]


@pytest.mark.parametrize(("n", "k", "gs"), [(64, 64, 32), (192, 256, 64), (128, 384, 128), (320, 320, 32)])
@pytest.mark.parametrize("m", [1, 5, 12, 33])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-dot", "fp32-fma"])
def test_int4pack_mm_is_the_dequantized_product(n: int, k: int, gs: int, m: int, bf16: bool) -> None:
    """Within fp32 accumulation and the output's rounding to bf16: 2⁻⁸ of Σ|x·w| per output; a
    wrong group, row or nibble is off by the size of the output itself. Both paths: AVX512-BF16
    dot products (where the CPU has them; else the fp32 path runs) and fp32 FMAs."""
    packed, sz, w = int4_layer(n, k, gs, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = cpu_ops.ops().int4pack_mm(x, packed, sz, gs, bf16)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want = x.float() @ w.t()
    bound = 2.0**-8 * (x.float().abs() @ w.abs().t()) + 1e-6
    assert bool(((y.float() - want).abs() <= bound).all()), float(((y.float() - want).abs() / bound).max())
    torch_y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)  # the same packing's meaning
    assert bool(((y.float() - torch_y.float()).abs() <= 2 * bound).all())


def test_int4pack_mm_rows_do_not_depend_on_the_batch() -> None:
    """A request's logits must not change with what it is batched with: each row is computed in
    the same order whatever the number of rows."""
    packed, sz, _ = int4_layer(128, 256, 32, seed=0)
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = cpu_ops.int4pack_mm(x, packed, sz, 32)
    for r in (0, 6, 12):
        assert torch.equal(cpu_ops.int4pack_mm(x[r:r + 1].contiguous(), packed, sz, 32)[0], whole[r])


def test_int4pack_mm_refuses_what_it_cannot_read() -> None:
    packed, sz, _ = int4_layer(64, 64, 32, seed=0)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_ops.int4pack_mm(x, packed[:32], sz[:, :32].contiguous(), 32)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_ops.int4pack_mm(x.float(), packed, sz, 32)
    with pytest.raises(RuntimeError, match="sz must be"):
        cpu_ops.int4pack_mm(x, packed, sz[:1].contiguous(), 32)


def test_quant_linear_runs_int4pack_mm_for_batched_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """From INT4_MIN_ROWS rows an int4 layer on the CPU takes leanlm's kernel; fewer, torch's;
    both give the dequantized product."""
    from leanlm.quant import RTNConfig
    from leanlm.quant.rtn import rtn_quantize, to_quant_linear

    linear = torch.nn.Linear(256, 192, bias=False).to(torch.bfloat16)
    layer = to_quant_linear(linear, *rtn_quantize(linear.weight, RTNConfig(4, 64)), RTNConfig(4, 64))
    calls = []
    real = cpu_ops.int4pack_mm
    monkeypatch.setattr(cpu_ops, "int4pack_mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        for m in (1, cpu_ops.INT4_MIN_ROWS - 1, cpu_ops.INT4_MIN_ROWS, 40):
            x = torch.randn(m, 256).to(torch.bfloat16)
            want = x.float() @ layer.dequantize(torch.float32).t()
            torch.testing.assert_close(layer(x).float(), want, rtol=0.02, atol=0.02)
        assert calls == [cpu_ops.INT4_MIN_ROWS, 40]
        layer.backend = "int4pack"  # forced after running: torch's kernel from now on
        layer(torch.randn(40, 256).to(torch.bfloat16))
    assert calls == [cpu_ops.INT4_MIN_ROWS, 40]


@pytest.mark.parametrize(("n", "k"), [(64, 64), (160, 96), (320, 320), (200, 130)])
@pytest.mark.parametrize("m", [1, 4, 6, 7, 8, 13, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_mm_is_the_fp32_product_rounded_once(n: int, k: int, m: int, bias: bool) -> None:
    """leanlm's bf16 GEMM (64-row blocks, the last one partial where n is not a multiple of 64;
    K in 64-column slices and a remainder; register tiles of 1-6 rows, split evenly) equals the
    product of the same bf16 values in fp32, rounded once to bf16: only the fp32 summation order
    may move it, by one bf16 rounding step at most (2⁻⁸ relative, with 2⁻¹⁶ of Σ|x·w| for the
    order)."""
    from leanlm.kernels.cpu_linear import to_blocks

    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    y = cpu_ops.ops().bf16_mm(x, to_blocks(w), b, n)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    exact = x.float() @ w.float().t() + (0 if b is None else b.float())
    bound = 2.0**-8 * exact.abs() + 2.0**-16 * (x.float().abs() @ w.float().abs().t()) + 1e-6
    assert bool(((y.float() - exact).abs() <= bound).all()), float(((y.float() - exact).abs() / bound).max())
    with kernels.kernel_mode("reference"):  # the torch product on the same blocks
        ref = cpu_ops.bf16_mm(x, to_blocks(w), b, n)
    assert bool(((ref.float() - exact).abs() <= bound).all())


def test_bf16_mm_rows_do_not_depend_on_the_batch() -> None:
    from leanlm.kernels.cpu_linear import to_blocks

    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 320, generator=g).to(torch.bfloat16)
    x = torch.randn(13, 320, generator=g).to(torch.bfloat16)
    whole = cpu_ops.bf16_mm(x, to_blocks(w), None, 192)
    for r in (0, 6, 12):
        assert torch.equal(cpu_ops.bf16_mm(x[r:r + 1].contiguous(), to_blocks(w), None, 192)[0], whole[r])


def test_bf16_mm_refuses_what_it_cannot_read() -> None:
    from leanlm.kernels.cpu_linear import to_blocks

    blocks = to_blocks(torch.randn(100, 64).to(torch.bfloat16))
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="last block"):
        cpu_ops.ops().bf16_mm(x, blocks, None, 140)
    with pytest.raises(RuntimeError, match="x's K"):
        cpu_ops.ops().bf16_mm(torch.randn(2, 32).to(torch.bfloat16), blocks, None, 100)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_ops.ops().bf16_mm(x, blocks, torch.zeros(99).to(torch.bfloat16), 100)
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_ops.ops().bf16_mm(x.float(), blocks, None, 100)


@pytest.mark.parametrize("v", [1, 7, 16, 33, 8192])
def test_argmax_is_torchs_first_index_of_the_largest(v: int) -> None:
    g = torch.Generator().manual_seed(v)
    x = torch.randn(9, v, generator=g)
    x[1] = 0.5  # all equal: the first
    x[2, v // 2:] = x[2].max() + 1  # ties: the first of them
    x[3, -1] = float("inf")
    x[4] = float("-inf")
    x[5, v // 3] = float("nan")  # a NaN is larger than everything: the first NaN
    x[5, -1] = float("nan")
    x[6, -1] = float("nan")  # a NaN in the tail
    x[7, v // 2] = 1e30
    assert torch.equal(cpu_ops.argmax(x), x.argmax(-1))
    assert torch.equal(cpu_ops.argmax(x[:, ::1][1:4]), x[1:4].argmax(-1))  # row stride ≠ V
    big = torch.randn(40, 300, generator=g)[:, :257]  # strided rows, a tail of one
    assert torch.equal(cpu_ops.argmax(big), big.argmax(-1))
    with kernels.kernel_mode("reference"):  # torch's own where the op does not run
        assert torch.equal(cpu_ops.argmax(x), x.argmax(-1))


def op_samples() -> dict[str, tuple]:
    """Arguments for each op, as the model and the serving engine pass them."""
    from test_paged_attention import paged_batch

    from leanlm.kernels import cpu_vnni
    from leanlm.kernels.cpu_linear import to_blocks

    g = torch.Generator().manual_seed(0)
    bf = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)
    packed, sz, _ = int4_layer(64, 64, 32, seed=0)
    seq_lens, bs, heads, d = [1, 5, 17], 4, 4, 16
    b = paged_batch([1] * 3, seq_lens, heads, 2, d, bs, seed=0, dtype=torch.bfloat16)
    tables = b["block_tables"].to(torch.int32)
    slots = torch.tensor([int(tables[r, (n - 1) // bs]) * bs + (n - 1) % bs for r, n in enumerate(seq_lens)])
    lens, cos, sin = torch.tensor(seq_lens), bf(3, d), bf(3, d)
    step = (b["k_cache"], b["v_cache"], slots, tables, lens, bs, 0.25, -1)
    samples = {
        "rms_norm": (bf(2, 3, 64), bf(2, 3, 64), bf(64), 1e-6),
        "rotary": (bf(1, 5, 3, 64), bf(1, 1, 3, 64), bf(1, 1, 3, 64)),
        "int4pack_mm": (bf(5, 64), packed, sz, 32, True),
        "bf16_mm": (bf(5, 96), to_blocks(bf(160, 96)), None, 160),
        "argmax_rows": (torch.randn(3, 100, generator=g),),
        "paged_decode": (b["q"], b["k_cache"], b["v_cache"], tables, lens, bs, 0.25, -1),
        "rotary_decode": (bf(3, heads, d), bf(3, 2, d), bf(3, 2, d), cos, sin, *step),
        "rotary_decode_qkv": (bf(3, (heads + 4) * d), heads, cos, sin, *step),
    }
    if cpu_vnni.available():
        codes = torch.randint(0, 16, (64, 64), generator=g, dtype=torch.uint8)
        samples["vnni_mm"] = (bf(5, 64), cpu_vnni.pack(codes, 4), cpu_vnni.block_scales(sz), 32, 4)
    return samples


@pytest.mark.parametrize("name", list(op_samples()))
def test_each_op_has_a_fake_that_torch_compile_can_trace(name: str) -> None:
    """The serving engine's compiled decode step calls the ops from inside its graph: each has a
    fake (shapes from shapes) that agrees with the op, and a schema that names what it writes
    (rotary_decode's caches)."""
    args = op_samples()[name]
    torch.library.opcheck(getattr(cpu_ops.ops(), name).default, args,
                          test_utils=("test_schema", "test_faketensor"))
