"""The Ray executor (``--distributed-executor-backend ray``): the model's ranks as Ray actors, for
clusters that already run Ray (RayLLM, vLLM's ``RayDistributedExecutor``).

A placement group reserves one bundle per rank (``PACK``: on as few nodes as possible, so
tensor-parallel collectives stay local where they can); each actor is a :class:`_RayWorker`
holding a :class:`~leanlm.serve.worker.Worker`. The actors join one ``torch.distributed`` group
through a TCP store on rank 0's node, then every step sends each of them the same msgspec-encoded
``SchedulerOutput`` (bytes: nothing of the request is pickled) and waits for all of them, keeping
rank 0's ``ModelRunnerOutput``. A dead actor raises Ray's ``RayActorError``, turned into
:class:`~leanlm.serve.executor.EngineDeadError`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from leanlm.errors import LeanLMError
from leanlm.serve.executor import EngineDeadError, Executor, free_port
from leanlm.serve.messages import Execute, WorkerCall, WorkerReply, encode, worker_input, worker_reply
from leanlm.serve.outputs import ModelRunnerOutput
from leanlm.serve.scheduler import SchedulerOutput
from leanlm.serve.worker import Worker, WorkerSpec, build_worker


class _RayWorker:
    """The actor: a worker that answers the executor's messages as bytes."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.rank = 0

    def address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0")

    def build(self, rank: int, world: int, init_method: str, spec: WorkerSpec) -> int:
        import os

        self.rank = rank
        self.worker = build_worker(rank, world, init_method, spec)
        return os.getpid()

    def handle(self, data: bytes) -> bytes | None:
        msg = worker_input.decode(data)
        assert self.worker is not None
        if isinstance(msg, Execute):
            out = self.worker.execute(msg.scheduler_output)
            return encode(WorkerReply(self.rank, output=out)) if self.rank == 0 else None
        assert isinstance(msg, WorkerCall)
        try:
            return encode(WorkerReply(self.rank, result=getattr(self.worker, msg.method)(*msg.args)))
        except Exception as e:
            return encode(WorkerReply(self.rank, error=f"{type(e).__name__}: {e}",
                                      bad_input=isinstance(e, LeanLMError)))


class RayExecutor(Executor):
    def __init__(self, spec: WorkerSpec, world: int, address: str | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.world = world
        threads = spec.threads or 1
        self.pg = placement_group([{"CPU": threads}] * world, strategy="PACK")
        ray.get(self.pg.ready(), timeout=300)
        actor = ray.remote(_RayWorker)
        self.actors = [actor.options(num_cpus=threads, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=rank)).remote() for rank in range(world)]
        ip, port = ray.get(self.actors[0].address.remote())
        spec = replace(spec, threads=threads)
        self.pids = self._get([a.build.remote(rank, world, f"tcp://{ip}:{port}", spec)
                               for rank, a in enumerate(self.actors)])

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise EngineDeadError(f"a Ray worker failed: {e}") from e

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        data = encode(Execute(out))
        replies = self._get([a.handle.remote(data) for a in self.actors])
        output = worker_reply.decode(replies[0]).output
        assert output is not None, "rank 0 answers every step"
        return output

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        data = encode(WorkerCall(method, list(args)))
        replies = [worker_reply.decode(r) for r in self._get([a.handle.remote(data) for a in self.actors])]
        failed = [r for r in replies if r.error is not None]
        if failed:
            raise (LeanLMError if failed[0].bad_input else RuntimeError)(failed[0].error)
        return [r.result for r in replies]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)

