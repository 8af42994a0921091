"""The fused, chunked head + cross-entropy: equal to the logits path, values and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from leanlm.loss import linear_cross_entropy
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
    fused = model(x, targets=y)
    fused.backward()
    g1 = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-7)
