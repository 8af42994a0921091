"""A resumable pipeline of document stages over input shards, run by a local or a Ray executor.

Model (datatrove's): every input file is a *task*; a task streams its documents through the
stages (each an iterator transform: a filter, a mapper, a dedup filter) and writes one output
shard. Tasks are independent, so an executor runs them in parallel:

- :class:`LocalExecutor`: a pool of worker processes on this machine (all cores by default);
- :class:`RayExecutor`: Ray tasks on a cluster (``pip install 'leanlm[ray]'``; ``address=None``
  starts a local Ray instance).

Resumability: a finished task writes ``OUT/.done/NNNNN.json`` (its shard's manifest entry and
statistics) after its shard has been renamed into place, so a re-run skips finished tasks and a
crash never leaves a partial shard under its final name. The pipeline's description is kept in
``OUT/.pipeline.json``; re-running a different pipeline into the same folder is refused. At the
end ``stats.json`` (documents in/out per stage, removals per rule, bad lines) and
``manifest.json`` are written from the markers.

Multi-pass jobs (dedup, DSIR) use the same executors for their own per-task steps.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from leanlm.data.io import ReadConfig, ReadErrors, ShardWriter, list_inputs, read_documents
from leanlm.errors import LeanLMError
from leanlm.fsutil import write_json

T = TypeVar("T")
R = TypeVar("R")
Doc = dict[str, Any]


@dataclass
class StageStats:
    docs_in: int = 0
    docs_out: int = 0
    removed: Counter = field(default_factory=Counter)  # rule -> documents removed

    def merge(self, other: dict[str, Any]) -> None:
        self.docs_in += other["docs_in"]
        self.docs_out += other["docs_out"]
        self.removed.update(other["removed"])

    def as_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "removed": dict(self.removed)}


@dataclass
class Context:
    """What a stage knows of the task it runs in."""

    task: int  # the task (input file) index
    text_field: str = "text"


class Stage(ABC):
    """A step of the pipeline: ``stage(docs, stats, ctx)`` yields the documents it keeps."""

    name = "stage"

    @abstractmethod
    def __call__(self, docs: Iterator[Doc], stats: StageStats, ctx: Context) -> Iterator[Doc]:
        """The documents that pass, with removals counted in ``stats.removed`` by rule."""

    def describe(self) -> dict[str, Any]:
        """What identifies this stage's behaviour (for the re-run check)."""
        return {"stage": self.name, **(asdict(self) if is_dataclass(self) else {})}


class Filter(Stage):
    """A stage that keeps or removes each document by its text; ``reason`` names the rule."""

    @abstractmethod
    def reason(self, text: str) -> str | None:
        """The rule that removes ``text`` (``"filter:rule"``), or None to keep it."""

    def __call__(self, docs: Iterator[Doc], stats: StageStats, ctx: Context) -> Iterator[Doc]:
        for doc in docs:
            why = self.reason(doc[ctx.text_field])
            if why is None:
                yield doc
            else:
                stats.removed[why] += 1


@dataclass
class ListedIndices(Stage):
    """Keep (or drop) the documents whose positions in their input file a previous pass listed
    in ``folder/NNNNN.npy`` (one file per task): how multi-pass jobs apply their decisions."""

    folder: str
    keep: bool
    rule: str
    name: str = "listed"

    def __call__(self, docs: Iterator[Doc], stats: StageStats, ctx: Context) -> Iterator[Doc]:
        listed = set(np.load(Path(self.folder) / f"{ctx.task:05d}.npy").tolist())
        for i, doc in enumerate(docs):
            if (i in listed) == self.keep:
                yield doc
            else:
                stats.removed[self.rule] += 1


# ---- executors --------------------------------------------------------------------------------
class LocalExecutor:
    """Runs ``fn`` over items in ``workers`` processes (1: in this process)."""

    def __init__(self, workers: int | None = None, progress: bool = True) -> None:
        self.workers = workers or len(os.sched_getaffinity(0))
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "tasks") -> list[R]:
        results: list[R | None] = [None] * len(items)
        with _progress(self.progress) as bar:
            job = bar.add_task(desc, total=len(items))
            if self.workers == 1 or len(items) <= 1:
                for i, item in enumerate(items):
                    results[i] = fn(item)
                    bar.advance(job)
            else:
                ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
                with ctx.Pool(min(self.workers, len(items))) as pool:
                    for i, r in pool.imap_unordered(_Indexed(fn), list(enumerate(items))):
                        results[i] = r
                        bar.advance(job)
        return results  # type: ignore[return-value]


class RayExecutor:
    """Runs ``fn`` over items as Ray tasks (``address=None``: a local Ray instance)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 progress: bool = True) -> None:
        try:
            import ray
        except ImportError as e:
            raise LeanLMError("the Ray executor needs ray: pip install 'leanlm[ray]'") from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "tasks") -> list[R]:
        remote = self.ray.remote(_apply)
        fn_ref = self.ray.put(_Indexed(fn))  # shipped to the object store once, not per task
        pending = [remote.remote(fn_ref, (i, item)) for i, item in enumerate(items)]
        results: list[R | None] = [None] * len(items)
        with _progress(self.progress) as bar:
            job = bar.add_task(desc, total=len(items))
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                i, r = self.ray.get(done[0])
                results[i] = r
                bar.advance(job)
        return results  # type: ignore[return-value]


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    """The Ray task: one call of the mapped function."""
    return fn(item)


Executor = LocalExecutor | RayExecutor


@dataclass
class _Indexed:
    fn: Callable[[Any], Any]

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        return item[0], self.fn(item[1])


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, transient=True)


# ---- the pipeline -----------------------------------------------------------------------------
@dataclass
class Task:
    index: int
    path: Path
    root: Path | None  # the input folder (for text files' ids)


@dataclass
class Pipeline:
    """Input folder/file -> stages -> ``OUT/NNNNN.jsonl.gz`` shards + stats.json + manifest.json."""

    stages: list[Stage]
    read: ReadConfig = field(default_factory=ReadConfig)
    compression: str = "gzip"

    def describe(self) -> dict[str, Any]:
        return {"stages": [s.describe() for s in self.stages], "read": asdict(self.read),
                "compression": self.compression}

    def run(self, inputs: str | os.PathLike[str], out: str | os.PathLike[str],
            executor: Executor | None = None) -> dict[str, Any]:
        """Run every unfinished task, then write stats.json and manifest.json; returns the stats."""
        files = list_inputs(inputs)
        root = Path(inputs) if Path(inputs).is_dir() else None
        out_dir = Path(out)
        claim_output(out_dir, self.describe())
        tasks = [Task(i, f, root) for i, f in enumerate(files)]
        pending = [t for t in tasks if not marker(out_dir, t.index).exists()]
        (executor or LocalExecutor()).map(_TaskRunner(self, out_dir), pending, desc="pipeline")
        names = [s.name for s in self.stages]
        names = [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]
        return finish(out_dir, len(tasks), names)

    def documents(self, task: Task, stats: list[StageStats], errors: ReadErrors) -> Iterator[Doc]:
        """Task ``task``'s documents after every stage."""
        docs: Iterator[Doc] = read_documents(task.path, self.read, errors, task.root)
        ctx = Context(task.index, self.read.text_field)
        for stage, st in zip(self.stages, stats, strict=True):
            docs = _counted(stage(_counted(docs, st, "docs_in"), st, ctx), st, "docs_out")
        return docs


@dataclass
class _TaskRunner:
    pipeline: Pipeline
    out: Path

    def __call__(self, task: Task) -> None:
        stats = [StageStats() for _ in self.pipeline.stages]
        errors = ReadErrors()
        writer = ShardWriter(self.out, f"{task.index:05d}", self.pipeline.compression)
        try:
            for doc in self.pipeline.documents(task, stats, errors):
                writer.write(doc)
        except BaseException:
            writer.abort()
            raise
        shard = writer.close()
        write_json(marker(self.out, task.index), {
            "task": task.index, "input": str(task.path), "shard": shard,
            "stages": [s.as_dict() for s in stats],
            "read_errors": {"count": errors.count, "messages": errors.messages}})


def _counted(docs: Iterable[Doc], stats: StageStats, attr: str) -> Iterator[Doc]:
    for doc in docs:
        setattr(stats, attr, getattr(stats, attr) + 1)
        yield doc


def marker(out: Path, index: int) -> Path:
    return out / ".done" / f"{index:05d}.json"


def claim_output(out: Path, description: dict[str, Any]) -> None:
    """Create ``out`` for this job, or check that a partial run in it was the same job."""
    (out / ".done").mkdir(parents=True, exist_ok=True)
    spec = out / ".pipeline.json"
    if spec.exists():
        previous = json.loads(spec.read_text())
        if previous != json.loads(json.dumps(description)):
            raise LeanLMError(f"{out} holds the output of a different job ({spec}); "
                              "use a new output folder or delete it")
    else:
        write_json(spec, description)


def finish(out: Path, num_tasks: int, stage_names: list[str]) -> dict[str, Any]:
    """stats.json and manifest.json from the task markers."""
    stages = [StageStats() for _ in stage_names]
    shards, bad, messages = [], 0, []
    for i in range(num_tasks):
        m = json.loads(marker(out, i).read_text())
        for st, d in zip(stages, m["stages"], strict=True):
            st.merge(d)
        shards.append(m["shard"])
        bad += m["read_errors"]["count"]
        messages += m["read_errors"]["messages"]
    stats = {"tasks": num_tasks, "documents": sum(s["documents"] for s in shards),
             "stages": {name: st.as_dict() for name, st in zip(stage_names, stages, strict=True)},
             "bad_lines": {"count": bad, "messages": messages[:20]}}
    write_json(out / "stats.json", stats)
    write_json(out / "manifest.json", {"documents": stats["documents"],
                                       "bytes": sum(s["bytes"] for s in shards), "shards": shards})
    return stats
