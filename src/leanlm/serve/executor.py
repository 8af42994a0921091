"""Executors: how the engine core runs a ``SchedulerOutput`` on the model's ranks (vLLM v1's
``Executor``). The engine core never touches the model itself; it calls :meth:`Executor.execute`
and gets one ``ModelRunnerOutput`` back, or :meth:`Executor.collective_rpc` for calls every rank
must make (registering and loading adapters).

- :class:`UniProcExecutor` (``uniproc``): one rank, in the engine core's own process;
- :class:`MultiprocExecutor` (``mp``): one worker process per rank, spawned here; with
  ``external_ranks`` (``torchrun``) only the local rank 0 is spawned and the other ranks are the
  processes torchrun started on this and other machines, which connect over TCP;
- ``ray``: the ranks as Ray actors (:mod:`leanlm.serve.ray_executor`).

Messages go over ZeroMQ: one PUSH socket per rank (a rank's messages arrive in order, none is
dropped however late it connects) and one PULL socket for the replies. While waiting for a reply
the executor polls its workers' liveness: a rank that died (killed, out of memory) or crashed
raises :class:`EngineDeadError` within a poll interval instead of leaving the engine core blocked.
Worker processes ask the kernel to kill them when their parent dies (``PR_SET_PDEATHSIG``), so a
killed engine core leaves no orphans behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from multiprocessing.connection import wait
from typing import Any

import zmq

from leanlm.errors import LeanLMError
from leanlm.serve.messages import Execute, Stop, WorkerCall, WorkerReply, encode, worker_reply
from leanlm.serve.outputs import ModelRunnerOutput
from leanlm.serve.scheduler import SchedulerOutput
from leanlm.serve.worker import Worker, WorkerSpec, worker_loop

BACKENDS = ("uniproc", "mp", "torchrun", "ray")
POLL_MS = 100  # how often a waiting executor checks that its workers are alive


class EngineDeadError(RuntimeError):
    """A rank died or crashed: the engine cannot continue."""


class Executor(ABC):
    world: int = 1

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``Worker.method(*args)`` on every rank; their results (LeanLMError if one refused)."""

    def shutdown(self) -> None:
        return None


class UniProcExecutor(Executor):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(out)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_process(name: str) -> None:
    """Linux: name this process (``/proc/PID/comm``, what ``top`` and ``ps -o comm`` show) and have
    the kernel SIGKILL it when the process that started it dies."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, name.encode()[:15])  # PR_SET_NAME
    except (OSError, AttributeError):
        return
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os._exit(1)


def _spawned_worker(rank: int, *args: Any) -> None:
    child_process(f"leanlm-rank-{rank}")
    worker_loop(rank, *args)


class MultiprocExecutor(Executor):
    """``world`` ranks in worker processes (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, world: int, external_ranks: bool = False,
                 host: str = "127.0.0.1", start_timeout: float = 600.0) -> None:
        self.world = world
        self.ctx = zmq.Context()
        self.tmp = None
        if external_ranks:  # torchrun: the ranks meet through its rendezvous; sockets on TCP
            host = os.environ.get("MASTER_ADDR", host)
            base = int(os.environ.get("MASTER_PORT", "29500"))
            init_method = "env://"
            addrs = [f"tcp://{host}:{base + 1 + i}" for i in range(world + 1)]
            bind = [f"tcp://*:{base + 1 + i}" for i in range(world + 1)]
        else:
            self.tmp = tempfile.mkdtemp(prefix="leanlm-workers-")
            init_method = f"tcp://127.0.0.1:{free_port()}"
            addrs = bind = [f"ipc://{self.tmp}/{i}" for i in range(world + 1)]
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(bind[world])
        self.inboxes = []
        for i in range(world):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(bind[i])
            self.inboxes.append(s)
        if not spec.threads:  # the machine's cores shared between the local ranks
            local = 1 if external_ranks else world
            spec = replace(spec, threads=max(1, (os.cpu_count() or 1) // local))
        context = mp.get_context("spawn")
        self.procs = []
        for rank in range(1 if external_ranks else world):
            p = context.Process(target=_spawned_worker, name=f"leanlm-worker-{rank}", daemon=True,
                                args=(rank, world, init_method, spec, addrs[rank], addrs[world]))
            p.start()
            self.procs.append(p)
        self.pids = [self._recv(start_timeout, startup=True).result for _ in range(world)]

    def _check_alive(self) -> None:
        dead = wait([p.sentinel for p in self.procs], timeout=0)
        if dead:
            p = next(p for p in self.procs if p.sentinel in dead)
            raise EngineDeadError(f"worker {p.name} (pid {p.pid}) died with exit code {p.exitcode}")

    def _recv(self, timeout: float | None = None, startup: bool = False) -> WorkerReply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.replies.poll(POLL_MS):
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise EngineDeadError(f"the workers did not {'start' if startup else 'answer'} "
                                      f"within {timeout:.0f} s")
        reply = worker_reply.decode(self.replies.recv())
        if reply.crash is not None:
            raise EngineDeadError(f"worker crashed: {reply.crash}")
        return reply

    def _send(self, data: bytes) -> None:
        for s in self.inboxes:
            while True:  # a PUSH socket whose worker is gone would block: watch the workers meanwhile
                try:
                    s.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self._check_alive()
                    time.sleep(POLL_MS / 1000)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._send(encode(Execute(out)))
        reply = self._recv()
        if reply.error is not None:  # (a single rank's failed step: see worker_loop)
            raise (LeanLMError if reply.bad_input else RuntimeError)(reply.error)
        assert reply.output is not None, "rank 0 answers every step"
        return reply.output

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._send(encode(WorkerCall(method, list(args))))
        replies = sorted((self._recv() for _ in range(self.world)), key=lambda r: r.rank)
        failed = [r for r in replies if r.error is not None]
        if failed:
            raise (LeanLMError if failed[0].bad_input else RuntimeError)(failed[0].error)
        return [r.result for r in replies]

    def shutdown(self) -> None:
        for s in self.inboxes:  # (a worker that is gone gets nothing)
            with contextlib.suppress(zmq.ZMQError):
                s.send(encode(Stop()), zmq.NOBLOCK)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for s in (*self.inboxes, self.replies):
            s.close(linger=0)
        self.ctx.term()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
