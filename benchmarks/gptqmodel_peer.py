"""GPTQModel as a peer: importing it on a CPU-only torch, quantizing a Hugging Face checkpoint with
it on given calibration windows, and loading a GPTQ/AWQ checkpoint through its transformers
integration (the default CPU kernels: ``TorchAtenLinear`` / ``TorchAtenAwqLinear``, torch's
``_weight_int4pack_mm_for_cpu`` on bf16 activations).

Shared by ``bench_quant.py --peers`` and ``tests/quant/test_peers.py``. Not a leanlm dependency:
it runs in a separate environment (scripts/setup_peers.sh), because gptqmodel pins numpy 2.2.6 where
leanlm's constraints pin a newer one. Two workarounds, both for this machine only:

- gptqmodel imports ``torchvision.transforms`` at import time for one vision model definition
  (InternVL). No CPU torchvision wheel matches torch 2.13.0 here (the one on the index is the CUDA
  build, whose ``_C`` cannot load), so a stand-in module exists only *during* ``import gptqmodel``,
  after transformers has decided that torchvision is absent (``is_torchvision_available`` is
  cached), and is removed right after.
- gptqmodel's AWQ clip search splits output channels into batches of 256 or 64 and asserts that one
  divides the output size (the default model's 864-wide MLP and a tiny test model's 32-wide
  projections fail it). The search is independent per output channel, so
  :func:`awq_clip_any_width` pads the weight with zero rows to a multiple of 64 and drops their
  results: the same thresholds for the real rows, computed in batches it accepts.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch


def available() -> bool:
    return importlib.util.find_spec("gptqmodel") is not None


def import_gptqmodel() -> types.ModuleType:
    """``import gptqmodel`` on a CPU-only torch without torchvision (see the module docstring)."""
    # gptqmodel sizes its CPU worker pool from this; one worker per core, or it refuses on 2 cores
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    if importlib.util.find_spec("torchvision") is not None:
        import gptqmodel

        return gptqmodel
    import transformers.image_utils  # noqa: F401  (caches "torchvision is absent" first)

    class InterpolationMode(enum.Enum):
        NEAREST, BILINEAR, BICUBIC = "nearest", "bilinear", "bicubic"

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stand_ins = {n: types.ModuleType(n) for n in names}
    for n, m in stand_ins.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
    stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]
    stand_ins["torchvision.transforms"].functional = stand_ins["torchvision.transforms.functional"]
    stand_ins["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    sys.modules.update(stand_ins)
    try:
        import gptqmodel
    finally:
        for n in names:
            sys.modules.pop(n, None)
    return gptqmodel


def awq_clip_any_width() -> None:
    """Let gptqmodel's AWQ clip search run on output sizes that are not a multiple of 64."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor._compute_best_clip
    if getattr(original, "pads_rows", False):
        return

    def compute_best_clip(self: Any, w: torch.Tensor, input_feat: torch.Tensor, *args: Any,
                          **kwargs: Any) -> torch.Tensor:
        rows = w.shape[0]
        if rows % 64 == 0:
            return original(self, w, input_feat, *args, **kwargs)
        padded = torch.cat([w, w.new_zeros((-rows) % 64, w.shape[1])])
        return original(self, padded, input_feat, *args, **kwargs)[:rows]

    compute_best_clip.pads_rows = True  # type: ignore[attr-defined]
    AWQProcessor._compute_best_clip = compute_best_clip


def quantize_config(method: str, bits: int, group_size: int, act_order: bool = False,
                    **overrides: Any) -> Any:
    """GPTQModel's config for ``method`` ("gptq" | "awq") with its own defaults otherwise, except
    AWQ's zero point, which follows AutoAWQ and leanlm (asymmetric) unless ``sym`` is given."""
    gptqmodel = import_gptqmodel()
    if method == "gptq":
        return gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, **overrides)
    overrides.setdefault("sym", False)
    return gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, method="awq", format="gemm",
                                    **overrides)


def load_unquantized(src: Path, config: Any, dtype: torch.dtype | None = None) -> Any:
    """GPTQModel's wrapper around the checkpoint ``src``, ready to ``quantize``: in fp32 for GPTQ
    (as leanlm calibrates), in bf16 for AWQ — gptqmodel 7.3.6's AWQ calibrated in fp32 on CPU
    returns a broken model (tried on the default model: asymmetric with the clip search,
    perplexity 176 where bf16 gives 28.5; symmetric, with the clip search or without, logits off
    by ~20; calibrated in bf16 they are off by ~0.1, like leanlm's)."""
    gptqmodel = import_gptqmodel()
    awq = str(getattr(config, "method", "")).lower().endswith("awq")
    if awq:
        awq_clip_any_width()
    if dtype is None:
        dtype = torch.bfloat16 if awq else torch.float32
    return gptqmodel.GPTQModel.load(str(src), config, device="cpu", dtype=dtype)


def quantize(model: Any, calib: torch.Tensor) -> float:
    """Quantize a :func:`load_unquantized` model on the token windows ``calib`` [n, L] (the same
    windows leanlm calibrates on, one per sample, no concatenation); returns the seconds it took
    (loading and ``model.save(dir)`` excluded, as for leanlm's ``quantize_``)."""
    gptqmodel = import_gptqmodel()
    awq = str(getattr(model.quantize_config, "method", "")).lower().endswith("awq")
    windows = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    # on CPU gptqmodel would pick a CUDA AWQ kernel to pack with; its torch one packs the same format
    backend = gptqmodel.BACKEND.AWQ_TORCH if awq else gptqmodel.BACKEND.AUTO
    t0 = time.perf_counter()
    model.quantize(windows, batch_size=1, backend=backend)
    return time.perf_counter() - t0


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A GPTQ/AWQ checkpoint through transformers with gptqmodel's default CPU kernel."""
    import_gptqmodel()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=dtype).eval()


def int4pack_zero_offsets_as_gptqmodel(model: torch.nn.Module) -> None:
    """Round the zero offsets that leanlm's int4pack backend feeds torch's kernel the way
    gptqmodel does, ``bf16(bf16(s)·(8 - z))`` instead of ``bf16(s·(8 - z))``, in every layer that
    has prepared that backend: the only difference between the two on an asymmetric checkpoint
    (symmetric ones have ``z = 8``, where both are zero)."""
    for layer in model.modules():
        state = getattr(layer, "_kernels", {}).get("int4pack")
        if state is None:
            continue
        packed, sz, perm, pad, ours = state
        s = sz[..., 0]  # [G, N (+ leanlm's padding rows)], bf16
        rows = s.shape[1] - layer.out_features
        z = torch.nn.functional.pad(layer.zeros.t().to(s.dtype), (0, rows), value=8)  # padding: offset 0
        layer._kernels["int4pack"] = (packed, torch.stack([s, (8 - z) * s], -1).contiguous(), perm, pad, ours)
