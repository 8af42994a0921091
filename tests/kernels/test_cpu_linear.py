"""The model's Linear: oneDNN-prepacked weights for CPU inference (or 64-row blocks for leanlm's bf16
GEMM), F.linear everywhere else."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from leanlm import kernels
from leanlm.kernels.cpu_linear import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def _layer(dtype: torch.dtype, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 160, bias=bias).to(dtype)


def _blocked(dtype: torch.dtype, gemm: str) -> bool:
    """Whether a weight of ``dtype`` packs into leanlm's 64-row blocks under ``gemm``."""
    return dtype == torch.bfloat16 and gemm == "leanlm"


@pytest.mark.parametrize("gemm", ["onednn", "leanlm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (3, 7, 96), (64, 96)])
def test_packed_inference_matches_f_linear(dtype: torch.dtype, shape: tuple[int, ...], gemm: str) -> None:
    m = _layer(dtype)
    x = torch.randn(shape).to(dtype)
    expected = F.linear(x, m.weight, m.bias)
    with torch.inference_mode(), kernels.bf16_gemm_kernel(gemm):
        y = m(x)
    assert m._packed is not None and m._packed[1] is not None  # the packed path ran
    assert m._packed[1].is_mkldnn != _blocked(dtype, gemm)
    assert y.shape == expected.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_a_changed_weight_is_packed_again() -> None:
    m = _layer(torch.float32, bias=False)
    x = torch.randn(2, 96)
    with torch.inference_mode():
        m(x)
    first = m._packed
    with torch.no_grad():
        m.weight.mul_(2)  # in place: the version counter moves
    with torch.inference_mode():
        y = m(x)
    assert m._packed is not first
    torch.testing.assert_close(y, F.linear(x, m.weight), rtol=1e-5, atol=1e-5)
    m.weight = torch.nn.Parameter(torch.zeros_like(m.weight))  # another tensor
    with torch.inference_mode():
        assert m(x).abs().max() == 0


def test_training_fp16_and_prepacking_off_take_f_linear() -> None:
    m = _layer(torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    m(x).sum().backward()  # autograd: no packing, gradients flow
    assert m._packed is None and m.weight.grad is not None and x.grad is not None
    with torch.no_grad():  # no_grad is not inference mode (calibration, evaluation)
        m(x)
    assert m._packed is None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.detach()).dtype == torch.bfloat16  # autocast still casts
    assert m._packed is None
    half = _layer(torch.float16)
    with torch.inference_mode():
        half(torch.randn(2, 96).half())
    assert half._packed is None
    with torch.inference_mode():
        m(x.detach())
    assert m._packed is not None
    m(x)  # training again after an evaluation: the packed copy is freed
    assert m._packed is None
    with kernels.prepacking(False), torch.inference_mode():
        m(x.detach())
    assert m._packed is None


def test_copies_pickles_and_state_dicts_leave_the_packed_weight_behind() -> None:
    m = _layer(torch.bfloat16)
    x = torch.randn(2, 96).bfloat16()
    with torch.inference_mode():
        y = m(x)
    assert set(m.state_dict()) == {"weight", "bias"}
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other._packed is None
        with torch.inference_mode():
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)


def test_generation_runs_every_projection_and_the_head_packed() -> None:
    from leanlm import DEFAULT_MODEL
    from leanlm.checkpoint import load_model
    from leanlm.generate import generate
    from leanlm.sampling import SamplingParams

    model = load_model(DEFAULT_MODEL, dtype="bfloat16").eval()
    out = generate(model, [[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * model.config.num_layers + 1
    assert all(m._packed is not None and m._packed[1] is not None for m in linears)
    with torch.inference_mode():
        packed_logits = model(torch.tensor([[5, 6, 7, 8]]))[0]
    with torch.no_grad():  # F.linear
        plain_logits = model(torch.tensor([[5, 6, 7, 8]]))[0]
    torch.testing.assert_close(packed_logits, plain_logits, rtol=0.02, atol=0.02)
    assert len(out[0]) == 4


def test_a_weight_is_not_packed_where_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    import leanlm.kernels.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "available_memory", lambda: cpu_linear.HEADROOM)
    m = _layer(torch.float32)
    x = torch.randn(3, 96)
    with torch.inference_mode():
        y = m(x)
    assert m._packed is not None and m._packed[1] is None  # decided once per weight version
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), rtol=0, atol=0)
    monkeypatch.undo()
    assert cpu_linear.available_memory() > cpu_linear.HEADROOM  # this machine has room


@pytest.mark.parametrize("gemm", ["onednn", "leanlm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_only_weight_is_the_one_copy_and_comes_back_on_demand(dtype: torch.dtype, gemm: str) -> None:
    m = _layer(dtype)
    plain = m.weight.detach().clone()
    x = torch.randn(3, 96).to(dtype)
    expected = F.linear(x, plain, m.bias)
    with kernels.bf16_gemm_kernel(gemm):
        assert m.pack_() and m.is_packed and not m.weight.requires_grad
    assert m._packed is None  # no cache beside it
    if _blocked(dtype, gemm):  # 160 rows in 3 blocks of 64, k-major
        assert m.weight.shape == (3, 96, 64) and torch.equal(m.weight[1, :, 5], plain[69])
    else:
        assert m.weight.is_mkldnn and m.weight.shape == plain.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        torch.testing.assert_close(m(x), expected, rtol=tol, atol=tol)
    with torch.no_grad():  # no autograd needed: the packed weight serves
        torch.testing.assert_close(m(x), expected, rtol=tol, atol=tol)
    assert m.is_packed
    # the plain layout on demand, exactly: state dict, copies, pickles
    assert torch.equal(m.state_dict()["weight"], plain) and not m.state_dict()["weight"].is_mkldnn
    assert torch.equal(m.dense_weight(), plain)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert not other.is_packed and torch.equal(other.weight, plain)
    # training: the forward unpacks, and gradients flow to the weight again
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert not m.is_packed and m.weight.requires_grad and m.weight.grad is not None
    assert torch.equal(m.weight.detach(), plain)


def test_packing_refuses_what_it_cannot_pack() -> None:
    m = _layer(torch.float16)
    assert not m.pack_() and not m.is_packed
    m = _layer(torch.float32)
    with kernels.prepacking(False):  # switched off: a packed weight is unpacked by its forward
        assert m.pack_()
        m(torch.randn(1, 96))
        assert not m.is_packed
