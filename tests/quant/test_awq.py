"""AWQ: the scale folding is exact in full precision; the search beats plain RTN."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from leanlm.quant import AWQConfig, RTNConfig, quantize_
from leanlm.quant.api import block_sublayers
from leanlm.quant.awq import apply_scale


@pytest.mark.parametrize("family", ["llama", "llama-linear-rope", "gpt2"])
def test_folding_scales_leaves_the_fp_model_unchanged(family: str) -> None:
    model = random_model(family)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
        folded = 0
        for block in model.layers:
            for sub in block_sublayers(block):
                if sub.prev is None:
                    continue
                width = block.get_submodule(sub.names[0]).in_features
                apply_scale(block, sub, torch.rand(width) * 4 + 0.1)
                folded += 1
        out = model(tokens)
    # norms (weight and bias), v_proj -> o_proj without GQA, up_proj -> down_proj when gated
    assert folded >= 2 * model.config.num_layers
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gqa_and_gelu_mlp_have_no_fold_target() -> None:
    llama = random_model("llama")  # 4 heads, 2 kv heads: v_proj is narrower than o_proj's input
    subs = {s.names[0]: s.prev for s in block_sublayers(llama.layers[0])}
    assert subs["self_attn.o_proj"] is None and subs["mlp.down_proj"] == "mlp.up_proj"
    gpt2 = random_model("gpt2")  # down_proj reads gelu(up x): scaling does not commute
    subs = {s.names[0]: s.prev for s in block_sublayers(gpt2.layers[0])}
    assert subs["mlp.down_proj"] is None and subs["self_attn.o_proj"] == "self_attn.v_proj"


def test_awq_beats_rtn_with_activation_outliers() -> None:
    base = random_model("llama-linear-rope", seed=1, outliers=20.0)
    calib = torch.randint(0, base.config.vocab_size, (8, 32))
    tokens = calib[:2]
    with torch.no_grad():
        ref = base(tokens)
    errs = {}
    for name, cfg in (("rtn", RTNConfig(bits=3, group_size=32, sym=False)),
                      ("awq", AWQConfig(bits=3, group_size=32)),
                      ("awq-no-clip", AWQConfig(bits=3, group_size=32, clip=False))):
        model = random_model("llama-linear-rope", seed=1, outliers=20.0)
        quantize_(model, cfg, calib, batch_size=4, progress=False)
        with torch.no_grad():
            errs[name] = float((model(tokens) - ref).norm() / ref.norm())
    assert errs["awq"] < 0.8 * errs["rtn"], errs
    assert errs["awq-no-clip"] < errs["rtn"], errs


def test_clip_only_shrinks_weights() -> None:
    model = random_model("llama")
    before = model.layers[0].mlp.down_proj.weight.detach().clone()
    from leanlm.quant.awq import AWQ

    x = torch.randn(256, before.shape[1])
    AWQ(AWQConfig(bits=3, group_size=32))._clip(model.layers[0].mlp.down_proj, x)
    after = model.layers[0].mlp.down_proj.weight
    assert bool((after.abs() <= before.abs() + 1e-7).all())
    assert not torch.equal(after, before)
