"""An API server's connection to its engine cores (vLLM v1's ``EngineCoreClient``): one PUSH socket
to each core's input, one PULL socket on which every core sends this API server its outputs.

:meth:`CoreClient.start` waits for each core's :class:`~leanlm.serve.messages.EngineInfo` (or its
failure to start). Requests go to the core the :class:`~leanlm.serve.router.Router` picks
(data parallelism); a reader task hands every step's updates to the front end (``deliver``) and
keeps each core's latest :class:`~leanlm.serve.messages.EngineStats`. A core is dead when it says
so (its executor lost a worker) or when its process is gone (checked every ``WATCH_S`` seconds):
its requests in flight fail with a server error, the router stops using it, and when no core is
left :attr:`CoreClient.dead` says why (``/health`` turns 503 and the server exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import zmq
import zmq.asyncio

from leanlm.errors import LeanLMError
from leanlm.serve.messages import (
    Abort,
    AddRequest,
    Call,
    EngineInfo,
    EngineStats,
    RequestUpdate,
    core_outputs,
    encode,
    engine_info,
)
from leanlm.serve.request import Request
from leanlm.serve.router import Router

log = logging.getLogger(__name__)
WATCH_S = 0.5


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class CoreClient:
    def __init__(self, input_addrs: list[str], output_addr: str, front_end: int = 0,
                 policy: str = "prefix") -> None:
        self.input_addrs, self.output_addr = input_addrs, output_addr
        self.front_end, self.policy = front_end, policy
        self.deliver: Callable[[list[RequestUpdate]], None] = lambda updates: None
        self.infos: dict[int, EngineInfo] = {}
        self.stats: dict[int, EngineStats] = {}
        self.dead: str | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.tasks: list[asyncio.Task] = []
        self.router: Router | None = None  # once started

    @property
    def info(self) -> EngineInfo:
        return self.infos[min(self.infos)]

    async def start(self, timeout: float = 600.0) -> None:
        """Connect, and wait for every core's handshake (LeanLMError if one failed to start)."""
        self.ctx = zmq.asyncio.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.output_addr)
        self.push = []
        for addr in self.input_addrs:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            self.push.append(sock)
        while len(self.infos) < len(self.input_addrs):
            data = await asyncio.wait_for(self.pull.recv(), timeout)
            try:
                info = engine_info.decode(data)
            except Exception:
                failed = core_outputs.decode(data)
                raise LeanLMError(failed.dead or "an engine core failed to start") from None
            self.infos[info.engine_index] = info
        self.router = Router(len(self.input_addrs), self.info.block_size, self.policy)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]

    def submit(self, request: Request) -> None:
        if self.dead is not None:
            raise LeanLMError(self.dead)
        p = request.sampling_params
        core = self.router.route(request.request_id, request.prompt_token_ids, request.lora or "")
        self.push[core].send(encode(AddRequest(request.request_id, request.prompt_token_ids, p,
                                               request.lora, request.priority, request.client,
                                               self.front_end)))

    def abort(self, request_id: str) -> None:
        core = self.router.where.get(request_id)
        if core is not None:
            self.push[core].send(encode(Abort([request_id])))

    async def _read(self) -> None:
        while True:
            out = core_outputs.decode(await self.pull.recv())
            if out.stats is not None:
                self.stats[out.engine_index] = out.stats
            for u in out.updates:
                if u.finish_reason is not None:
                    self.router.finished(u.request_id)
            if out.updates:
                self.deliver(out.updates)
            if out.dead is not None:
                self._core_died(out.engine_index, out.dead)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            for index, info in list(self.infos.items()):
                if index in self.router.load and not alive(info.pid):
                    self._core_died(index, f"engine core {index} (pid {info.pid}) exited")

    def _core_died(self, index: int, reason: str) -> None:
        if index not in self.router.load:
            return
        log.error("engine core %d is dead: %s", index, reason)
        lost = self.router.remove(index)
        self.stats.pop(index, None)
        self.deliver([RequestUpdate(rid, [], [], "error", 0, 0, f"the engine died: {reason}", 500)
                      for rid in lost])
        if not self.router.load:
            self.dead = reason

    async def shutdown(self) -> None:
        """Ask every live core to stop, and close the sockets."""
        live = self.router.load if self.router is not None else {}
        for index, sock in enumerate(getattr(self, "push", [])):
            if index in live:
                with contextlib.suppress(zmq.ZMQError):
                    await sock.send(encode(Call(-1, "shutdown", [], self.front_end)))
        for task in self.tasks:
            task.cancel()
        await asyncio.sleep(0)
        if self.ctx is not None:
            for sock in (self.pull, *self.push):
                sock.close(linger=500)
            self.ctx.term()
