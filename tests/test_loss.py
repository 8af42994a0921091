"""The fused, chunked head + cross-entropy: equal to the logits path, values and gradients; the
distillation loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from leanlm.loss import IGNORE_INDEX, distillation_loss, linear_cross_entropy
from leanlm.model import Transformer


@pytest.mark.parametrize("chunk", [5, 256])  # several chunks (5 rows each), and one
def test_fused_loss_matches_logits_loss(chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    torch.nn.init.normal_(head.weight, generator=g)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[0, :3] = -100

    def grads(loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss * 3.0, [h, head.weight])  # a non-unit upstream gradient

    def plain_loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).flatten(0, 1), y.flatten())

    fused, plain = linear_cross_entropy(h, head, y, chunk=chunk), plain_loss()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(linear_cross_entropy(h, head, y, chunk=chunk)), grads(plain_loss()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax
        low = linear_cross_entropy(h, head, y, chunk=chunk)
    assert low.dtype == torch.float32 and abs(float(low.detach()) - float(plain.detach())) < 0.05


def test_model_loss_path_matches_logits(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path).model
    model = Transformer(cfg)
    model.init_weights(0.1, torch.Generator().manual_seed(0))
    x, y = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, 12))
    fused = model.loss(x, y)
    fused.backward()
    g1 = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-7)


def test_distillation_loss_is_the_softened_kl_and_mixes_in_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 0] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    temp = 2.0
    p, logq = (t[keep] / temp).softmax(-1), (s[keep] / temp).log_softmax(-1)
    kl = (p * (p.log() - logq)).sum(-1).mean() * temp**2
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=temp), kl)
    assert float(distillation_loss(t, t, y)) == pytest.approx(0.0, abs=1e-6)  # the teacher itself
    ce = F.cross_entropy(s[keep], y[keep])
    torch.testing.assert_close(distillation_loss(s, t, y, temp, weight=0.0), ce)
    torch.testing.assert_close(distillation_loss(s, t, y, temp, weight=0.25), 0.75 * ce + 0.25 * kl)
