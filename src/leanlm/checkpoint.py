"""Hugging Face checkpoints <-> the leanlm Transformer.

Loading (the gpt-fast pattern): read config.json, build the Transformer on the ``meta`` device
(no memory, no init cost), open the safetensors files (safetensors validates each header and
its offsets), check every tensor's name and shape against what the config implies, read each
tensor once into its final buffer, convert names (and GPT-2's fused, transposed Conv1D weights),
then ``load_state_dict(assign=True)`` so the parameters *are* those buffers: no model is ever
initialised, and peak memory is about one copy of the weights. ``mmap=True`` keeps parameters in
the file mapping instead (zero-copy), at a cost in CPU decode speed (see ``_SafetensorsReader``).

Saving writes safetensors shards + ``model.safetensors.index.json`` when needed, config.json,
generation_config.json and the tokenizer files into a temporary directory next to the target,
then renames it into place, so a crash never leaves a half-written checkpoint.

Security: pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle=True``,
and even then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from leanlm import kernels
from leanlm.allocator import drop_pages
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.fsutil import staged_dir
from leanlm.model import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LeanLMError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---- name conversion ------------------------------------------------------------------------
def to_hf_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """leanlm state dict -> Hugging Face tensor names/layouts (works on meta tensors too)."""
    tied = config.tie_word_embeddings
    if config.model_type != "gpt2":
        return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()
                if not (tied and k == "lm_head.weight")}
    out: dict[str, torch.Tensor] = {}
    rename = {"embed_tokens.weight": "wte.weight", "embed_positions.weight": "wpe.weight",
              "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias"}
    for k, v in state.items():
        if k in rename:
            out[f"transformer.{rename[k]}"] = v
        elif k == "lm_head.weight" and not tied:
            out[k] = v
    for i in range(config.num_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[h + theirs + ".weight"] = state[p + ours + ".weight"]
            out[h + theirs + ".bias"] = state[p + ours + ".bias"]
        a = p + "self_attn."
        out[h + "attn.c_attn.weight"] = torch.cat(
            [state[a + f"{n}_proj.weight"] for n in "qkv"], dim=0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([state[a + f"{n}_proj.bias"] for n in "qkv"])
        for ours, theirs in ((a + "o_proj", "attn.c_proj"), (p + "mlp.up_proj", "mlp.c_fc"),
                             (p + "mlp.down_proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = state[ours + ".weight"].t()
            out[h + theirs + ".bias"] = state[ours + ".bias"]
    return out


def from_hf_state(config: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state`: ``get(hf_name)`` returns a tensor (already validated)."""
    if config.model_type != "gpt2":
        ours = {}
        for name in meta_model(config).state_dict():
            hf = name if name.startswith("lm_head.") else f"model.{name}"
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            ours[name] = get(hf)
        if config.tie_word_embeddings:
            ours["lm_head.weight"] = ours["embed_tokens.weight"]
        return ours
    g = lambda n: get(f"transformer.{n}")
    h_dim = config.hidden_size
    ours = {"embed_tokens.weight": g("wte.weight"), "embed_positions.weight": g("wpe.weight"),
            "norm.weight": g("ln_f.weight"), "norm.bias": g("ln_f.bias")}
    tied = config.tie_word_embeddings
    ours["lm_head.weight"] = ours["embed_tokens.weight"] if tied else get("lm_head.weight")
    for i in range(config.num_layers):
        p, h = f"layers.{i}.", f"h.{i}."
        for mine, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            ours[p + mine + ".weight"] = g(h + theirs + ".weight")
            ours[p + mine + ".bias"] = g(h + theirs + ".bias")
        w = g(h + "attn.c_attn.weight").t()
        b = g(h + "attn.c_attn.bias")
        for j, n in enumerate("qkv"):
            ours[p + f"self_attn.{n}_proj.weight"] = w[j * h_dim:(j + 1) * h_dim].contiguous()
            ours[p + f"self_attn.{n}_proj.bias"] = b[j * h_dim:(j + 1) * h_dim]
        for mine, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            ours[p + mine + ".weight"] = g(h + theirs + ".weight").t().contiguous()
            ours[p + mine + ".bias"] = g(h + theirs + ".bias")
    return ours


def meta_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


# ---- reading ----------------------------------------------------------------------------------
def weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LeanLMError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise LeanLMError(f"{index} names shard {f.name}, which does not exist")
        return files, "safetensors"
    single = path / "model.safetensors"
    if single.is_file():
        return [single], "safetensors"
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise LeanLMError(f"{path} holds only pickle weights ({pickles[0].name}); leanlm loads "
                              "safetensors only. Convert it, or pass allow_pickle=True to read it "
                              "with torch.load(weights_only=True)")
        return pickles, "pickle"
    raise LeanLMError(f"{path}: no weights found (expected model.safetensors or "
                      "model.safetensors.index.json)")


class _Entry:
    """One tensor in a checkpoint: its shape (from the header only) and a lazy loader."""

    __slots__ = ("dtype", "file", "load", "mapping", "shape")

    def __init__(self, shape: list[int], dtype: torch.dtype, file: Path,
                 load: Callable[[], torch.Tensor], mapping: _MappedFile | None = None) -> None:
        self.shape, self.dtype, self.file, self.load = shape, dtype, file, load
        self.mapping = mapping  # the file mapping the loaded tensor is a view of, if any


def open_tensors(files: list[Path], kind: str, stack: ExitStack, mmap: bool) -> dict[str, _Entry]:
    """name -> entry, reading only headers; raises LeanLMError for corrupt files."""
    entries: dict[str, _Entry] = {}
    for f in files:
        if kind == "pickle":
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            entries.update({k: _Entry(list(t.shape), t.dtype, f, lambda t=t: t) for k, t in sd.items()})
            continue
        try:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))  # validates the file
            reader = _MappedFile(f) if mmap else stack.enter_context(_SafetensorsReader(f))
            for k in handle.keys():  # noqa: SIM118 (not a dict)
                info = handle.get_slice(k)
                dtype = _ST_DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise LeanLMError(f"{f}: tensor {k!r} has unsupported dtype {info.get_dtype()}")
                entries[k] = _Entry(list(info.get_shape()), dtype, f, lambda r=reader, k=k: r.read(k),
                                    reader if mmap else None)
        except (SafetensorError, OSError) as e:
            raise LeanLMError(f"{f}: not a readable safetensors file ({e}); is it truncated?") from None
    return entries


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


def _read_header(fh: BinaryIO) -> tuple[dict[str, Any], int]:
    """A (validated) safetensors file's JSON header and the offset its tensor data starts at."""
    n = int.from_bytes(fh.read(8), "little")
    return json.loads(fh.read(n)), 8 + n


class _SafetensorsReader:
    """Reads tensors of a (validated) safetensors file into fresh, anonymous CPU memory.

    Parameters that live in a file mapping decode ~25% slower on CPU than the same bytes in
    anonymous memory (4 KiB page-cache pages vs. huge pages; measured in
    benchmarks/bench_generate.py), so by default we read each tensor once into its own buffer
    (the page cache is not counted against the process) instead of keeping the mapping.
    """

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb")  # noqa: SIM115 (closed in __exit__)
        self.header, self.base = _read_header(self.fh)

    def read(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        if end > begin:
            self.fh.seek(self.base + begin)
            self.fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def __enter__(self) -> _SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


class _MappedFile:
    """A (validated) safetensors file mapped copy-on-write (``torch.from_file(shared=False)``):
    each tensor is a view of the mapping, read from the page cache on first touch, so a tensor
    that is only gathered from (an embedding) costs the pages it touches. The mapping lives as long
    as any of its tensors. :meth:`release` hands a tensor's pages back (``MADV_DONTNEED``: they
    stay in the page cache, and touching them again reads them again), which is how a tensor
    that has been repacked into memory of its own stops counting against the process."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            self.header, self.base = _read_header(fh)
        self.data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
        self.start = self.data.data_ptr()
        self.end = self.start + self.data.numel()

    def read(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        raw = self.data[self.base + begin:self.base + end]
        if (self.base + begin) % dtype.itemsize:  # an unaligned tensor cannot be a view: copy it
            raw = raw.clone()
        return raw.view(dtype).view(info["shape"])

    def release(self, t: torch.Tensor) -> None:
        """Drop the pages of ``t`` (a view of this mapping; anything else is left alone)."""
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if t.is_contiguous() and self.start <= lo and hi <= self.end:
            drop_pages(lo, hi)

# quant_method -> loader(path, config, quantization_config, dtype, mmap) of a quantized checkpoint
QuantizedLoader = Callable[[Path, ModelConfig, dict[str, Any], "torch.dtype | None", bool], Transformer]
QUANTIZED_FORMATS: dict[str, QuantizedLoader] = {}


def register_quantized_format(method: str, loader: QuantizedLoader) -> None:
    """Let :func:`load_model` read checkpoints whose ``quantization_config.quant_method`` is
    ``method`` (the quantization package registers GPTQ, AWQ and w8a8; the core does not know them)."""
    QUANTIZED_FORMATS[method] = loader


def load_model(path: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", allow_pickle: bool = False,
               mmap: bool = False, pack: bool = False, fuse: bool | None = None) -> Transformer:
    """Load a Hugging Face checkpoint directory into a :class:`Transformer` (eval mode).

    ``dtype``: float32/bfloat16/float16 (default: the checkpoint's). By default each tensor is
    read into process memory (CPU decode runs ~25% faster there); ``mmap=True`` keeps the
    parameters in the file mapping instead (zero-copy, quick to load, shared between
    processes). Either way the peak is about one copy of the weights.

    ``pack=True`` (CPU inference: ``leanlm generate``, ``serve``, ``eval``) maps the file and
    repacks each linear's weight straight from the mapping into oneDNN's layout
    (:meth:`Transformer.pack_weights_`), handing the file's pages back as it goes; the embedding,
    norms and biases stay in the mapping, read as they are touched. One copy of the weights is
    resident (the tied head of small models is the one packed copy of its embedding), and there
    is no second pass to pack them on the first forward. ``model.unpack_weights_()`` gives plain
    weights back (for training, merging, quantizing). Ignored off CPU.

    ``fuse`` makes each layer's q/k/v one linear and gate/up one linear (before packing;
    :meth:`Transformer.fuse_projections_`), so a decode step runs one product per group; the
    state dict keeps the Hugging Face names, and ``model.unfuse_projections_()`` gives the
    separate linears back. Default: with ``pack`` on a GPU (:func:`leanlm.kernels.fuse` says why
    not on the CPU; ``LEANLM_FUSE=1``/``0`` or :func:`leanlm.kernels.fusing` decide for any
    device).

    A config.json with a ``quantization_config`` (GPTQ, AWQ, leanlm w8a8) loads with quantized
    layers, through the loader registered for its ``quant_method``
    (:func:`register_quantized_format`; :mod:`leanlm.quant.formats` registers its formats, and
    ``import leanlm`` imports it).
    """
    path = Path(path)
    if not path.is_dir():
        raise LeanLMError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise LeanLMError(f"{path}: no config.json (expected a Hugging Face model directory)")
    config = ModelConfig.from_json_file(path / "config.json")
    want = resolve_dtype(dtype)
    fuse = pack and kernels.fuse(device) if fuse is None else fuse
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qcfg:
        method = qcfg.get("quant_method")
        if method not in QUANTIZED_FORMATS:
            raise LeanLMError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                              f"(expected one of {tuple(QUANTIZED_FORMATS)})")
        model = QUANTIZED_FORMATS[method](path, config, qcfg, want, mmap).to(device).eval()
        if pack and torch.device(device).type == "cpu" and kernels.prepack():
            model.pack_weights_(fuse=fuse)  # what stays plain: the head, unquantized layers
        elif fuse:
            model.fuse_projections_()
        return model
    pack = pack and torch.device(device).type == "cpu" and kernels.prepack()  # LEANLM_PREPACK=0: plain
    files, kind = weight_files(path, allow_pickle)
    with ExitStack() as stack:
        entries = open_tensors(files, kind, stack, mmap or pack)
        if config.model_type == "gpt2":  # the original GPT-2 checkpoints have no "transformer." prefix
            entries = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): e
                       for k, e in entries.items()}
        meta_state = to_hf_state(config, meta_model(config).state_dict())
        expected = {k: list(v.shape) for k, v in meta_state.items()}
        check_shapes(expected, entries, config)
        saved = DTYPES.get(config.torch_dtype or "")  # float64 or int checkpoints: use the file's
        target = want or saved or entries[next(iter(expected))].dtype

        def get(name: str) -> torch.Tensor:
            t = entries[name].load()
            return t if t.dtype == target else t.to(target)

        state = from_hf_state(config, get)
    model = meta_model(config)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.init_buffers("cpu")
    config.torch_dtype = str(target).removeprefix("torch.")
    del state
    mappings = {e.mapping for e in entries.values() if e.mapping is not None}
    release = (lambda w: [m.release(w) for m in mappings]) if pack else None
    if pack:  # fused layers hand their parts' pages back as their stacked copy is made
        model.pack_weights_(after=release, fuse=fuse)
    elif fuse:
        model.fuse_projections_(after=release)
    return model.to(device).eval()


def check_shapes(expected: dict[str, list[int]], found: dict[str, _Entry], config: ModelConfig) -> None:
    for name, shape in expected.items():
        if name not in found:
            missing = [n for n in expected if n not in found]
            raise LeanLMError(f"checkpoint is missing {len(missing)} tensor(s) the config implies, "
                              f"e.g. {missing[0]!r} with shape {shape}")
        got, f = found[name].shape, found[name].file
        if got != shape:
            raise LeanLMError(f"{f.name}: tensor {name!r} has shape {got}, expected {shape} "
                              f"(from config.json, model_type {config.model_type!r})")
    extra = [n for n in found if n not in expected and not _IGNORED.search(n)
             and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if extra:
        raise LeanLMError(f"checkpoint has {len(extra)} tensor(s) that config.json does not explain, "
                          f"e.g. {extra[0]!r}")


# ---- writing ----------------------------------------------------------------------------------
def save_model(model: Transformer, path: str | os.PathLike[str], tokenizer: Any | None = None,
               dtype: str | torch.dtype | None = None, max_shard_bytes: int = 4 * 1024**3) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (atomically replaces ``path``)."""
    if any(getattr(m, "quantized", False) for m in model.modules()):
        raise LeanLMError("the model is quantized: save it with leanlm.quant.save_quantized "
                          "(GPTQ, AWQ or w8a8 format)")
    if any(hasattr(m, "adapters") for m in model.modules()):
        raise LeanLMError("the model has adapters attached: save them with leanlm.peft.save_adapter, "
                          "or merge_ and remove_peft_ them first (leanlm merge)")
    target = resolve_dtype(dtype)
    state = {k: (v.detach().to("cpu", target) if target else v.detach().cpu()).contiguous()
             for k, v in to_hf_state(model.config, model.state_dict()).items()}
    return write_checkpoint(state, model.config.to_hf(), path, next(iter(state.values())).dtype,
                            tokenizer, max_shard_bytes)


def write_checkpoint(state: dict[str, torch.Tensor], hf_config: dict[str, Any],
                     path: str | os.PathLike[str], dtype: torch.dtype, tokenizer: Any | None = None,
                     max_shard_bytes: int = 4 * 1024**3, extra_json: dict[str, dict] | None = None) -> Path:
    """Write HF-named tensors + config.json (+ generation config, tokenizer, ``extra_json`` files)
    into a temporary directory next to ``path``, then rename it into place. ``dtype`` is the
    model's dtype recorded in config.json."""
    path = Path(path)
    saved_dtype = str(dtype).removeprefix("torch.")
    with staged_dir(path) as tmp:
        shards = list(_shard(state, max_shard_bytes))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = dict(hf_config)
        hf["torch_dtype"] = hf["dtype"] = saved_dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shard and size + n > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[k] = t
        size += n
    yield shard
