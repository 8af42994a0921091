"""The processes of a run: rank, device, process group and the mesh they form.

Under ``torchrun`` every process reads its rank and the world size from the environment, checks
the mesh the config asks for (:func:`leanlm.train.parallelize.mesh_shape`: before any collective,
so a bad mesh fails alike and at once on every rank) and joins one process group (NCCL on GPUs,
gloo on CPUs; a group of one when a single process asks for FSDP or DDP). The mesh is

    ("dp",)         dp = world        data parallelism alone (FSDP2 / DDP), as before meshes
    ("dp", "tp")    dp × tp           tp innermost: rank = d·tp + t, so a replica's tp ranks are
                                      neighbours (one node, its fast links)
    ("pp", "dp")    pp × dp           pipeline stages, each FSDP2-sharded over its dp ranks (if
                                      dp > 1)
    ("pp", "dp", "tp")  pp × dp × tp  pipeline stages, each tensor-parallel over its tp ranks
                                      (dp = 1 for now: :func:`mesh_shape` refuses PP × TP × FSDP)

and ``dp_rank`` says which data-parallel replica a process belongs to: the loader gives every
replica its own sequences and the tp ranks (and pipeline stages) of one replica the same ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from leanlm.errors import LeanLMError
from leanlm.train.config import TrainConfig
from leanlm.train.parallelize import mesh_shape


def attempt_store(world: int) -> dist.Store:
    """The torchrun agent's store, with keys of this restart attempt only.

    Under ``torchrun`` the workers share the agent's TCPStore across restarts (torch 2.13 no
    longer prefixes it per attempt), so a restarted rank can read a dead rank's gloo/nccl
    address left by the previous attempt and wait for it forever. A prefix per
    ``TORCHELASTIC_RESTART_COUNT`` makes every attempt's keys its own (what older torch did).
    """
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return dist.PrefixStore(f"leanlm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", tcp)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # ("dp",), ("dp", "tp"), ("pp", "dp") or ("pp", "dp", "tp"): see the module docstring
    dp_rank: int = 0  # which data-parallel replica this process is (the tp ranks of one share it)
    dp: int = 1
    pp: int = 1  # pipeline stages (each process runs one)

    @classmethod
    def setup(cls, cfg: TrainConfig) -> DistInfo:
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise LeanLMError("device=cuda but no CUDA GPU is visible")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        pp, dp, tp = mesh_shape(cfg, world)  # a bad mesh fails here, before any collective
        needs_pg = world > 1 or cfg.parallel.mode in ("ddp", "fsdp")
        if needs_pg and not dist.is_initialized():
            backend = "nccl" if want_cuda else "gloo"
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                dist.init_process_group(backend, store=attempt_store(world), rank=rank, world_size=world)
            elif "MASTER_ADDR" in os.environ:
                dist.init_process_group(backend)
            else:  # one process asked for FSDP/DDP: a group of one
                store = dist.HashStore()
                dist.init_process_group(backend, store=store, rank=0, world_size=1)
        mesh = None
        if dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh

            rank, world = dist.get_rank(), dist.get_world_size()
            if pp > 1 and tp > 1:  # each stage tensor-parallel over its tp ranks (neighbours)
                mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
            elif pp > 1:
                mesh = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
            elif tp > 1:  # tp innermost: a replica's tp ranks are neighbours (one node, fast links)
                mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
            else:
                mesh = init_device_mesh(device.type, (world,))
        return cls(rank, world, local, device, mesh, (rank // tp) % dp, dp, pp)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


