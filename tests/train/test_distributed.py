"""2-process FSDP2 / DDP on gloo under torchrun give the single-process result; DCP reshards."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import pretrain_records

pytestmark = pytest.mark.dist

STEPS = 5


def pretrain(data: tuple[Path, Path], out: Path, *sets: str, nproc: int = 1,
             extra: tuple[str, ...] = ()) -> list[float]:
    return [r["loss"] for r in pretrain_records(data, out, *sets, nproc=nproc, steps=STEPS, extra=extra)]


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory) -> list[float]:
    return pretrain(tiny_data, tmp_path_factory.mktemp("single") / "run", "micro_batch=4")


@pytest.mark.parametrize("sets", [("parallel=fsdp",), ("parallel=fsdp", "reshard_after_forward=false"),
                                  ("parallel=fsdp", "ac=selective"), ("parallel=ddp",),
                                  ("parallel=ddp", "micro_batch=1", "grad_accum=2"),
                                  ("parallel=fsdp", "async_checkpoint=true", "ckpt_every=1")],
                         ids=["fsdp-zero3", "fsdp-zero2", "fsdp-selective-ac", "ddp", "ddp-grad-accum",
                              "fsdp-async-checkpoint-every-step"])
def test_two_processes_match_one(tiny_data, tmp_path, single, sets):
    two = pretrain(tiny_data, tmp_path / "run", "micro_batch=2", *sets, nproc=2)
    assert len(two) == len(single) == STEPS
    for a, b in zip(two, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_async_checkpoints_complete_and_resume(tiny_data, tmp_path, single):
    """Background saves every step: the newest ones are complete when the run ends, and a run
    stopped after 3 steps resumes from its (background-written) checkpoint to the same losses."""
    out = tmp_path / "run"
    first = pretrain(tiny_data, out, "micro_batch=4", "async_checkpoint=true", "ckpt_every=1",
                     extra=("--stop-after", "3"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert all((p / "trainer_state.json").is_file() for p in (out / "checkpoints").iterdir())
    (out / "metrics.jsonl").unlink()
    rest = pretrain(tiny_data, out, "micro_batch=4", "async_checkpoint=true", "ckpt_every=1")
    assert first + rest == single


def test_checkpoint_saved_by_two_processes_resumes_in_one(tiny_data, tmp_path, single):
    out = tmp_path / "run"
    first = pretrain(tiny_data, out, "micro_batch=2", "parallel=fsdp", nproc=2, extra=("--stop-after", "3"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    (out / "metrics.jsonl").unlink()
    rest = pretrain(tiny_data, out, "micro_batch=4")
    assert len(first) == 3 and len(rest) == STEPS - 3
    for a, b in zip(first + rest, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert (out / "model" / "model.safetensors").is_file()


def test_init_from_and_a_teacher_under_fsdp_match_one_process(tiny_data, tmp_path):
    """Starting weights loaded into FSDP shards, and distillation on each rank's micro-batches,
    give the single-process losses."""
    pretrain(tiny_data, tmp_path / "src", "micro_batch=4")
    src = f"init_from={tmp_path / 'src' / 'model'}"
    teacher = f"teacher={tmp_path / 'src' / 'model'}"  # a teacher equal to the start: KL 0 at first
    one = pretrain(tiny_data, tmp_path / "one", "micro_batch=4", src, teacher,
                   "distill_weight=0.5")
    two = pretrain(tiny_data, tmp_path / "two", "micro_batch=2", src, teacher, "distill_weight=0.5",
                   "parallel=fsdp", nproc=2)
    assert len(one) == len(two) == STEPS
    for a, b in zip(two, one, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
