"""A worker: one rank of the serving engine's model — its shard of the weights, its slice of the paged
K/V cache (:class:`~leanlm.serve.model_runner.ModelRunner`) and the adapters loaded into it.

With the in-process executor the engine core holds one :class:`Worker`. With the multiprocess,
Ray or torchrun executors each rank runs :func:`worker_loop` in a process of its own: the ranks
form one ``torch.distributed`` group (gloo on CPU, NCCL on GPU), shard the model with the
tensor-parallel plan, and then serve the engine core's messages (:mod:`leanlm.serve.messages`)
in order — a ``SchedulerOutput`` to execute (every rank runs the forward, whose collectives keep
them in step; rank 0 sends the ``ModelRunnerOutput`` back), a call (adapters), or stop.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
import zmq
from torch.distributed.device_mesh import DeviceMesh

from leanlm import kernels
from leanlm.errors import LeanLMError
from leanlm.model import Transformer
from leanlm.parallel import tensor_parallel_, tp_mesh
from leanlm.serve.compiled import packs
from leanlm.serve.lora import LoRAManager
from leanlm.serve.messages import Execute, Stop, WorkerCall, WorkerReply, encode, worker_input
from leanlm.serve.model_runner import ModelRunner
from leanlm.serve.outputs import ModelRunnerOutput
from leanlm.serve.paged import kv_cache_dtype
from leanlm.serve.scheduler import SchedulerOutput


@dataclass
class WorkerSpec:
    """How to build a worker: the engine's cache settings, and the model a worker process loads."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: str  # auto | int8 | fp8
    compile: bool
    max_loras: int
    model: str = ""  # a Hugging Face model directory (worker processes)
    dtype: str | None = None
    device: str = "cpu"
    threads: int = 0  # torch threads per rank (0: torch's default)


class Worker:
    def __init__(self, model: Transformer, spec: WorkerSpec) -> None:
        kv_dtype = kv_cache_dtype(spec.kv_cache_dtype, model.embed_tokens.weight.dtype)
        self.model = model.eval()
        self.runner = ModelRunner(model, spec.num_blocks, spec.block_size, kv_dtype, spec.compile)
        self.loras = LoRAManager(model, spec.max_loras)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)

    def register_lora(self, name: str, path: str) -> None:
        self.loras.register(name, path)

    def ensure_lora(self, name: str, busy: list[str]) -> None:
        self.loras.ensure_loaded(name, set(busy))

    def registered_loras(self) -> list[str]:
        return list(self.loras)

    def resident_loras(self) -> list[str]:
        return list(self.loras.resident)


def init_distributed(rank: int, world: int, init_method: str, device: str) -> DeviceMesh:
    """Join the ranks' process group (gloo on CPU, NCCL on GPU); the tensor-parallel mesh."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return tp_mesh(world)


def build_worker(rank: int, world: int, init_method: str, spec: WorkerSpec) -> Worker:
    """Load the model and shard it over the ranks (tensor parallelism) when there are several."""
    from leanlm.checkpoint import load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    mesh = init_distributed(rank, world, init_method, spec.device) if world > 1 else None
    # one rank packs its weights at load; ranks of a tensor-parallel group shard plain ones
    alone = mesh is None
    model = load_model(spec.model, dtype=spec.dtype, device=spec.device, pack=alone and packs(spec.compile),
                       fuse=alone and kernels.fuse(spec.device, serving=True))
    if mesh is not None:
        tensor_parallel_(model, mesh)
    worker = Worker(model, spec)
    if worker.runner.compiled is not None:
        worker.runner.compiled.warm_up()
    return worker


def worker_loop(rank: int, world: int, init_method: str, spec: WorkerSpec, inbox: str, outbox: str) -> None:
    """A worker process's life: build, say ready, then serve the engine core's messages until
    :class:`Stop`. A failed call is answered with its error, as is a failed step of a single
    rank; a failed step of one of several ranks, or anything failing outside a message, is
    reported as a crash and ends the process (the engine core then fails)."""
    ctx = zmq.Context()
    recv, send = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    recv.connect(inbox)
    send.connect(outbox)
    send.setsockopt(zmq.LINGER, 5000)
    try:
        worker = build_worker(rank, world, init_method, spec)
        send.send(encode(WorkerReply(rank, result=os.getpid())))
        while True:
            msg = worker_input.decode(recv.recv())
            if isinstance(msg, Stop):
                break
            try:
                if isinstance(msg, Execute):
                    out = worker.execute(msg.scheduler_output)
                    if rank == 0:
                        send.send(encode(WorkerReply(rank, output=out)))
                elif isinstance(msg, WorkerCall):
                    send.send(encode(WorkerReply(rank, result=getattr(worker, msg.method)(*msg.args))))
            except Exception as e:
                # ranks that went different ways cannot meet in their next collective: with
                # several, a failed step is the end (the engine core fails); alone, the engine
                # core recovers from it as from an in-process failure
                if world > 1 and isinstance(msg, Execute):
                    raise
                send.send(encode(WorkerReply(rank, error=f"{type(e).__name__}: {e}",
                                             bad_input=isinstance(e, LeanLMError))))
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            send.send(encode(WorkerReply(rank, crash=f"rank {rank}: {traceback.format_exc(limit=8)}")))
        raise
    finally:
        send.close()
        recv.close(linger=0)
        ctx.term()
