"""Quantized linear modules: every backend against the fp32 reference, and their limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.errors import LeanLMError
from leanlm.kernels import cpu_ops
from leanlm.quant.linear import QuantLinear, W8A8Linear
from leanlm.quant.llm_int8 import Int8OutlierLinear
from leanlm.quant.primitives import default_g_idx, group_params, quantize_weight


def make(n: int, k: int, bits: int, group: int, sym: bool = True, act_order: bool = False,
         bias: bool = True, backend: str = "auto") -> QuantLinear:
    torch.manual_seed(n + k + bits)
    w = torch.randn(n, k)
    s, z = group_params(w, bits, group, sym)
    g_idx = default_g_idx(k, group)
    if act_order:  # a GPTQ-like irregular assignment: group of column perm[i] is i // group
        perm = torch.randperm(k)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = (torch.arange(k) // group).int()
    codes = quantize_weight(w, s, z, bits, g_idx)
    return QuantLinear.from_codes(codes, s, z, g_idx, bits, group, torch.randn(n) if bias else None,
                                  torch.bfloat16, backend)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("bits", "group", "sym", "act_order", "k", "backend"), [
    (4, 32, True, False, 128, "int4pack"),
    (4, 128, False, False, 320, "int4pack"),   # K not a multiple of the group: padded
    (4, 64, True, True, 128, "int4pack"),      # act-order: input gathered by the sorted g_idx
    (8, -1, True, False, 96, "int8pack"),
    (8, -1, False, False, 96, "int8pack"),     # zero point: rank-1 correction
    (3, 32, True, True, 64, "dequant"),
    (2, 64, False, False, 128, "dequant"),
])
def test_backends_match_reference(bits: int, group: int, sym: bool, act_order: bool, k: int,
                                  backend: str) -> None:
    m = make(64, k, bits, group, sym, act_order)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    reference = _forced(m, "reference")
    assert m._choose(torch.zeros(3, k, dtype=torch.bfloat16)) == backend  # decode-shaped bf16 input
    if backend != "dequant":  # fp32 input computes in fp32, unless the bf16 kernels are allowed
        assert m._choose(torch.zeros(3, k)) == "dequant"
        with kernels.allow_bf16_kernels(True):
            assert m._choose(torch.zeros(3, k)) == backend
    got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 64)
    assert rel_err(got, reference(x)) < 0.02
    long = torch.zeros(600, k, dtype=torch.bfloat16)  # a long prefill: past torch's kernels
    ours = backend == "int4pack" and cpu_ops.ops() is not None  # leanlm's int4 GEMM: no row limit
    assert m._choose(long) == ("int4pack" if ours else "dequant")
    with kernels.kernel_mode("reference"):
        assert m._choose(long) == "dequant"
    x = torch.randn(600, k, dtype=torch.bfloat16)
    assert rel_err(m(x), reference(x)) < 0.02


def _forced(m: QuantLinear, backend: str) -> QuantLinear:
    return QuantLinear.from_codes(m.codes(), m.scales, m.zeros, m.g_idx, m.bits, m.group_size,
                                  m.bias.detach(), m.scales.dtype, backend)


def test_reference_is_the_dequantized_matmul() -> None:
    m = make(32, 64, 4, 32, backend="reference")
    x = torch.randn(5, 64)
    want = x @ m.dequantize().t() + m.bias.float()
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-4)


def test_forced_kernel_that_cannot_run_is_a_clear_error() -> None:
    with pytest.raises(LeanLMError, match="int4pack needs group_size"):
        make(32, 64, 4, -1, backend="int4pack")
    with pytest.raises(LeanLMError, match="int8pack runs 8-bit per-channel"):
        make(32, 64, 4, 32, backend="int8pack")
    with pytest.raises(LeanLMError, match="divisible by 16"):
        make(40, 64, 4, 32, backend="int4pack")
    with pytest.raises(LeanLMError, match="triton runs \\(2, 4, 8\\)-bit weights, this layer has 3"):
        make(32, 64, 3, 32, backend="triton")


@pytest.mark.parametrize(("bits", "act_order"), [(4, False), (4, True), (8, False)])
def test_triton_backend_matches_reference(bits: int, act_order: bool) -> None:
    # the Triton kernel through its CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
    m = make(64, 160, bits, 32, act_order=act_order, backend="triton")
    x = torch.randn(3, 160)
    assert rel_err(m(x), _forced(m, "reference")(x)) < 1e-5


def test_state_dict_round_trip_and_device_moves_drop_kernel_caches() -> None:
    m = make(64, 128, 4, 32)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    y = m(x)
    assert "int4pack" in m._kernels
    m2 = QuantLinear(128, 64, 4, 32, bias=True)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), y)
    m.to(torch.float32)
    assert not m._kernels


@pytest.mark.parametrize(("n", "k", "bits", "group", "act_order"),
                         [(64, 128, 4, 32, False), (128, 320, 4, 128, True), (96, 320, 8, -1, False)])
def test_the_cpu_kernel_holds_the_only_copy_of_the_codes(n: int, k: int, bits: int, group: int,
                                                         act_order: bool) -> None:
    m = make(n, k, bits, group, act_order=act_order)
    codes, state = m.codes(), {key: v.clone() for key, v in m.state_dict().items()}
    x1, x600 = torch.randn(1, k, dtype=torch.bfloat16), torch.randn(600, k, dtype=torch.bfloat16)
    want1, want600 = _forced(m, "reference")(x1), _forced(m, "reference")(x600)
    m(x1)  # prepares the int4 / int8 kernel
    assert ("int4pack" if bits == 4 else "int8pack") in m._kernels
    assert m.qweight.numel() == 0  # memory: only the kernel's packing holds the codes
    assert torch.equal(m.codes(), codes)
    assert torch.equal(m.state_dict()["qweight"], state["qweight"])
    assert rel_err(m(x600), want600) < 0.02 and rel_err(m(x1), want1) < 0.02  # dequant path too
    m2 = QuantLinear(k, n, bits, group, bias=True)
    m2.load_state_dict(m.state_dict())
    m2(x1)
    m2.load_state_dict(state)  # loading into a layer whose codes live in the kernel
    assert torch.equal(m2.codes(), codes)
    m.to(torch.float32)  # a move rebuilds qweight before the kernel tensors are dropped
    assert torch.equal(m.qweight, state["qweight"]) and torch.equal(m.codes(), codes)


@pytest.mark.parametrize(("n", "k"), [(64, 32), (128, 320), (192, 64)])
def test_int4_packing_matches_torch(n: int, k: int) -> None:
    from leanlm.quant.linear import int4pack, int4pack_codes, int4pack_layout_known

    assert int4pack_layout_known()
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = int4pack(codes)
    assert packed.is_contiguous()  # the kernel refuses strided weights
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2))
    assert torch.equal(int4pack_codes(packed, n, k), codes)


def test_w8a8_linear_is_close_to_fp() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    m = W8A8Linear.from_linear(lin)
    x = torch.randn(7, 256)
    assert rel_err(m(x), lin(x)) < 0.02
    assert m.weight.dtype == torch.int8


def test_llm_int8_outlier_decomposition_beats_plain_int8_on_outlier_features() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(16, 256)
    x[:, [3, 77]] *= 60  # two outlier feature dimensions, as in the paper
    plain = W8A8Linear.from_linear(lin)
    mixed = Int8OutlierLinear.from_linear(lin)
    err_plain, err_mixed = rel_err(plain(x), lin(x)), rel_err(mixed(x), lin(x))
    assert err_mixed < err_plain / 3
    assert err_mixed < 0.02


def test_input_gradient_recomputes_the_dequantized_weight() -> None:
    m = make(64, 128, 4, 32)
    x = torch.randn(5, 128, requires_grad=True)
    y = m(x)
    names, todo = set(), [y.grad_fn]
    while todo:  # the autograd graph holds the recomputing function, not a saved weight
        fn = todo.pop()
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions if f is not None]
    assert any("DequantLinear" in n for n in names)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, m.dequantize(torch.float32)) + m.bias.float()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_triton_decode_runs_the_interleaved_gemv(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-shaped calls on a layer whose shape fits the chunk layout go through quant_gemv (its
    interleaved copy made once; act-order columns sorted by group, the input gathered to match);
    larger M stays on quant_gemm. On CPU through Triton's interpreter (backend forced), on CUDA by
    the automatic choice."""
    from leanlm.kernels import quant_gemm, quant_gemv

    calls: list[str] = []
    for mod, name in ((quant_gemv, "quant_gemv"), (quant_gemm, "quant_gemm")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    backend = "triton" if device == "cpu" else "auto"
    for act_order in (False, True):
        m = make(48, 512, 4, 128, act_order=act_order, backend=backend).to(device)
        for rows in (1, 3, 5):
            calls.clear()
            x = torch.randn(rows, 512, device=device)
            assert rel_err(m(x), _forced(m, "reference")(x)) < 1e-5
            assert calls == ["quant_gemv" if rows <= quant_gemm.GEMV_MAX_M else "quant_gemm"]
        words, perm = m._kernels["gemv"][0]
        assert words.dtype == torch.int32 and (perm is not None) == act_order
