"""An engine core in a process of its own (vLLM v1's ``EngineCoreProc``): the scheduler, the KV
manager and the executor, in a busy loop between ZeroMQ sockets.

The core binds one PULL socket for its inputs (:data:`~leanlm.serve.messages.CoreInput` from every
API server) and connects one PUSH socket to each API server's output address. It first sends each
API server its :class:`~leanlm.serve.messages.EngineInfo`; then, while it has work, it drains its
inputs without blocking, runs one step and sends every API server the updates of its requests,
with the engine's figures; with nothing to do it blocks on its inputs. A dead worker
(``EngineDeadError``) fails every request in flight with a server error, says ``dead`` to every
API server, and ends the process with status 1. A ``Call`` of ``shutdown`` ends it with 0; so
does the death of the process that started it (``PR_SET_PDEATHSIG``), which leaves no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import zmq

from leanlm import kernels
from leanlm.checkpoint import load_model, resolve_dtype
from leanlm.config import ModelConfig
from leanlm.errors import LeanLMError
from leanlm.serve.compiled import packs
from leanlm.serve.core import EngineCore
from leanlm.serve.engine import EngineConfig, LLMEngine, num_kv_blocks
from leanlm.serve.executor import EngineDeadError, MultiprocExecutor, child_process
from leanlm.serve.messages import (
    Abort,
    AddRequest,
    Call,
    CallResult,
    CoreOutputs,
    EngineStats,
    core_input,
    encode,
)
from leanlm.serve.request import Request
from leanlm.serve.worker import WorkerSpec, worker_loop

log = logging.getLogger(__name__)


@dataclass
class CoreSpec:
    """How to build one engine core (one data-parallel replica)."""

    model: str  # a Hugging Face model directory
    engine: EngineConfig
    dtype: str | None = None
    index: int = 0  # its data-parallel rank
    tensor_parallel_size: int = 1
    backend: str = "uniproc"  # uniproc | mp | ray | torchrun (see serve/executor.py)
    draft_model: str | None = None
    loras: dict[str, str] = field(default_factory=dict)
    threads: int = 0  # torch threads of the core (uniproc) or of each rank (0: the machine's share)
    ray_address: str | None = None


def build_engine(spec: CoreSpec) -> LLMEngine:
    """The engine: the model in this process (``uniproc``), or in worker processes / Ray actors."""
    pack, fuse = packs(spec.engine.compile), kernels.fuse("cpu", serving=True)
    draft = load_model(spec.draft_model, dtype=spec.dtype, pack=pack, fuse=fuse) if spec.draft_model else None
    if spec.backend == "uniproc":
        if spec.tensor_parallel_size != 1:
            raise LeanLMError("--tensor-parallel-size > 1 needs the mp, ray or torchrun executor")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        engine = LLMEngine(load_model(spec.model, dtype=spec.dtype, pack=pack, fuse=fuse), spec.engine, draft)
    else:
        config = ModelConfig.from_json_file(Path(spec.model) / "config.json")
        dtype = resolve_dtype(spec.dtype) or resolve_dtype(config.torch_dtype) or torch.float32
        tp = spec.tensor_parallel_size

        def make(worker: WorkerSpec) -> object:
            worker = replace(worker, model=spec.model, dtype=spec.dtype, threads=spec.threads)
            if spec.backend == "ray":
                from leanlm.serve.ray_executor import RayExecutor

                return RayExecutor(worker, tp, spec.ray_address)
            return MultiprocExecutor(worker, tp, external_ranks=spec.backend == "torchrun")

        engine = LLMEngine.with_executor(config, spec.engine, dtype, tp, make, draft)
    for name, path in spec.loras.items():
        engine.add_lora(name, path)
    if spec.backend == "uniproc" and engine.runner.compiled is not None:
        engine.runner.compiled.warm_up()  # (worker processes warm their own: build_worker)
    return engine


def run_torchrun_worker(spec: CoreSpec) -> None:
    """A rank other than 0 under torchrun: one worker of the engine core that rank 0 runs; it
    meets the others through torchrun's rendezvous and the core's sockets on ``MASTER_ADDR``
    (ports ``MASTER_PORT + 1 ...``, see :class:`~leanlm.serve.executor.MultiprocExecutor`)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.tensor_parallel_size:
        raise LeanLMError(f"torchrun started {world} processes; --tensor-parallel-size is "
                          f"{spec.tensor_parallel_size}: they must be equal")
    config = ModelConfig.from_json_file(Path(spec.model) / "config.json")
    dtype = resolve_dtype(spec.dtype) or resolve_dtype(config.torch_dtype) or torch.float32
    draft = load_model(spec.draft_model, dtype=spec.dtype) if spec.draft_model else None
    e = spec.engine
    worker = WorkerSpec(num_kv_blocks(config, e, dtype, world, draft), e.block_size, e.kv_cache_dtype,
                        e.compile, e.max_loras, spec.model, spec.dtype, threads=spec.threads)
    host, base = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    inbox, outbox = f"tcp://{host}:{base + 1 + rank}", f"tcp://{host}:{base + 1 + world}"
    worker_loop(rank, world, "env://", worker, inbox, outbox)


def run_engine_core(spec: CoreSpec, input_addr: str, output_addrs: list[str]) -> None:
    """The process's life (see the module docstring)."""
    child_process(f"leanlm-core-{spec.index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when the core stops
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.bind(input_addr)
    outputs = [ctx.socket(zmq.PUSH) for _ in output_addrs]
    for sock, addr in zip(outputs, output_addrs, strict=True):
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 1 << 16)  # steps' outputs an API server may fall behind by
        sock.connect(addr)
    try:
        engine = build_engine(spec)
    except Exception as e:  # a bad model or flag: every API server hears why, then the core ends
        for sock in outputs:
            sock.send(encode(CoreOutputs(spec.index, dead=f"engine core {spec.index} failed to start: {e}")))
        raise
    code = CoreLoop(engine, spec.index, inputs, outputs).run()
    engine.executor.shutdown()
    for sock in (inputs, *outputs):
        sock.close()
    ctx.term()
    sys.exit(code)


class CoreLoop:
    def __init__(self, engine: LLMEngine, index: int, inputs: zmq.Socket, outputs: list[zmq.Socket]) -> None:
        self.engine, self.core, self.index = engine, EngineCore(engine), index
        self.inputs, self.outputs = inputs, outputs
        self.owner: dict[str, int] = {}  # request -> the API server it came from
        self.results: dict[int, list[CallResult]] = {}
        self.stats: EngineStats | None = None  # as last sent
        self.stop = False

    def run(self) -> int:
        info = encode(self.engine.info(self.index))
        for sock in self.outputs:
            sock.send(info)
        while not self.stop:
            if self.inputs.poll(0 if self.core.has_work() else None):
                self._drain()
            if self.stop:
                break
            try:
                updates = self.core.step() if self.core.has_work() else []
            except EngineDeadError as e:
                log.error("engine core %d: %s", self.index, e)
                self._send(self.core.fail_all(f"the engine died: {e}"), dead=str(e))
                return 1
            stats = self.engine.stats()
            if updates or self.results or stats != self.stats:  # (an abort changes only the figures)
                self._send(updates, stats=stats)
        return 0

    def _drain(self) -> None:
        while True:
            try:
                msg = core_input.decode(self.inputs.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(msg, AddRequest):
                self.owner[msg.request_id] = msg.front_end
                self.core.add(Request(msg.request_id, msg.prompt_token_ids, msg.sampling_params,
                                      eos_token_ids=tuple(self.engine.model_config.eos_token_ids),
                                      lora=msg.lora, priority=msg.priority, client=msg.client))
            elif isinstance(msg, Abort):
                self.core.abort(msg.request_ids)
            elif isinstance(msg, Call):
                self._call(msg)

    def _call(self, msg: Call) -> None:
        result = CallResult(msg.call_id)
        if msg.method == "shutdown":
            self.stop = True
        elif msg.method == "add_lora":
            try:
                self.engine.add_lora(*msg.args)
            except LeanLMError as e:
                result.error = str(e)
        else:
            result.error = f"unknown call {msg.method!r}"
        self.results.setdefault(msg.front_end, []).append(result)

    def _send(self, updates: list, dead: str | None = None, stats: EngineStats | None = None) -> None:
        by_front: dict[int, list] = {}
        for u in updates:
            front = self.owner.get(u.request_id, 0)
            by_front.setdefault(front, []).append(u)
            if u.finish_reason is not None:
                self.owner.pop(u.request_id, None)
        self.stats = stats = stats or self.engine.stats()
        for front, sock in enumerate(self.outputs):
            data = encode(CoreOutputs(self.index, by_front.get(front, []), stats, self.results.pop(front, []),
                                      dead))
            try:  # never block the engine on an API server that is gone (or 65,536 steps behind)
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("engine core %d: API server %d is not reading; its outputs are dropped",
                            self.index, front)
