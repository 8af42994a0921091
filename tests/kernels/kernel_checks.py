"""Helpers the kernel tests share: poisoned outputs and the error measure against fp64."""

from __future__ import annotations

import torch


def poisoned(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write stays NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (ref computed in fp64); NaN anywhere in out gives inf."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
