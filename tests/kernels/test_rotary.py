"""Rotary embedding kernel against its fp64 reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poisoned, rel_err

from leanlm.errors import LeanLMError
from leanlm.kernels import rotary


def tables(b: int, s: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 500, (b, s), generator=g).float()
    emb = torch.cat([pos[..., None] * inv] * 2, -1)[:, None]
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("shape", [(1, 4, 1, 16), (2, 3, 5, 32), (2, 20, 3, 12)])
def test_rotary_matches_fp64_reference(shape: tuple[int, int, int, int]) -> None:
    g = torch.Generator().manual_seed(shape[1])
    b, h, s, d = shape
    x = torch.randn(b, s, h, d, generator=g).transpose(1, 2)  # the model's strided [B, H, S, D] view
    cos, sin = tables(b, s, d, g)
    out = poisoned(shape)
    y = rotary.rotary(x, cos, sin, out=out)
    assert rel_err(y, rotary.reference(x.double(), cos.double(), sin.double())) < 1e-3


def test_rotary_broadcasts_one_table_over_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 8, generator=g)
    cos, sin = tables(1, 4, 8, g)
    want = rotary.reference(x.double(), cos.double(), sin.double())
    assert rel_err(rotary.rotary(x, cos, sin), want) < 1e-3


def test_rotary_rejects_bad_tables() -> None:
    x = torch.randn(1, 2, 4, 8)
    cos, sin = tables(1, 4, 8, torch.Generator().manual_seed(0))
    with pytest.raises(LeanLMError, match="cos must be"):
        rotary.rotary(x, cos[:, :, :3], sin)
    with pytest.raises(LeanLMError, match="even head dimension"):
        rotary.rotary(torch.randn(1, 2, 4, 7), cos[..., :7], sin[..., :7])
