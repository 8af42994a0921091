"""Which LoRA adapters the engine serves, and which are loaded into the model (multi-LoRA serving,
S-LoRA / Punica style: one base model, each request names its adapter, a batch mixes them).

Adapters are registered by name with a peft directory and loaded on first use; at most
``max_loras`` stay resident, and when a new one is needed the least recently used adapter that no
unfinished request uses is unloaded (an error when every slot serves running requests). A loaded
adapter is never active by default: the model runner routes each token through its request's
adapter (:func:`leanlm.peft.api.routed`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.parallel import shard_adapters_
from leanlm.peft.api import load_adapter as load_peft_adapter
from leanlm.peft.api import read_config, remove_adapter_, set_adapter


class LoRAManager:
    """The registered adapters (``name in manager``, iteration gives their names) and the resident ones."""

    def __init__(self, model: Transformer, max_loras: int) -> None:
        self.model, self.max_loras = model, max_loras
        self.paths: dict[str, Path] = {}
        self.resident: OrderedDict[str, bool] = OrderedDict()  # loaded, least recently used first

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def register(self, name: str, path: str | os.PathLike[str]) -> None:
        """A missing or unsupported adapter fails now, not at its first request."""
        if name in self.paths:
            raise LeanLMError(f"an adapter named {name!r} is already registered")
        read_config(path)
        self.paths[name] = Path(path)

    def ensure_loaded(self, name: str, busy: set[str | None]) -> None:
        """Load ``name`` (if it is not resident), unloading an adapter outside ``busy`` for room."""
        if name not in self.paths:
            raise LeanLMError(f"unknown LoRA adapter {name!r}: registered ones are {sorted(self.paths)}")
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        if len(self.resident) >= self.max_loras:
            idle = next((n for n in self.resident if n not in busy), None)
            if idle is None:
                raise LeanLMError(f"all {self.max_loras} adapter slots serve running requests; "
                                  f"retry when one finishes (or raise max_loras)")
            remove_adapter_(self.model, idle)
            del self.resident[idle]
        path = self.paths[name]
        load_peft_adapter(self.model, path, name)
        if getattr(self.model, "tp_mesh", None) is not None:  # a tensor-parallel rank: its share
            shard_adapters_(self.model)
        if name in getattr(self.model.lm_head, "adapters", {}):
            # the runner computes the head on the sampled rows only: the token routing of a
            # mixed batch does not apply there
            remove_adapter_(self.model, name)
            del self.paths[name]
            raise LeanLMError(f"{path}: adapters on lm_head cannot be served in mixed batches")
        set_adapter(self.model, None)  # requests pick their adapter; the base runs otherwise
        self.resident[name] = True
