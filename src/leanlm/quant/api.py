"""``quantize_(model, config, calib)``: one model transformed in place, one handler per method.

The torchao pattern: each method is a config dataclass plus a handler class registered under
its command-line name with :func:`register_method` (``@register_method("gptq", GPTQConfig)``).
:func:`quantize_` looks the handler up by the config's type; the command line's choices are
``tuple(REGISTRY)``, whether a method needs calibration data is its handler's ``calibrated``
flag, and :func:`method_config` builds a config from command-line options by name
(:meth:`MethodConfig.from_cli`). So a new method costs one config and one handler, and neither
this module nor a command changes.

Calibration-free methods (RTN, LLM.int8()) replace each selected ``nn.Linear`` directly.
Calibrated methods (GPTQ, AWQ, SmoothQuant) run layer by layer: the calibration tokens are
embedded once, then for each block the handler sees only that block and its inputs
(:class:`~leanlm.quant.calibration.LayerInputs`), quantizes it, and the inputs advance to the
block's outputs -- computed with the quantized block (GPTQ: later layers correct for earlier
errors) or with the original one (AWQ and SmoothQuant match the full-precision activations),
as each handler says. Within a block, linears are visited as :func:`block_sublayers` lists them:
the groups that read the same input, in execution order (GPTQ's "true sequential" order).

The LM head (``lm_head=True``, GPTQModel's ``lm_head`` option) is left in full precision by
default. Quantizing it matters for CPU decode, where a step reads every weight once: the head of
a 128k-vocabulary model is 0.5 GB of bf16, 40% of what a 4-bit 1B model reads per token
(llama.cpp stores it at 6 or 8 bits). Calibration-free methods quantize it like any linear;
GPTQ runs it as one more "block", :class:`HeadBlock` (final norm, then head), on the last
block's outputs. A tied head is quantized apart from the embedding, which stays as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from rich.progress import Progress
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.quant.calibration import LayerInputs

FilterFn = Callable[[str, nn.Module], bool]
REGISTRY: dict[str, type[Method]] = {}  # command-line name -> handler (for configs of handler.config_cls)


def register_method(name: str, config_cls: type) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("gptq", GPTQConfig) class GPTQ(Method): ...`` makes
    ``GPTQ`` the handler of ``GPTQConfig`` and the method ``--method gptq`` names."""
    def wrap(handler: type[Method]) -> type[Method]:
        handler.name, handler.config_cls = name, config_cls
        REGISTRY[name] = handler
        return handler
    return wrap


def _builtins() -> None:
    import leanlm.quant  # noqa: F401 (its modules register the built-in methods)


def handler_for(config: Any) -> type[Method] | None:
    """The handler registered for ``config``'s type (None if there is none)."""
    _builtins()
    return next((h for h in REGISTRY.values() if type(config) is h.config_cls), None)


def method_config(name: str, **options: Any) -> Any:
    """The config of the method registered as ``name``, from command-line options (``bits``,
    ``group_size``, ``sym``, ``act_order``, ``static_groups``, ``group_aware``, ``damp_percent``): each
    config takes those it has."""
    _builtins()
    handler = REGISTRY.get(name)
    if handler is None:
        raise LeanLMError(f"unknown method {name!r}: expected one of {tuple(REGISTRY)}")
    return handler.config_cls.from_cli(**options)


class MethodConfig:
    """What every method's config dataclass can do: be built from command-line options."""

    @classmethod
    def from_cli(cls, **options: Any) -> Any:
        """The config from the options that name one of its fields; an option given as None takes
        the field's default (so weight-only methods are symmetric by default, AWQ asymmetric, as
        AutoGPTQ and AutoAWQ)."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in options.items() if k in fields and v is not None})


@dataclass
class Sublayer:
    """Linears of a block that read one input, with the op that produces it.

    ``prev`` (a norm, or a linear whose output rows feed these linears' input columns one to
    one) is where AWQ/SmoothQuant fold a per-channel scale; None when no such op exists (the
    input passes through a nonlinearity that does not commute with scaling). ``inspect`` is the
    module whose output AWQ compares while searching that scale.
    """

    names: tuple[str, ...]
    prev: str | None
    inspect: str


class HeadBlock(nn.Module):
    """The model's final norm and LM head as a block for the layer-by-layer methods: its input
    is the last transformer block's output, its one sub-layer the head (fed by the norm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = model.norm, model.lm_head

    def sublayers(self) -> list[Sublayer]:
        return [Sublayer(("lm_head",), "norm", "lm_head")]

    def forward(self, x: torch.Tensor, meta: Any = None) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def block_sublayers(block: nn.Module, targets: set[str] | None = None) -> list[Sublayer]:
    """The sub-layers of a block in execution order (those with a linear in ``targets``, if given)."""
    out = block.sublayers() if isinstance(block, HeadBlock) else _attention_block_sublayers(block)
    if targets is not None:
        out = [s for s in out if any(n in targets for n in s.names)]
    return out


def _attention_block_sublayers(block: nn.Module) -> list[Sublayer]:
    attn, mlp = block.self_attn, block.mlp
    out = [Sublayer(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                    "self_attn")]
    # v -> o is one to one only without grouped-query sharing (as AutoAWQ's Llama rule)
    same = attn.v_proj.weight.shape == attn.o_proj.weight.shape
    out.append(Sublayer(("self_attn.o_proj",), "self_attn.v_proj" if same else None, "self_attn.o_proj"))
    if mlp.gate_proj is not None:
        out.append(Sublayer(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"))
        out.append(Sublayer(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"))  # act(g) ⊙ (up x)
    else:
        out.append(Sublayer(("mlp.up_proj",), "post_attention_layernorm", "mlp"))
        out.append(Sublayer(("mlp.down_proj",), None, "mlp.down_proj"))  # through a GELU: no fold
    return out


def run_module(block: nn.Module, name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A function (x, meta) -> output of submodule ``name`` of ``block`` on input x."""
    module = block.get_submodule(name)
    if name == "self_attn":
        return lambda x, meta: module(x, meta)
    return lambda x, meta: module(x)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@dataclass
class WeightOnlyConfig(MethodConfig):
    """What every weight-only method shares: b-bit codes in groups of ``group_size`` inputs."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    backend: str = "auto"  # QuantLinear backend: auto | int4pack | vnni | int8pack | dequant | reference

    def __post_init__(self) -> None:
        from leanlm.quant.linear import BACKENDS
        from leanlm.quant.primitives import check_scheme

        check_scheme(self.bits, self.group_size)
        if self.backend not in BACKENDS:
            raise LeanLMError(f"unknown backend {self.backend!r}: expected one of {BACKENDS}")


class Method:
    """A quantization method's handler. Subclasses set the class flags and override one hook."""

    name: ClassVar[str] = ""  # set by register_method
    config_cls: ClassVar[type] = object  # set by register_method
    calibrated: ClassVar[bool] = False  # needs calibration tokens (then defines quantize_block)
    quantizes_head: ClassVar[bool] = True  # calibrated methods: can quantize a HeadBlock
    propagate_quantized: ClassVar[bool] = True  # next block's inputs from the quantized block

    def __init__(self, config: Any) -> None:
        self.config = config

    def quantize_linear(self, name: str, linear: nn.Linear) -> nn.Module:
        """Calibration-free methods: the module that replaces ``linear``."""
        raise NotImplementedError(f"{type(self).__name__} has calibrated=False: it must define "
                                  "quantize_linear")

    def quantize_block(self, block: nn.Module, inputs: LayerInputs, targets: set[str]) -> None:
        """Calibrated methods: quantize (in place) the linears of ``block`` named in ``targets``."""
        raise NotImplementedError(f"{type(self).__name__} has calibrated=True: it must define "
                                  "quantize_block")


# the group sizes `--group-size auto` tries, largest first: what GPTQModel, AutoAWQ and vLLM load
AUTO_GROUPS = (128, 64, 32)


def quantized_in_features(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, int]:
    """name -> in_features (K) of every linear ``quantize_`` would quantize."""
    keep = filter_fn or default_filter
    return {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n, m)}


def choose_group_size(model: nn.Module, group_size: int | str, allow_partial: bool = False,
                      filter_fn: FilterFn | None = None) -> int:
    """The group size to quantize ``model`` with: ``"auto"`` is the largest of 128/64/32 that
    divides every quantized layer's K (else one group per channel, -1); a number is checked.

    leanlm reads and writes partial last groups (K not a multiple of the group size), but
    GPTQModel's CPU kernel, its torch AWQ kernel, AutoAWQ and vLLM refuse such checkpoints, so a
    group size that does not divide every K is refused unless ``allow_partial``.
    """
    ks = quantized_in_features(model, filter_fn)
    if group_size == "auto":
        return next((g for g in AUTO_GROUPS if all(k % g == 0 for k in ks.values())), -1)
    group_size = int(group_size)
    bad = {n: k for n, k in ks.items() if group_size > 0 and k % group_size}
    if bad and not allow_partial:
        name, k = next(iter(bad.items()))
        fits = [g for g in AUTO_GROUPS if all(k % g == 0 for k in ks.values())]
        raise LeanLMError(
            f"group size {group_size} does not divide the input size of {len(bad)} layer(s), e.g. "
            f"{name} (K = {k}): the last group would be partial, which GPTQModel, AutoAWQ and vLLM "
            f"refuse to load. Use " + (f"--group-size {fits[0]} (or auto)" if fits else
                                       "--group-size -1 (per channel)")
            + ", or --allow-partial-groups for a checkpoint only leanlm will read")
    return group_size


def check_lm_head(handler_cls: type[Method]) -> None:
    """Raise unless the method ``handler_cls`` can quantize the LM head."""
    if handler_cls.calibrated and not handler_cls.quantizes_head:
        raise LeanLMError(f"{handler_cls.name} cannot quantize the LM head (it folds a scale into "
                          f"the op before each linear, or searches over the head's whole output); "
                          f"use gptq or rtn for a quantized head")


def default_filter(name: str, module: nn.Module) -> bool:
    """Every linear inside the transformer blocks (embeddings and the LM head stay as they are)."""
    return name.startswith("layers.")


def quantize_(model: nn.Module, config: Any, calib: torch.Tensor | None = None,
              filter_fn: FilterFn | None = None, batch_size: int = 8, progress: bool = True,
              lm_head: bool | Any = False) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (GPTQConfig, AWQConfig, RTNConfig, ...).

    ``calib``: token ids [n_samples, seq_len] (see ``calibration_tokens``), required by the
    calibrated methods. ``filter_fn(name, linear)`` selects the linears (default: all linears
    of the blocks); ``lm_head`` adds the LM head: True quantizes it with ``config``, a config
    of the same method with its own (e.g. 8 bits per channel under a 4-bit body, as llama.cpp
    keeps its head at 6-8 bits; saved as a GPTQModel ``dynamic`` override). Returns the model.
    """
    from leanlm.quant.linear import quantized_linears

    handler_cls = handler_for(config)
    if handler_cls is None:
        raise LeanLMError(f"no quantization method registered for {type(config).__name__}; known: "
                          f"{sorted(h.config_cls.__name__ for h in REGISTRY.values())}")
    done = quantized_linears(model)
    if done:
        raise LeanLMError(f"the model is already quantized ({next(iter(done))} is "
                          f"{type(next(iter(done.values()))).__name__}); load the full-precision model")
    if hasattr(model, "unpack_weights_"):
        model.unfuse_projections_()  # each projection is quantized (and saved) under its own name
        model.unpack_weights_()  # weights packed for CPU inference: quantization reads them plain
    method = handler_cls(config)
    head_config = config if isinstance(lm_head, bool) else lm_head
    if type(head_config) is not type(config):
        raise LeanLMError(f"lm_head={head_config!r}: the head's config must be a {type(config).__name__} "
                          f"(one method per checkpoint; bits and group size may differ)")
    head_method = method if head_config is config else handler_cls(head_config)
    keep = filter_fn or default_filter
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n, m)]
    if lm_head is not False and "lm_head" not in targets:
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            raise LeanLMError("lm_head=True: the model has no nn.Linear named lm_head")
        targets.append("lm_head")
    if "lm_head" in targets:
        check_lm_head(handler_cls)
    if not targets:
        raise LeanLMError("the filter selected no nn.Linear layers to quantize")
    with Progress(disable=not progress, transient=True) as bar:
        if not method.calibrated:
            task = bar.add_task(f"{type(config).__name__}", total=len(targets))
            for name in targets:
                handler = head_method if name == "lm_head" else method
                set_module(model, name, handler.quantize_linear(name, model.get_submodule(name)))
                bar.advance(task)
        else:
            _quantize_layerwise(model, method, config, calib, targets, batch_size, bar, head_method)
    model.quantization = config  # recorded in saved checkpoints' quantization_config
    return model


def _quantize_layerwise(model: nn.Module, method: Method, config: Any, calib: torch.Tensor | None,
                        targets: list[str], batch_size: int, bar: Progress, head_method: Method) -> None:
    if calib is None or calib.numel() == 0:
        raise LeanLMError(f"{type(config).__name__} needs calibration data (calib=[n, seq] token ids)")
    outside = [n for n in targets if not n.startswith("layers.") and n != "lm_head"]
    if outside:
        raise LeanLMError(f"{type(config).__name__} quantizes linears inside the transformer blocks "
                          f"and the LM head only; the filter also selected {outside[0]!r}")
    inputs = LayerInputs(model, calib, batch_size)
    task = bar.add_task(f"{type(config).__name__} (block 0/{len(model.layers)})", total=len(model.layers))
    for i, block in enumerate(model.layers):
        bar.update(task, description=f"{type(config).__name__} (block {i + 1}/{len(model.layers)})")
        prefix = f"layers.{i}."
        mine = {n[len(prefix):] for n in targets if n.startswith(prefix)}
        original = None if method.propagate_quantized else inputs.outputs(block)
        if mine:
            method.quantize_block(block, inputs, mine)
        inputs.advance(original if original is not None else inputs.outputs(block))
        bar.advance(task)
    if "lm_head" in targets:
        bar.update(task, description=f"{type(config).__name__} (LM head)")
        head = HeadBlock(model)
        head_method.quantize_block(head, inputs, {"lm_head"})
        model.lm_head = head.lm_head
