"""``apply_peft_``: parameter-efficient adapters attached to the model's own modules, in place.

An adapter never replaces a module. It is a small ``nn.Module`` stored in a ``ModuleDict`` named
``adapters`` on the module it adapts (``layers.0.self_attn.q_proj.adapters.default.lora_A``), and
the module gets one forward pre-hook and one forward hook that run the *active* adapters:

    x ← adapter.pre(module, x)         (e.g. (IA)³ on a feed-forward input)
    y ← module(x)                       (the base: nn.Linear, a QuantLinear — QLoRA —, an MLP …)
    y ← adapter.post(module, x, y)      (LoRA's  y + s·B A x,  a bottleneck adapter, …)

So the base model's parameter names, checkpoint loading, quantization and FSDP are untouched;
several adapters can be attached and switched (:func:`set_adapter`); a merged adapter is skipped.
Every adapter acts token by token, so one batch can serve requests of different adapters:
:func:`routed` assigns each token row its adapter (the serving engine's multi-LoRA batches;
Punica/S-LoRA's idea, with gather/scatter in torch).

A method is a config dataclass plus an adapter class, registered under its command-line name with
:func:`register_adapter` (``register_adapter("lora", LoRAConfig, LoRA)``; a name may fix config
fields: ``register_adapter("dora", LoRAConfig, LoRA, use_dora=True)``), the idiom quantization
methods use too. The command line's choices are ``tuple(REGISTRY)`` and :func:`method_config`
builds a config by name (:meth:`PeftConfig.from_cli`); :func:`apply_peft_` finds the adapter
class by the config's type (its ``peft_type``). The config says which modules it targets (names
or suffixes such as ``"q_proj"``, ``"mlp.down_proj"``, or ``"re:<regex>"``).

On disk, adapters use Hugging Face peft's layout: ``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<HF module path>.<parameter>``
(``lora_A.weight``, ``lora_magnitude_vector``, ``ia3_l`` …), so peft's LoRA, DoRA and IA3
adapters load here and ours load in peft; methods peft lacks keep the layout under their own
``peft_type``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.fsutil import staged_dir


@dataclass
class PeftConfig:
    """What every method's config has: the targeted modules (names, suffixes or ``re:`` patterns)."""

    targets: list[str] = field(default_factory=list)
    peft_type: ClassVar[str] = ""

    def default_targets(self) -> list[str]:
        return []

    def resolved_targets(self) -> list[str]:
        return list(self.targets) or self.default_targets()

    def to_peft_json(self) -> dict[str, Any]:
        """The adapter_config.json dictionary."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "targets"}
        return {"peft_type": self.peft_type, "target_modules": self.resolved_targets(), **d}

    @classmethod
    def from_peft_json(cls, d: dict[str, Any]) -> PeftConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(targets=list(d.get("target_modules") or []),
                   **{k: v for k, v in d.items() if k in names and k != "targets"})

    @classmethod
    def from_cli(cls, **options: Any) -> PeftConfig:
        """The config from command-line options (``targets``, ``r``, ``bottleneck`` …): those that
        name one of its fields; an option given as None takes the field's default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})


class Adapter(nn.Module):
    """One adapter on one module. Subclasses override ``pre`` and/or ``post`` (and merging)."""

    merged = False

    def pre(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def merge(self, module: nn.Module) -> None:
        raise LeanLMError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, module: nn.Module) -> None:
        raise LeanLMError(f"{type(self).__name__} cannot be merged into the base weights")

    def shard_problem(self) -> str | None:
        """Why this adapter cannot be sharded for tensor parallelism (None if it can)."""
        return f"{type(self).__name__} adapters cannot be sharded for tensor parallelism (LoRA adapters can)"

    def shard_(self, split: str, index: slice) -> list[nn.Parameter]:
        """Cut this adapter for a tensor-parallel shard of its module (:mod:`leanlm.parallel`):
        ``split`` is ``"rows"`` (the module keeps output rows ``index``: column-parallel) or
        ``"columns"`` (it keeps input columns ``index`` and its partial outputs are summed across
        ranks: row-parallel). Returns the parameters it keeps whole whose gradient each rank
        computes only a partial sum of (the caller sums them over the ranks)."""
        raise LeanLMError(self.shard_problem() or f"{type(self).__name__}.shard_ is missing")

    def to_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's state dict with peft's parameter names and shapes (identity by default)."""
        return state

    def from_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state


@dataclass(frozen=True)
class AdapterMethod:
    """A registered method: its config and adapter classes and the config fields its name fixes."""

    name: str
    config_cls: type[PeftConfig]
    adapter_cls: type[Adapter]
    preset: dict[str, Any]


REGISTRY: dict[str, AdapterMethod] = {}  # command-line name -> method


def register_adapter(name: str, config_cls: type[PeftConfig], adapter_cls: type[Adapter],
                     **preset: Any) -> None:
    """Register ``adapter_cls`` for ``config_cls`` as the method ``--method name`` selects;
    ``preset`` fixes config fields for that name (``placement="pfeiffer"``)."""
    REGISTRY[name] = AdapterMethod(name, config_cls, adapter_cls, dict(preset))


def _builtins() -> None:
    import leanlm.peft  # noqa: F401 (its modules register the built-in methods)


def method_config(name: str, **options: Any) -> PeftConfig:
    """The config of the method registered as ``name``, from command-line options (``targets``,
    ``r``, ``alpha``, ``dropout``, ``bottleneck``): each config takes those it has."""
    _builtins()
    method = REGISTRY.get(name)
    if method is None:
        raise LeanLMError(f"unknown method {name!r}: expected one of {', '.join(REGISTRY)}")
    return method.config_cls.from_cli(**{**options, **method.preset})


def _peft_types() -> dict[str, AdapterMethod]:
    """peft_type (as adapter_config.json records it) -> the first method registered with it."""
    _builtins()
    out: dict[str, AdapterMethod] = {}
    for m in REGISTRY.values():
        out.setdefault(m.config_cls.peft_type, m)
    return out


# ---- hooks ----------------------------------------------------------------------------------
# Multi-adapter batches (the serving engine): adapter name -> the token rows (dim -2) it applies
# to. Every adapter here acts token by token, so a batch can mix requests of several adapters.
_ROUTES: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("peft_routes", default=None)


@contextmanager
def routed(adapter_per_token: Sequence[str | None], device: torch.device | str = "cpu") -> Iterator[None]:
    """Within the block, token t of every forward (dim -2 of each adapted module's input) runs
    the adapter ``adapter_per_token[t]`` (None: the base model alone), whatever is active."""
    routes: dict[str, list[int]] = {}
    for t, name in enumerate(adapter_per_token):
        if name is not None:
            routes.setdefault(name, []).append(t)
    token = _ROUTES.set({n: torch.tensor(r, device=device) for n, r in routes.items()})
    try:
        yield
    finally:
        _ROUTES.reset(token)


def _active(module: nn.Module) -> Iterator[tuple[Adapter, torch.Tensor | None]]:
    routes = _ROUTES.get()
    names = getattr(module, "_active_adapters", ()) if routes is None else routes
    for name in names:
        a = module.adapters[name] if name in module.adapters else None  # noqa: SIM401 - ModuleDict
        if a is not None and not a.merged:
            yield a, None if routes is None else routes[name]


def _pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    for a, rows in _active(module):
        if rows is None:
            x = a.pre(module, x)
        else:
            x = x.index_copy(-2, rows, a.pre(module, x.index_select(-2, rows)))
    return (x, *args[1:]) if x is not args[0] else None


def _post_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    for a, rows in _active(module):
        if rows is None:
            out = a.post(module, x, out)
        else:
            part = a.post(module, x.index_select(-2, rows), out.index_select(-2, rows))
            out = out.index_copy(-2, rows, part)
    return out


def _install(module: nn.Module) -> None:
    if not hasattr(module, "adapters"):
        module.adapters = nn.ModuleDict()
        module._active_adapters = []
        module._peft_hooks = (module.register_forward_pre_hook(_pre_hook),
                              module.register_forward_hook(_post_hook))


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "_peft_hooks")}


# ---- applying, switching, merging -----------------------------------------------------------
def find_targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """Modules whose name equals a pattern, ends with ``.pattern``, or fully matches ``re:...``."""
    names = [n for n, _ in model.named_modules() if n and ".adapters" not in n]
    found: dict[str, nn.Module] = {}
    modules = dict(model.named_modules())
    for p in patterns:
        hits = [n for n in names if (re.fullmatch(p[3:], n) if p.startswith("re:")
                                     else n == p or n.endswith("." + p))]
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()})
            raise LeanLMError(f"target {p!r} matches no module; module names end with one of "
                              f"{suffixes} (or give a full name or 're:<regex>')")
        found.update({n: modules[n] for n in hits})
    return found


def apply_peft_(model: nn.Module, config: PeftConfig, name: str = "default") -> nn.Module:
    """Attach a new adapter ``name`` to every targeted module and make it the active one."""
    methods = _peft_types()
    method = methods.get(config.peft_type)
    if method is None:
        raise LeanLMError(f"unknown adapter type {config.peft_type!r}: known {sorted(methods)}")
    configs = peft_configs(model)
    if name in configs:
        raise LeanLMError(f"the model already has an adapter named {name!r}")
    adapter_cls = method.adapter_cls
    if hasattr(model, "unfuse_projections_"):  # adapters target q_proj, up_proj ... by name
        model.unfuse_projections_()
    shared: dict[str, Any] = {}  # parameters an adapter type shares across modules (Compacter)
    for mname, module in find_targets(model, config.resolved_targets()).items():
        _install(module)
        module.adapters[name] = adapter_cls(config, module, mname, shared)
    configs[name] = config
    set_adapter(model, name)
    return model


def peft_configs(model: nn.Module) -> dict[str, PeftConfig]:
    if not hasattr(model, "_peft_configs"):
        model._peft_configs = {}
    return model._peft_configs


def set_adapter(model: nn.Module, names: str | list[str] | None) -> None:
    """Make ``names`` the active adapters (None: run the base model alone)."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = set(names) - set(peft_configs(model))
    if unknown:
        raise LeanLMError(f"no adapter named {sorted(unknown)}; the model has {sorted(peft_configs(model))}")
    for module in adapted_modules(model).values():
        module._active_adapters = [n for n in names if n in module.adapters]


def mark_trainable_(model: nn.Module, names: list[str] | None = None) -> int:
    """Freeze everything but the parameters of adapters ``names`` (default: all); returns their count."""
    names = list(peft_configs(model)) if names is None else names
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    seen: set[int] = set()
    for module in adapted_modules(model).values():
        for n in names:
            if n in module.adapters:
                for p in module.adapters[n].parameters():
                    p.requires_grad_(True)
                    if id(p) not in seen:
                        seen.add(id(p))
                        count += p.numel()
    return count


def merge_(model: nn.Module, name: str = "default") -> None:
    """Fold adapter ``name`` into the base weights (LoRA, DoRA, IA3); it stops running."""
    for module in _modules_with(model, name):
        a = module.adapters[name]
        if not a.merged:
            a.merge(module)
            a.merged = True


def unmerge_(model: nn.Module, name: str = "default") -> None:
    for module in _modules_with(model, name):
        a = module.adapters[name]
        if a.merged:
            a.unmerge(module)
            a.merged = False


def _modules_with(model: nn.Module, name: str) -> list[nn.Module]:
    if name not in peft_configs(model):
        raise LeanLMError(f"no adapter named {name!r}; the model has {sorted(peft_configs(model))}")
    return [m for m in adapted_modules(model).values() if name in m.adapters]


def remove_peft_(model: nn.Module) -> None:
    """Detach every adapter (merged ones stay folded into the weights)."""
    for module in adapted_modules(model).values():
        for h in module._peft_hooks:
            h.remove()
        del module.adapters, module._active_adapters, module._peft_hooks
    model._peft_configs = {}


# ---- the peft on-disk format ------------------------------------------------------------------
def hf_path(name: str) -> str:
    """leanlm module name -> the Hugging Face Llama module path peft records."""
    return name if name.startswith("lm_head") else f"model.{name}"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's keys (``base_model.model.<HF path>.<param>``)."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in adapted_modules(model).items():
        if name in module.adapters:
            a = module.adapters[name]
            for k, v in a.to_peft({k: v.detach() for k, v in a.state_dict().items()}).items():
                key = k if k.startswith("shared.") else f"base_model.model.{hf_path(mname)}.{k}"
                out[key] = v.contiguous()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> Path:
    """Write adapter ``name`` as a peft directory (atomically: a temp dir renamed into place)."""
    from safetensors.torch import save_file

    config = peft_configs(model).get(name)
    if config is None:
        raise LeanLMError(f"no adapter named {name!r}; the model has {sorted(peft_configs(model))}")
    out = Path(path)
    with staged_dir(out) as tmp:
        save_file(adapter_state_dict(model, name), str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config.to_peft_json(), indent=2) + "\n")
    return out


def read_config(path: str | os.PathLike[str]) -> PeftConfig:
    p = Path(path) / "adapter_config.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LeanLMError(f"{p}: cannot read the adapter config ({e})") from e
    kind = d.get("peft_type")
    methods = _peft_types()
    if kind not in methods:
        raise LeanLMError(f"{p}: peft_type {kind!r} is not supported (supported: {sorted(methods)})")
    return methods[kind].config_cls.from_peft_json(d)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> PeftConfig:
    """Attach the adapter saved in ``path`` (peft's format) as ``name``; shapes are checked."""
    from safetensors.torch import load_file

    config = read_config(path)
    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise LeanLMError(f"{weights} is missing")
    state = load_file(str(weights))
    apply_peft_(model, config, name)
    expected = adapter_state_dict(model, name)
    problems = [f"{k}: missing" for k in expected if k not in state]
    problems += [f"{k}: the file has {tuple(state[k].shape)}, the model needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: not in the model" for k in state if k not in expected]
    if problems:
        remove_adapter_(model, name)
        raise LeanLMError(f"{path}: the adapter does not fit this base model: " + "; ".join(problems[:5]))
    for mname, module in adapted_modules(model).items():
        if name in module.adapters:
            a = module.adapters[name]
            prefix = f"base_model.model.{hf_path(mname)}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            own.update({k: v for k, v in state.items() if k.startswith("shared.")})
            mine = a.from_peft(own)
            with torch.no_grad():
                for k, t in a.state_dict(keep_vars=True).items():
                    t.copy_(mine[k].to(t.dtype))
    return config


def remove_adapter_(model: nn.Module, name: str) -> None:
    for module in _modules_with(model, name):
        del module.adapters[name]
        module._active_adapters = [n for n in module._active_adapters if n != name]
    del peft_configs(model)[name]
