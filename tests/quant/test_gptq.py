"""GPTQ: beats round-to-nearest on the layer objective; act-order / static groups give valid g_idx."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from leanlm.errors import LeanLMError
from leanlm.quant import AWQConfig, GPTQConfig, QuantLinear, RTNConfig, SmoothQuantConfig, quantize_
from leanlm.quant.gptq import Hessian, gptq_quantize, group_aware_order
from leanlm.quant.primitives import dequantize_weight
from leanlm.quant.rtn import rtn_quantize


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random calibration inputs with correlated features and a few large channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :4] *= 8
    return x


def layer_error(w: torch.Tensor, what: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - what).t()).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize(("act_order", "static", "gar"), [(False, False, False), (True, False, False),
                                                         (True, True, False), (False, False, True),
                                                         (False, True, True)])
def test_gptq_has_lower_output_error_than_rtn(bits: int, act_order: bool, static: bool, gar: bool) -> None:
    torch.manual_seed(bits)
    n, k = 96, 256
    w = torch.randn(n, k) * 0.05
    x = correlated_inputs(2048, k)
    h = Hessian(k, x.device)
    for chunk in x.split(300):  # the running average over batches equals 2/n Σ x xᵀ
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    cfg = GPTQConfig(bits=bits, group_size=64, act_order=act_order, static_groups=static, group_aware=gar)
    codes, scales, zeros, g_idx = gptq_quantize(w, h.h, cfg)
    if gar:  # every group keeps its own columns
        assert torch.equal(g_idx, (torch.arange(k) // 64).int())
    gptq = layer_error(w, dequantize_weight(codes, scales, zeros, g_idx), x)
    rtn = layer_error(w, dequantize_weight(*rtn_quantize(w, RTNConfig(bits, 64))), x)
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_act_order_with_groups_gives_a_valid_g_idx() -> None:
    torch.manual_seed(0)
    k, gs = 256, 32
    w = torch.randn(64, k)
    x = correlated_inputs(1024, k)
    h = 2 * x.t() @ x / x.shape[0]
    _, scales, zeros, g_idx = gptq_quantize(w, h, GPTQConfig(4, gs, act_order=True))
    assert g_idx.dtype == torch.int32 and g_idx.shape == (k,)
    assert scales.shape == zeros.shape == (64, k // gs)
    counts = torch.bincount(g_idx.long(), minlength=k // gs)
    assert counts.tolist() == [gs] * (k // gs)  # every group holds group_size columns
    # the group of a column is its rank in decreasing-Hessian order // group_size
    order = torch.argsort(torch.diag(h), descending=True)
    rank = torch.empty(k, dtype=torch.long)
    rank[order] = torch.arange(k)
    assert torch.equal(g_idx.long(), rank // gs)
    assert not torch.equal(g_idx, (torch.arange(k) // gs).int())
    # static groups keep the natural assignment even with act-order
    _, _, _, g_static = gptq_quantize(w, h, GPTQConfig(4, gs, act_order=True, static_groups=True))
    assert torch.equal(g_static, (torch.arange(k) // gs).int())


def test_group_aware_order_is_gars() -> None:
    """GAR's order, as its reference (GPTQModel's gar_ref.py) builds it: groups by decreasing max
    H_kk, columns by decreasing H_kk within each; a partial last group stays last."""
    torch.manual_seed(0)
    k, gs = 100, 16
    diag = torch.rand(k)
    want = []
    full = k // gs
    for g in sorted(range(full), key=lambda g: -float(diag[g * gs:(g + 1) * gs].max())):
        want += [g * gs + int(i) for i in torch.argsort(diag[g * gs:(g + 1) * gs], descending=True)]
    want += list(range(full * gs, k))
    assert group_aware_order(diag, gs).tolist() == want


def test_group_aware_parameters_stay_with_their_groups() -> None:
    """With GAR the groups are quantized out of order; each group's scale and zero must still be
    the ones its own columns were quantized with: requantizing the dequantized weight with them
    gives back the codes, and the result is closer to W than a shuffled assignment."""
    torch.manual_seed(1)
    k, gs = 200, 32  # a partial last group of 8
    w = torch.randn(48, k) * torch.linspace(0.01, 1, k)  # groups of very different ranges
    x = correlated_inputs(1024, k)
    h = 2 * x.t() @ x / x.shape[0]
    codes, scales, zeros, g_idx = gptq_quantize(w, h, GPTQConfig(4, gs, group_aware=True))
    assert torch.equal(g_idx, (torch.arange(k) // gs).int()) and scales.shape == (48, 7)
    what = dequantize_weight(codes, scales, zeros, g_idx)
    assert (what - w).abs().max() < scales[:, g_idx.long()].max(0).values.max()
    err = layer_error(w, what, x)
    plain_config = GPTQConfig(4, gs, group_aware=False)
    plain = layer_error(w, dequantize_weight(*gptq_quantize(w, h, plain_config)[:4]), x)
    assert err < 2 * plain, (err, plain)


def test_dead_inputs_and_rank_deficient_hessians() -> None:
    torch.manual_seed(0)
    k = 64
    w = torch.randn(32, k)
    x = torch.randn(16, k)  # fewer tokens than features: H is singular before dampening
    x[:, 5] = 0  # a dead input
    h = 2 * x.t() @ x / 16
    codes, scales, zeros, g_idx = gptq_quantize(w, h, GPTQConfig(4, 32))
    what = dequantize_weight(codes, scales, zeros, g_idx)
    assert bool(torch.isfinite(what).all())
    assert bool((what[:, 5] == 0).all()) or bool((what[:, 5].abs() <= scales[:, 0]).all())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_quantize_model_layer_by_layer(family: str) -> None:
    model, rtn = random_model(family), random_model(family)
    calib = torch.randint(0, model.config.vocab_size, (8, 32))
    tokens = calib[:2, :16]  # scored on calibration text: GPTQ fits the layer outputs there
    with torch.no_grad():
        ref = model(tokens)
    quantize_(model, GPTQConfig(bits=4, group_size=32, act_order=True), calib, batch_size=4,
              progress=False)
    quantize_(rtn, RTNConfig(bits=4, group_size=32), progress=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * (7 if model.config.gated_mlp else 6)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head stays in full precision
    with torch.no_grad():
        err = float((model(tokens) - ref).norm() / ref.norm())
        err_rtn = float((rtn(tokens) - ref).norm() / ref.norm())
    assert err < err_rtn, (err, err_rtn)


def test_gptq_quantizes_the_head_on_the_last_blocks_outputs() -> None:
    model = random_model("qwen2")  # tied embeddings: the head is quantized apart from them
    rtn = random_model("qwen2")
    embedding = model.embed_tokens.weight.detach().clone()
    calib = torch.randint(0, model.config.vocab_size, (8, 32))
    with torch.no_grad():
        hidden = model.norm(model.hidden(calib[:4]))
        ref = model.lm_head(hidden)
    only_head = lambda n, m: False
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib, only_head, batch_size=4, progress=False,
              lm_head=True)
    quantize_(rtn, RTNConfig(bits=4, group_size=32), filter_fn=only_head, progress=False, lm_head=True)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(rtn.lm_head, QuantLinear)
    assert torch.equal(model.embed_tokens.weight, embedding)  # the tied embedding is untouched
    with torch.no_grad():  # the head alone, on the same (full-precision) hidden states
        err = float((model.lm_head(hidden) - ref).pow(2).mean())
        err_rtn = float((rtn.lm_head(hidden) - ref).pow(2).mean())
    assert err < err_rtn, (err, err_rtn)


@pytest.mark.parametrize("config", [AWQConfig(bits=4, group_size=32), SmoothQuantConfig()])
def test_methods_that_fold_scales_refuse_the_head(config: object) -> None:
    model = random_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (2, 16))
    with pytest.raises(LeanLMError, match="cannot quantize the LM head"):
        quantize_(model, config, calib, progress=False, lm_head=True)
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)  # refused before any work
