"""GPTQ and AWQ checkpoints: the on-disk layouts transformers, vLLM, AutoGPTQ/GPTQModel and
AutoAWQ read and write, converted from and to :class:`~leanlm.quant.linear.QuantLinear`.

GPTQ (``quant_method: gptq``, ``checkpoint_format: gptq``, AutoGPTQ's v1 format), per linear:

- ``qweight`` int32 [K·b/32, N]: column n is the little-endian bit stream of the codes of output
  n along K (code k at bits [b·k, b·k + b) of the column's words; for 3 bits codes straddle words);
- ``qzeros`` int32 [G, N·b/32]: the same stream along N of ``z - 1`` (the v1 convention: a
  symmetric 4-bit zero 8 is stored as 7, so ``qzeros`` words read 0x77777777), masked to b bits;
  ``gptq_v2`` checkpoints store z itself;
- ``scales`` fp16 [G, N]; ``g_idx`` int32 [K] (the group of each input column; act-order);
- ``bias`` fp16 [N] when the layer has one; ``w[n, k] = scales[g, n] · (q[k, n] - z[g, n])``,
  ``g = g_idx[k]``.

AWQ GEMM (``quant_method: awq``, ``version: gemm``), 4 bits only, no ``g_idx`` (groups are
contiguous):

- ``qweight`` int32 [K, N/8]: word j of row k packs outputs 8j..8j+7 with nibble i (bits
  [4i, 4i+4)) holding output ``8j + ORDER[i]``, ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ's
  interleave for its dequantize kernel);
- ``qzeros`` int32 [G, N/8]: the zeros, packed the same way (no minus one); ``scales`` fp16 [G, N].

SmoothQuant and LLM.int8() models are saved as ``quant_method: w8a8`` (leanlm's own config; the
tensors follow compressed-tensors: ``weight`` int8 [N, K] and ``weight_scale`` [N, 1]).

FP8 models are compressed-tensors checkpoints (``quant_method: compressed-tensors``, ``format:
float-quantized``; what llm-compressor's ``FP8_DYNAMIC`` scheme writes and vLLM serves): one
config group of ``Linear`` targets with 8-bit float weights per channel and 8-bit float input
activations per token, dynamic; per linear ``weight`` float8_e4m3fn [N, K] and ``weight_scale``
fp32 [N, 1]. Only that scheme is read; other compressed-tensors schemes are refused by name.

A quantized LM head with its own bits or group size (e.g. 8 bits per channel under a 4-bit
body) is GPTQModel's ``dynamic`` override, which vLLM reads too: ``"dynamic": {"+:lm_head":
{"bits": 8, "group_size": -1}}`` (a key is a regex matched at the start of the module's name).

``config.json`` carries ``quantization_config`` (GPTQ also writes ``quantize_config.json``, which
AutoGPTQ reads). Tensors that are not quantized keep their Hugging Face names and dtype.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.checkpoint import (
    DTYPES,
    check_shapes,
    meta_model,
    open_tensors,
    register_quantized_format,
    to_hf_state,
    weight_files,
    write_checkpoint,
)
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.kernels.packing import pack_codes, unpack_codes
from leanlm.quant.api import set_module
from leanlm.quant.fp8 import E4M3, Fp8Linear
from leanlm.quant.linear import QuantLinear, W8A8Linear, quantized_linears
from leanlm.quant.llm_int8 import Int8OutlierLinear
from leanlm.quant.primitives import default_g_idx

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # nibble i of a word holds output AWQ_ORDER[i]
FORMATS = ("gptq", "awq", "w8a8", "fp8")
CT = "compressed-tensors"  # the quant_method an fp8 checkpoint declares


# ---- int32 bit streams --------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [R, C] -> int32 [R, C·b/32] (little-endian bit stream along C)."""
    if (codes.shape[-1] * bits) % 32:
        unit = 32 if bits == 3 else 32 // bits
        raise LeanLMError(f"{codes.shape[-1]} {bits}-bit codes do not fill whole int32 words (the "
                          f"GPTQ/AWQ formats need that dimension to be a multiple of {unit})")
    return pack_codes(codes, bits).contiguous().view(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_codes(words.contiguous().view(torch.uint8), bits, n)


def gptq_tensors(m: QuantLinear, version: int = 1) -> dict[str, torch.Tensor]:
    mask = 2**m.bits - 1
    zeros = (m.zeros.t().to(torch.int64) - (1 if version == 1 else 0)) & mask
    out = {"qweight": pack_int32(m.codes(), m.bits).t().contiguous(),
           "qzeros": pack_int32(zeros, m.bits),
           "scales": m.scales.t().to(torch.float16).contiguous(),
           "g_idx": m.g_idx.to(torch.int32).contiguous()}
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return out


def gptq_decode(t: dict[str, torch.Tensor], bits: int, k: int, n: int, version: int = 1) -> tuple:
    """(codes [N, K], scales [N, G], zeros [N, G], g_idx [K]) from GPTQ tensors."""
    codes = unpack_int32(t["qweight"].t(), bits, k)
    zeros = unpack_int32(t["qzeros"], bits, n).to(torch.int64)
    zeros = (zeros + (1 if version == 1 else 0)) & (2**bits - 1)
    return codes, t["scales"].t(), zeros.t(), t.get("g_idx")


def awq_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    if m.bits != 4:
        raise LeanLMError(f"the AWQ GEMM format stores 4-bit weights; this model has {m.bits} bits "
                          "(save it in GPTQ format)")
    if not torch.equal(m.g_idx.cpu(), default_g_idx(m.in_features, m.group_size)):
        raise LeanLMError("the AWQ format has no g_idx: act-order weights must be saved in GPTQ format")

    def interleave(x: torch.Tensor) -> torch.Tensor:  # [R, N] -> int32 [R, N/8]
        r, n = x.shape
        if n % 8:
            raise LeanLMError(f"the AWQ format needs out_features divisible by 8, got {n}")
        return pack_int32(x.reshape(r, n // 8, 8)[:, :, AWQ_ORDER].reshape(r, n), 4)

    out = {"qweight": interleave(m.codes().t()), "qzeros": interleave(m.zeros.t()),
           "scales": m.scales.t().to(torch.float16).contiguous()}
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return out


def awq_decode(t: dict[str, torch.Tensor], k: int, n: int) -> tuple:
    def deinterleave(w: torch.Tensor) -> torch.Tensor:  # int32 [R, N/8] -> [R, N]
        x = unpack_int32(w, 4, n)
        return x.reshape(x.shape[0], n // 8, 8)[:, :, AWQ_REVERSE].reshape(x.shape[0], n)

    return deinterleave(t["qweight"]).t(), t["scales"].t(), deinterleave(t["qzeros"]).t(), None


# ---- whole checkpoints ----------------------------------------------------------------------------
def _quant_config(fmt: str, qlinears: dict[str, nn.Module], model: nn.Module) -> dict[str, Any]:
    """quantization_config as the readers expect it; desc_act and sym are read off the layers."""
    m = next(iter(qlinears.values()))
    if fmt == "fp8":
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        return {"quant_method": CT, "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {**fp8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                    "input_activations": {**fp8, "strategy": "token", "dynamic": True, "observer": None}}},
                "ignore": [] if "lm_head" in qlinears else ["lm_head"], "kv_cache_scheme": None}
    if fmt == "w8a8":
        out = {"quant_method": "w8a8", "weights": "int8 per output channel",
               "activations": "int8 per token, dynamic"}
        if isinstance(m, Int8OutlierLinear):
            out["outlier_threshold"] = m.threshold
        return out
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": m.group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    cfg = getattr(model, "quantization", None)
    m = next((q for n, q in qlinears.items() if n != "lm_head"), m)  # the body's bits and groups
    head = qlinears.get("lm_head")
    dynamic = ({"+:lm_head": {"bits": head.bits, "group_size": head.group_size}}
               if head is not None and (head.bits, head.group_size) != (m.bits, m.group_size) else None)
    desc_act = any(not torch.equal(q.g_idx.cpu(), default_g_idx(q.in_features, q.group_size))
                   for q in qlinears.values())
    sym = all(bool((q.zeros == 2 ** (q.bits - 1)).all()) for q in qlinears.values())
    return {"quant_method": "gptq", "bits": m.bits, "group_size": m.group_size,
            "desc_act": desc_act, "sym": sym,
            "static_groups": bool(getattr(cfg, "static_groups", False)),
            "true_sequential": bool(getattr(cfg, "true_sequential", True)),
            "damp_percent": float(getattr(cfg, "damp_percent", 0.01)),
            "act_group_aware": bool(getattr(cfg, "group_aware", False)) and not desc_act,  # (GPTQModel's key)
            "checkpoint_format": "gptq", "format": "gptq",  # AutoGPTQ/GPTQModel; transformers 5
            "lm_head": "lm_head" in qlinears,
            **({"dynamic": dynamic} if dynamic else {}),
            "meta": {"quantizer": ["leanlm:0.1.0"]}}


def w8a8_tensors(m: W8A8Linear) -> dict[str, torch.Tensor]:
    """int8 ``weight`` [N, K] and ``weight_scale`` [N, 1] (the compressed-tensors tensor layout)."""
    out = {"weight": m.weight.contiguous(), "weight_scale": m.weight_scale[:, None].contiguous()}
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return out


def fp8_tensors(m: Fp8Linear) -> dict[str, torch.Tensor]:
    """E4M3 ``weight`` [N, K] and fp32 ``weight_scale`` [N, 1] (compressed-tensors' layout)."""
    return {**w8a8_tensors(m), "weight_scale": m.weight_scale.float()[:, None].contiguous()}


def _format_of(m: nn.Module) -> str:
    """The one format that can hold quantized layer ``m`` (weight-only layers: gptq or awq)."""
    return "fp8" if isinstance(m, Fp8Linear) else "w8a8" if isinstance(m, W8A8Linear) else "gptq"


def save_quantized(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any | None = None,
                   format: str | None = None, max_shard_bytes: int = 4 * 1024**3) -> Path:
    """Write a quantized model (atomically): weight-only models as GPTQ (default) or AWQ
    checkpoints, SmoothQuant / LLM.int8() models in leanlm's ``w8a8`` format, FP8 models as
    compressed-tensors. A model with fused projections (:mod:`leanlm.fusion`) is written from its
    separate linears, as these formats name each one, and fused again after."""
    if hasattr(model, "projections_unfused"):
        with model.projections_unfused():
            return _save_quantized(model, path, tokenizer, format, max_shard_bytes)
    return _save_quantized(model, path, tokenizer, format, max_shard_bytes)


def _save_quantized(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any | None,
                    format: str | None, max_shard_bytes: int) -> Path:
    config: ModelConfig = model.config
    qlinears = quantized_linears(model)
    if not qlinears:
        raise LeanLMError("the model is not quantized (run quantize_ first, or use save_model)")
    fmt = format or _format_of(next(iter(qlinears.values())))
    if fmt not in FORMATS:
        raise LeanLMError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    wrong = [n for n, m in qlinears.items() if _format_of(m) != ("gptq" if fmt == "awq" else fmt)]
    if wrong:
        raise LeanLMError(f"{wrong[0]} is {type(qlinears[wrong[0]]).__name__}, which the {fmt} format "
                          "cannot hold (gptq/awq: RTN, GPTQ, AWQ models; w8a8: SmoothQuant, LLM.int8(); "
                          "fp8: FP8)")
    if config.model_type == "gpt2":
        raise LeanLMError("quantized checkpoints are written for Llama-layout families; GPT-2's fused "
                          "c_attn layout is not supported")
    kinds = {(m.bits, m.group_size) for n, m in qlinears.items() if isinstance(m, QuantLinear)
             and (n != "lm_head" or fmt == "awq")}
    if len(kinds) > 1:
        raise LeanLMError(f"layers are quantized with different (bits, group_size) {sorted(kinds)}; "
                          "a GPTQ/AWQ checkpoint has one (the LM head may differ in GPTQ)")
    qset = set(qlinears)
    state = {k: v for k, v in to_hf_state(config, {k: v.detach().cpu() for k, v in
                                                   model.state_dict().items()}).items()
             if not _is_quant_buffer(k, qset)}
    encode = {"gptq": gptq_tensors, "awq": awq_tensors, "w8a8": w8a8_tensors, "fp8": fp8_tensors}[fmt]
    for name, m in qlinears.items():
        state.update({f"{_hf(name)}.{k}": v for k, v in encode(m.cpu()).items()})
    state = {k: v.contiguous() for k, v in state.items()}
    hf_config = config.to_hf()
    qcfg = _quant_config(fmt, qlinears, model)
    hf_config["quantization_config"] = qcfg
    if "lm_head" in qlinears:  # a quantized head is stored on its own, no longer tied
        hf_config["tie_word_embeddings"] = False
    extra = {"quantize_config.json": qcfg} if fmt == "gptq" else None
    return write_checkpoint(state, hf_config, path, model.embed_tokens.weight.dtype, tokenizer,
                            max_shard_bytes, extra)


def _override(qcfg: dict[str, Any], hf_name: str) -> dict[str, Any]:
    """GPTQModel's ``dynamic`` overrides of module ``hf_name`` (the first "+:" regex matching it)."""
    for pattern, values in (qcfg.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), hf_name):
            return values or {}
    return {}


def _build(method: str, qcfg: dict[str, Any], t: dict[str, torch.Tensor], linear: nn.Linear,
           dtype: torch.dtype, hf_name: str) -> nn.Module:
    qcfg = {**qcfg, **_override(qcfg, hf_name)}
    n, k = linear.out_features, linear.in_features
    if method == CT:
        m = Fp8Linear(k, n, "bias" in t, dtype)
        if t["weight"].shape != (n, k) or t["weight"].dtype != E4M3:
            raise LeanLMError(f"float8_e4m3fn weight of shape {list(t['weight'].shape)} {t['weight'].dtype}")
        m.weight, m.weight_scale = t["weight"], t["weight_scale"].reshape(n).float()
        if "bias" in t:
            m.bias = nn.Parameter(t["bias"].to(dtype), requires_grad=False)
        return m
    if method == "w8a8":
        threshold = qcfg.get("outlier_threshold")
        cls = Int8OutlierLinear if threshold else W8A8Linear
        m = cls(k, n, "bias" in t, dtype)
        if threshold:
            m.threshold = float(threshold)
        if t["weight"].shape != (n, k) or t["weight"].dtype != torch.int8:
            raise LeanLMError(f"int8 weight of shape {list(t['weight'].shape)} {t['weight'].dtype}")
        m.weight, m.weight_scale = t["weight"], t["weight_scale"].reshape(n).to(dtype)
        if "bias" in t:
            m.bias = nn.Parameter(t["bias"].to(dtype), requires_grad=False)
        return m
    bits, group_size = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    version = 2 if "gptq_v2" in (qcfg.get("checkpoint_format"), qcfg.get("format")) else 1
    codes, scales, zeros, g_idx = (awq_decode(t, k, n) if method == "awq"
                                   else gptq_decode(t, bits, k, n, version))
    gs = group_size if group_size > 0 else -1
    if g_idx is None:
        g_idx = default_g_idx(k, gs)
    return QuantLinear.from_codes(codes[:, :k], scales, zeros, g_idx, bits, gs, t.get("bias"), dtype)


def load_quantized(path: Path, config: ModelConfig, qcfg: dict[str, Any], dtype: torch.dtype | None,
                   mmap: bool = False) -> nn.Module:
    """Build the model of a GPTQ/AWQ/w8a8 checkpoint with quantized layers (called by load_model)."""
    method = qcfg.get("quant_method")
    if method == CT:
        _check_fp8_dynamic(path, qcfg)
    elif method not in FORMATS:
        raise LeanLMError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                          f"(expected one of {(*FORMATS[:3], CT)})")
    gemm = str(qcfg.get("version", "gemm")).lower() == "gemm"
    if method == "awq" and (int(qcfg.get("bits", 4)) != 4 or not gemm):
        raise LeanLMError(f"{path}: only 4-bit AWQ checkpoints in the GEMM layout are supported")
    if config.model_type == "gpt2":
        raise LeanLMError(f"{path}: quantized GPT-2 checkpoints are not supported")
    model = meta_model(config)
    marker = ".weight_scale" if method in ("w8a8", CT) else ".qweight"
    files, kind = weight_files(path, allow_pickle=False)
    with ExitStack() as stack:
        entries = open_tensors(files, kind, stack, mmap)
        names = sorted(k.removesuffix(marker).removeprefix("model.") for k in entries if k.endswith(marker))
        if not names:
            raise LeanLMError(f"{path}: config.json declares {method} quantization but no tensor "
                              f"ends in {marker}")
        target = dtype or DTYPES.get(config.torch_dtype or "", torch.float16)
        for name in names:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise LeanLMError(f"{path}: quantized tensor {name}{marker} names no linear of the "
                                  "model") from None
            prefix = f"{_hf(name)}."
            t = {k.removeprefix(prefix): e.load() for k, e in entries.items() if k.startswith(prefix)}
            try:
                set_module(model, name, _build(method, qcfg, t, linear, target, _hf(name)))
            except (RuntimeError, KeyError, IndexError, LeanLMError) as e:
                shape = [linear.out_features, linear.in_features]
                raise LeanLMError(f"{path}: the {method} tensors of {name} do not fit its shape "
                                  f"{shape} with {qcfg} ({e})") from None
        qset = set(names)
        dense = {k: v for k, v in to_hf_state(config, model.state_dict()).items()
                 if not _is_quant_buffer(k, qset)}
        rest = {k: e for k, e in entries.items() if not _is_quant_buffer(k, qset)}
        check_shapes({k: list(v.shape) for k, v in dense.items()}, rest, config)
        state = {}
        for hf_name in dense:
            v = rest[hf_name].load()
            state[hf_name.removeprefix("model.")] = v.to(target) if v.is_floating_point() else v
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LeanLMError(f"{path}: checkpoint is missing {missing[0]}")
    model.tie_weights()
    model.init_buffers("cpu")
    config.torch_dtype = str(target).removeprefix("torch.")
    model.quantization = qcfg
    return model


def _check_fp8_dynamic(path: Path, qcfg: dict[str, Any]) -> None:
    """Refuse, by name, a compressed-tensors scheme other than FP8 W8A8 (channel / dynamic token)."""
    groups = list((qcfg.get("config_groups") or {}).values())
    want = {"weights": ("float", 8, "channel", False), "input_activations": ("float", 8, "token", True)}
    for g in groups:
        for role, (typ, bits, strategy, dynamic) in want.items():
            spec = g.get(role) or {}
            got = (spec.get("type"), spec.get("num_bits"), spec.get("strategy"), bool(spec.get("dynamic")))
            if got != (typ, bits, strategy, dynamic):
                raise LeanLMError(f"{path}: compressed-tensors {role} {got} (type, bits, strategy, "
                                  f"dynamic) is not supported: leanlm reads the FP8 dynamic scheme, "
                                  f"{role} {(typ, bits, strategy, dynamic)}")
    if not groups or qcfg.get("format") != "float-quantized":
        raise LeanLMError(f"{path}: compressed-tensors format {qcfg.get('format')!r} with "
                          f"{len(groups)} config groups is not supported: leanlm reads float-quantized "
                          f"FP8 dynamic checkpoints")


def _is_quant_buffer(hf_name: str, names: set[str] | list[str]) -> bool:
    """Whether ``hf_name`` is a tensor of one of the quantized linears ``names``."""
    return hf_name.rpartition(".")[0].removeprefix("model.") in names


def _hf(name: str) -> str:
    """The Hugging Face name of a leanlm module (the LM head sits outside ``model.``)."""
    return name if name.startswith("lm_head") else f"model.{name}"


for _method in (*FORMATS[:3], CT):  # leanlm.load_model reads these through the core's registry
    register_quantized_format(_method, load_quantized)
