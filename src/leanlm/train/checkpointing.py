"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), atomic and resumable.

A checkpoint ``OUT/checkpoints/step-000200/`` holds the model and AdamW state as DCP shards (each
rank writes its own FSDP shards; DCP's planner de-duplicates replicated tensors), the host RNG
state (the loop itself draws no random numbers: data order comes from the loader's seeded
permutation, and there is no dropout), and ``trainer_state.json`` (step, data-loader position,
config). Loading goes through DCP's resharding, so a checkpoint written by N processes loads
into M (``get_state_dict`` / ``set_state_dict`` speak fully qualified names whatever the
wrapping: FSDP, AC, compile).

Atomicity: everything is written to ``step-N.tmp-<nonce>/``; after a barrier rank 0 renames it to
``step-N`` (:func:`leanlm.fsutil.replace_dir`, then an fsync of the directory), so a run killed
mid-save (even by SIGKILL) leaves the previous checkpoint as the latest complete one and the
partial directory is ignored (and later removed).

Asynchronous saves (``async_checkpoint``; DCP's ``async_save``, as torchtitan's;
:class:`BackgroundSaver`): the step loop waits only for a copy of the state into host buffers kept
from save to save; background threads write the shards and then complete the checkpoint (the
rename) while the next steps run. A crash meanwhile leaves the previous checkpoint as the latest
complete one.

Safety: only tensors are stored through DCP (AdamW's hyper-parameters are rebuilt from the
config, not unpickled), and DCP's pickled ``.metadata`` is read with an unpickler that admits an
explicit list of globals (DCP's metadata records, ``torch.Size``, dtypes, a path) and nothing
else — no dotted names, no module prefixes — so a tampered checkpoint cannot reach a callable.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from leanlm.errors import LeanLMError
from leanlm.fsutil import fsync_dir, replace_dir

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_META = "torch.distributed.checkpoint.metadata"
# every global a DCP .metadata pickle refers to: DCP's own metadata records, torch.Size, dtypes,
# the layout lookup ("torch.strided") and the checkpoint id DCP records (a path)
_ALLOWED = {
    *((_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                          "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                          "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a DCP "
                                     "checkpoint never contains")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata is unpickled with an allow-list (see module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            if not isinstance(metadata, Metadata):
                raise ValueError(f"found {type(metadata).__name__}, expected DCP Metadata")
        except Exception as e:  # whatever the bytes were, say the file is bad
            raise LeanLMError(f"checkpoint {self.path} is corrupt or not a leanlm checkpoint: "
                              f"cannot read {path.name} ({e or type(e).__name__})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    return model_sd, optim_sd, tensors


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (partial ``.tmp`` dirs are skipped)."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
            and ".tmp" not in p.name and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


_SAVE_GROUPS: dict[Any, Any] = {}


def _save_group() -> Any:
    """A gloo group of all ranks for background saves (None in one process): DCP's thread runs its
    collectives there, never concurrently with the step's on the default group (torchtitan's way).
    One per default group (a process that re-initialises torch.distributed gets a fresh one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if world not in _SAVE_GROUPS:
        _SAVE_GROUPS.clear()
        _SAVE_GROUPS[world] = dist.new_group(backend="gloo")
    return _SAVE_GROUPS[world]


def _prepare(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             nonce: str) -> tuple[Path, Path, dict[str, Any]]:
    """The final and temporary directories of checkpoint ``step`` (a leftover temporary one of a
    killed run removed) and the state DCP writes."""
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp-{nonce or os.getpid()}"
    model_sd, _, optim_tensors = _tensor_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_tensors, "rng": {"cpu": torch.get_rng_state()}}
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return final, tmp, state


def _complete(tmp: Path, final: Path, trainer_state: dict[str, Any], keep: int, group: Any = None) -> None:
    """Once every rank's shards are written (a barrier on ``group``): rank 0 writes the trainer
    state, renames ``tmp`` to ``final`` durably and prunes to the newest ``keep``."""
    _barrier(group)
    if _rank() == 0:
        root = final.parent
        with open(tmp / "trainer_state.json", "w") as f:
            f.write(json.dumps(trainer_state, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, final)
        fsync_dir(root)  # make the rename itself durable
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for partial in root.glob("step-*.tmp-*"):
            shutil.rmtree(partial, ignore_errors=True)
    _barrier(group)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 2, nonce: str = "") -> Path:
    """Write ``root/step-NNNNNN`` atomically from all ranks; keep the newest ``keep``."""
    final, tmp, state = _prepare(root, step, model, optimizer, nonce)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))  # fsyncs its files
    _complete(tmp, final, trainer_state, keep)
    return final


class _StagingWriter(dcp.FileSystemWriter):
    """DCP's file writer, staging into host buffers that outlive it (:class:`BackgroundSaver`'s):
    DCP's own cache (``cache_staged_state_dict``) pins its buffers, which needs an accelerator."""

    def __init__(self, path: Path, cache: dict[str, Any]) -> None:
        super().__init__(path)
        self._cache = cache

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        self.per_thread_copy_ahead = 0  # (as DCP's: the staged state is in host memory already)
        staged = self._cache.get("state")
        if staged is not None:
            try:
                return _copy_state_dict(state_dict, staged)
            except (AssertionError, RuntimeError, KeyError, ValueError):  # another structure
                pass
        self._cache["state"] = _create_cpu_state_dict(state_dict)
        return _copy_state_dict(state_dict, self._cache["state"])


class BackgroundSaver:
    """Checkpoints written while the step loop goes on (``async_checkpoint``; DCP's ``async_save``,
    as torchtitan's). :meth:`save` waits for the previous save, copies the state into host buffers
    reused from save to save (no fresh allocation to page-fault in each time), and returns; DCP's
    thread writes the shards, and a thread of this saver then completes the checkpoint (trainer
    state, rename, pruning), its barriers on DCP's gloo group, not the step's. Until
    :meth:`wait` has returned, the previous checkpoint is the latest complete one."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leanlm-checkpoint")
        self._pending: Future | None = None

    def save(self, root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], keep: int = 2, nonce: str = "") -> Path:
        """Start checkpoint ``root/step-NNNNNN``; it is complete once :meth:`wait` returns."""
        self.wait()
        final, tmp, state = _prepare(root, step, model, optimizer, nonce)
        group = _save_group()
        shards = dcp.async_save(state, storage_writer=_StagingWriter(tmp, self._cache), process_group=group)

        def complete() -> None:
            shards.result()
            _complete(tmp, final, trainer_state, keep, group)

        self._pending = self._pool.submit(complete)
        return final

    def wait(self) -> None:
        """Wait for the save in flight, if any (its error, if it failed, is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place from ``path``; returns its trainer state."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file() or not (path / ".metadata").is_file():
        raise LeanLMError(f"checkpoint {path} is incomplete: expected .metadata and trainer_state.json")
    try:
        trainer_state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise LeanLMError(f"checkpoint {state_file} is corrupt ({e.msg})") from None
    model_sd, optim_sd, optim_tensors = _tensor_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_tensors, "rng": {"cpu": torch.get_rng_state()}}
    SafeReader(path).read_metadata()  # a clear error for a damaged .metadata, before DCP logs its own
    try:
        dcp.load(state, storage_reader=SafeReader(path))
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures (a BaseException)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise LeanLMError(f"checkpoint {path} is corrupt or does not match this model: {detail}") from None
    optim_sd.update(state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd,
                   options=_OPTIONS)
    torch.set_rng_state(state["rng"]["cpu"])
    return trainer_state


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (complete on rank 0; FSDP gathers it)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
