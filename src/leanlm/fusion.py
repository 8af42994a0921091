"""Fused projections: q/k/v as one linear and gate/up as one linear, for inference.

The projections of one input are one product by their stacked weights, split afterwards:

    [q, k, v] = x [W_q; W_k; W_v]ᵀ (+ [b_q; b_k; b_v]),      [g, u] = x [W_gate; W_up]ᵀ

Each output column depends on its own weight row only, so the split results are the parts'
results: a decode step launches one product (one oneDNN call, one dequantizing kernel) per group
instead of three or two, and reads x once. Stacking along out_features is exact for any linear
whose output rows are independent given one input layout: plain bf16/fp32 weights, and
weight-only quantized ones (RTN, GPTQ, AWQ; 2-8 bits) whose codes, scales and zeros are per
output row, as long as they share bits, group size and ``g_idx``. GPTQ quantizes q/k/v (and
gate/up) against the Hessian of the one input they share, so act-order layers get the same
permutation and fuse; layers whose ``g_idx`` differ (say, quantized apart by another tool) are
left apart, as is any group the protocol below refuses.

How a class fuses is registered (:func:`register_fuser`): ``concat(parts)`` gives the one module
(or None: these parts cannot be one), ``split(module, sizes)`` the parts again, and ``shared``
names the state its parts share instead of stacking (``g_idx``). The model's
:class:`~leanlm.kernels.cpu_linear.Linear` is registered here, packed or not;
:mod:`leanlm.quant.fused` registers ``QuantLinear``. Not fused, whatever their class: modules with
adapters (their hooks act on their own outputs), tensor-parallel shards (DTensor weights,
``tp_shard``), and classes nobody registered (W8A8, LLM.int8(), FP8 layers).

Names stay Hugging Face's: the owner of a fused linear (an ``Attention``, an ``MLP``) gets a
state-dict hook that writes the fused entries back under the parts' names, in the parts' order,
and a load hook that stacks them again, so ``state_dict()``, ``save_model`` and
``load_state_dict`` see ``q_proj``/``k_proj``/``v_proj`` as before (the split entries are
copies: safetensors refuses tensors that share memory). What needs the part *modules* —
``quantize_``, ``apply_peft_``, ``tensor_parallel_``, training — unfuses first
(``Transformer.unfuse_projections_``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanlm.kernels.cpu_linear import Linear, is_packed_weight

PLAIN = (nn.Parameter, torch.Tensor)
_FUSED = "_fused_groups"  # the owner's attribute: fused name -> _Group


@dataclass(frozen=True)
class Fuser:
    """How modules of one class stack (see the module docstring)."""

    concat: Callable[[Sequence[Any]], nn.Module | None]
    split: Callable[[Any, Sequence[int]], list[nn.Module]]
    shared: tuple[str, ...] = ()


FUSERS: dict[type, Fuser] = {}


def register_fuser(cls: type, fuser: Fuser) -> None:
    """Let :func:`fuse_` stack modules of exactly ``cls``."""
    FUSERS[cls] = fuser


@dataclass
class _Group:
    parts: tuple[str, ...]
    sizes: list[int]
    shared: tuple[str, ...]  # state entries the parts share (not stacked)


def groups(owner: nn.Module) -> dict[str, _Group]:
    return owner.__dict__.get(_FUSED, {})


def fused(owner: nn.Module, name: str) -> tuple[nn.Module, list[int]] | None:
    """The fused linear ``name`` of ``owner`` and its parts' output sizes (None: not fused)."""
    group = groups(owner).get(name)
    return None if group is None else (owner._modules[name], group.sizes)


def fusable(module: nn.Module | None) -> bool:
    """Whether ``module`` may be stacked with others (see the module docstring)."""
    if type(module) not in FUSERS:
        return False
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return (not hasattr(module, "adapters") and not hasattr(module, "tp_shard")
            and all(type(t) in PLAIN for t in tensors))


def fuse_(owner: nn.Module, parts: Sequence[str], name: str,
          after: Callable[[torch.Tensor], None] | None = None) -> bool:
    """Replace the children ``parts`` of ``owner`` by one child ``name`` (in the first part's
    place) whose output is theirs concatenated; returns whether it did. ``after(weight)`` is
    called with each part's plain weight once the fused copy exists."""
    modules = [owner._modules.get(p) for p in parts]
    if name in groups(owner) or len({type(m) for m in modules}) != 1 or not all(map(fusable, modules)):
        return False
    plain = [m.weight for m in modules if isinstance(getattr(m, "weight", None), torch.Tensor)]
    fuser = FUSERS[type(modules[0])]
    one = fuser.concat(modules)
    if one is None:
        return False
    _replace(owner, {parts[0]: {name: one}, **{p: {} for p in parts[1:]}})
    if _FUSED not in owner.__dict__:  # the hooks stay (and do nothing once nothing is fused)
        owner.register_state_dict_post_hook(_save_hook)
        owner.register_load_state_dict_pre_hook(_load_hook)
        owner.__dict__[_FUSED] = {}
    groups(owner)[name] = _Group(tuple(parts), [m.out_features for m in modules], fuser.shared)
    if after is not None:
        for w in plain:
            if not is_packed_weight(w):
                after(w)
    return True


def unfuse_(owner: nn.Module) -> int:
    """Put back the parts of every fused linear of ``owner``; returns how many were split."""
    found = groups(owner)
    n = len(found)
    for name, group in list(found.items()):
        one = owner._modules[name]
        parts = FUSERS[type(one)].split(one, group.sizes)
        _replace(owner, {name: dict(zip(group.parts, parts, strict=True))})
        del found[name]
    return n


def _concat_linear(parts: Sequence[Linear]) -> Linear | None:
    """One Linear with the parts' weights (and biases) stacked; None where they differ in input
    size, dtype, device or in having a bias. Packed parts give a packed result (their plain
    layout comes back one part at a time, is stacked, and packed again)."""
    first = parts[0]
    key = lambda p: (p.in_features, p.weight.dtype, p.weight.device, p.bias is None)
    if any(key(p) != key(first) for p in parts):
        return None
    packed = any(p.is_packed for p in parts)
    for p in parts:
        p.unpack_()
    one = Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                 device="meta", dtype=first.weight.dtype)
    one.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]),
                              requires_grad=first.weight.requires_grad)
    if first.bias is not None:
        one.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),
                                requires_grad=first.bias.requires_grad)
    if packed:
        one.pack_()
    return one


def _split_linear(one: Linear, sizes: Sequence[int]) -> list[nn.Module]:
    """Linears of ``sizes`` output features with weights (and biases) of their own, packed
    where ``one`` is."""
    packed = one.is_packed
    one.unpack_()
    w, b = one.weight, one.bias
    biases = [None] * len(sizes) if b is None else b.detach().split(list(sizes))
    parts: list[nn.Module] = []
    for wi, bi in zip(w.detach().split(list(sizes)), biases, strict=True):
        part = Linear(one.in_features, wi.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
        part.weight = nn.Parameter(wi.clone(), requires_grad=w.requires_grad)
        if bi is not None:
            part.bias = nn.Parameter(bi.clone(), requires_grad=b.requires_grad)
        if packed:
            part.pack_()
        parts.append(part)
    return parts


register_fuser(Linear, Fuser(_concat_linear, _split_linear))


def _replace(owner: nn.Module, changes: dict[str, dict[str, nn.Module]]) -> None:
    """Rename children in place, keeping their order: each key of ``changes`` becomes its
    (possibly empty) mapping of new children."""
    children = list(owner._modules.items())
    owner._modules.clear()
    for key, child in children:
        owner._modules.update(changes.get(key, {key: child}))


def _save_hook(owner: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """``state_dict()`` in the parts' names and order: owner's entries are the last ones written,
    so they are taken out and put back with each fused entry split where it stood."""
    if not groups(owner):
        return
    mine = [(k, state.pop(k)) for k in [k for k in state if k.startswith(prefix)]]
    for name, group in groups(owner).items():
        head = f"{prefix}{name}."
        entries = {k[len(head):]: v for k, v in mine if k.startswith(head)}
        split: list[tuple[str, Any]] = []
        for i, part in enumerate(group.parts):
            split += [(f"{prefix}{part}.{key}",
                       v.clone() if key in group.shared else v.split(group.sizes)[i].clone())
                      for key, v in entries.items()]
        at = next((j for j, (k, _) in enumerate(mine) if k.startswith(head)), len(mine))
        mine = [*mine[:at], *split, *[(k, v) for k, v in mine[at:] if not k.startswith(head)]]
    state.update(mine)


def _load_hook(owner: nn.Module, state: dict[str, Any], prefix: str, _meta: Any, _strict: bool,
               _missing: list[str], _unexpected: list[str], errors: list[str]) -> None:
    """``load_state_dict`` of the parts' entries: stacked into the fused ones (shared entries
    must agree); a state that already has the fused names (or misses parts) is left alone."""
    for name, group in groups(owner).items():
        heads = [f"{prefix}{part}." for part in group.parts]
        keys = [k[len(heads[0]):] for k in state if k.startswith(heads[0])]
        if not all(h + key in state for h in heads for key in keys):
            continue
        for key in keys:
            values = [state.pop(h + key) for h in heads]
            if key in group.shared:
                if not all(torch.equal(v, values[0]) for v in values[1:]):
                    errors.append(f"{prefix}{name}: the parts' {key} differ, so they cannot be one "
                                  "fused linear (unfuse_projections_ first)")
                state[f"{prefix}{name}.{key}"] = values[0]
            else:
                state[f"{prefix}{name}.{key}"] = torch.cat(values)
