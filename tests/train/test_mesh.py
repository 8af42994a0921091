"""The process mesh of a run (``parallel.dp / tp / pp``): set like any other setting, and checked
against the world size and the model in one line before any process builds the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from leanlm.errors import LeanLMError
from leanlm.train import get_recipe
from leanlm.train.config import ParallelConfig, TrainConfig, apply_overrides
from leanlm.train.parallelize import mesh_shape, parallel_mode


def cfg(*overrides: str) -> TrainConfig:
    return apply_overrides(get_recipe("tiny"), list(overrides))


def test_mesh_settings_are_overrides_and_the_old_mode_still_works():
    c = cfg("parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=false")
    assert (c.parallel.dp, c.parallel.tp, c.parallel.pp, c.parallel.sequence_parallel) == (2, 2, 1, False)
    assert cfg("parallel=fsdp").parallel == ParallelConfig(mode="fsdp")  # as before the mesh
    assert get_recipe("llama-3.2-1b").parallel.mode == "fsdp"  # (a recipe's parallel="fsdp")
    assert cfg().to_dict()["parallel"] == {"mode": "auto", "dp": 0, "tp": 1, "pp": 1,
                                           "sequence_parallel": True, "loss_parallel": True,
                                           "pp_schedule": "1f1b", "pp_microbatches": 0, "pp_virtual": 1}
    assert mesh_shape(cfg("parallel.pp=2", "eval_every=0"), 2) == (2, 1, 1)
    interleaved = ("parallel.pp_schedule=interleaved", "parallel.pp_virtual=2", "model.num_layers=4")
    assert mesh_shape(cfg("parallel.pp=2", *interleaved, "micro_batch=3", "eval_every=0"), 2) == (2, 1, 1)
    assert mesh_shape(cfg("parallel.pp=2", "parallel.tp=2", "eval_every=0"), 4) == (2, 1, 2)
    assert mesh_shape(cfg("parallel.tp=2"), 4) == (1, 2, 2)  # dp 0 = the rest of the world
    assert mesh_shape(cfg("parallel.dp=1", "parallel.tp=2"), 2) == (1, 1, 2)
    assert mesh_shape(cfg(), 1) == (1, 1, 1)
    assert parallel_mode(cfg("parallel.tp=2"), 2) == "none"  # one replica: nothing to shard over dp
    assert parallel_mode(cfg("parallel.tp=2"), 4) == "fsdp"


@pytest.mark.parametrize(("overrides", "message"), [
    (("parallel.mode=zero",), "train config: parallel.mode must be 'auto', 'none', 'ddp' or 'fsdp', "
                              "got 'zero'"),
    (("parallel.tp=0",), "train config: parallel.tp must be >= 1, got 0"),
    (("parallel.foo=1",), "override 'parallel.foo=1': unknown setting 'parallel.foo' (known: "
                          "parallel.dp, parallel.loss_parallel, parallel.mode, parallel.pp, "
                          "parallel.pp_microbatches, parallel.pp_schedule, parallel.pp_virtual, "
                          "parallel.sequence_parallel, parallel.tp)"),
    (("parallel.pp_schedule=zb",), "train config: parallel.pp_schedule must be 'gpipe', '1f1b' or "
                                   "'interleaved', got 'zb'"),
    (("parallel.pp_virtual=2",), "train config: parallel.pp_virtual=2 stages per rank needs "
                                 "parallel.pp_schedule=interleaved"),
    (("parallel.pp_virtual=0",), "train config: parallel.pp_virtual must be >= 1, got 0"),
])
def test_bad_mesh_settings(overrides, message):
    with pytest.raises(LeanLMError) as e:
        cfg(*overrides)
    assert str(e.value) == message


@pytest.mark.parametrize(("overrides", "world", "message"), [
    (("parallel.dp=3",), 2, "parallel.dp·tp·pp = 3·1·1 does not make a mesh of the 2 processes: set "
     "parallel.dp, parallel.tp and parallel.pp so that their product is the world size"),
    (("parallel.tp=2",), 3, "parallel.dp·tp·pp = (auto)·2·1 does not make a mesh of the 3 processes: set "
     "parallel.dp, parallel.tp and parallel.pp so that their product is the world size"),
    (("parallel.tp=3",), 3, "parallel.tp=3: tensor parallel size 3 does not divide the model's 4 "
     "attention heads"),
    (("parallel.tp=4",), 4, "parallel.tp=4: tensor parallel size 4 does not divide the model's 2 "
     "key/value heads (training cannot share a K/V head between ranks)"),
    (("parallel.tp=2", "model.intermediate_size=129"), 2, "parallel.tp=2: tensor parallel size 2 does "
     "not divide the model's MLP width 129"),
    (("parallel.tp=2", "seq_len=63"), 2, "parallel.tp=2: sequence parallelism splits each sequence "
     "between the 2 tensor-parallel ranks: seq_len 63 is not divisible by 2 (or set "
     "parallel.sequence_parallel=false)"),
    (("parallel.pp=3",), 3, "parallel.pp=3 pipeline stages but the model has 2 layers: each stage "
     "needs at least one"),
    (("parallel.tp=2", "parallel=ddp"), 4, "parallel.tp > 1 composes with parallel=fsdp (FSDP2 over "
     "the dp ranks), not with parallel=ddp"),
    (("parallel.pp=2", "parallel.tp=2", "eval_every=0"), 8, "parallel.pp=2: stages compose with tensor "
     "parallelism or with FSDP over dp ranks, not both yet (set parallel.dp=1 or parallel.tp=1)"),
    (("parallel.pp=2", "parallel=ddp", "eval_every=0"), 4, "parallel.pp=2: pipeline stages compose "
     "with parallel=fsdp over the dp ranks, not with ddp"),
    (("parallel.pp=2", "parallel.pp_microbatches=1", "eval_every=0"), 2, "parallel.pp=2: 1F1B needs at "
     "least as many micro-batches as stages: parallel.pp_microbatches=1"),
    (("parallel.pp=2", "parallel.pp_microbatches=3", "eval_every=0"), 2, "parallel.pp=2: "
     "parallel.pp_microbatches=3 does not divide micro_batch=4"),
    (("parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2"), 2, "parallel.pp=2 × "
     "pp_virtual=2 = 4 pipeline stages but the model has 2 layers: each stage needs at least one"),
    (("parallel.pp=2", "parallel.pp_schedule=interleaved", "micro_batch=5", "eval_every=0"), 2,
     "parallel.pp=2: interleaved 1F1B runs the micro-batches in max(1, m // pp) = 2 rounds of equal "
     "size: parallel.pp_microbatches=5 is not divisible by 2"),
    (("parallel.pp=2", "parallel.pp_schedule=interleaved", "eval_every=0"), 4, "parallel.pp=2: "
     "interleaved stages do not compose with FSDP over dp ranks yet (set parallel.dp=1)"),
    (("parallel.pp=2",), 2, "parallel.pp=2: evaluation does not run through the pipeline yet: set "
     "eval_every=0"),
    (("parallel=none",), 2, "parallel=none with 2 data-parallel ranks would train 2 separate models: "
     "use parallel=ddp or parallel=fsdp"),
])
def test_a_mesh_that_does_not_fit_is_one_line(overrides, world, message):
    with pytest.raises(LeanLMError) as e:
        parallel_mode(cfg(*overrides), world)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_sequence_parallel_off_lifts_its_constraint():
    assert mesh_shape(cfg("parallel.tp=2", "seq_len=63", "parallel.sequence_parallel=false"), 2) == (1, 1, 2)


def test_trainer_refuses_before_building_the_model(tiny_data, tmp_path, monkeypatch):
    """One process asked for a 2-way tensor-parallel mesh: refused before the process group, the
    output directory or the model exist."""
    import leanlm.train.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "Transformer", no_model)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LeanLMError, match=r"^parallel.dp·tp·pp = \(auto\)·2·1 does not make a mesh of the "
                                          r"1 processes"):
        trainer.Trainer(tiny_config(tiny_data, tmp_path / "run", "parallel.tp=2"))
    assert not (tmp_path / "run").exists()


@pytest.mark.dist
def test_torchrun_with_heads_not_divisible_exits_with_one_line(tiny_data, tmp_path):
    """Under torchrun the first process to get there prints the single error line and exits 2
    (torchrun then stops the others); no traceback; nothing was written (the check runs before
    the data is tokenized and the model built)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
            "-m", "leanlm.cli", "pretrain", "--recipe", "tiny", "--quiet", "--data", str(tiny_data[0]),
            "--tokenizer", str(tiny_data[1]), "--out", str(tmp_path / "run"), "--set", "parallel.tp=3"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    line = ("error: parallel.tp=3: tensor parallel size 3 does not divide the model's 4 attention heads")
    assert line in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "LeanLMError" not in proc.stderr
    assert not (tmp_path / "run").exists()
