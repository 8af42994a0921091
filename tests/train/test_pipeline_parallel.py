"""Pipeline parallelism on gloo under torchrun gives the single-process run: PP=2 with GPipe,
1F1B and interleaved 1F1B (2 stages per rank, on 4 layers), PP×FSDP 2×2 and PP×TP 2×2 (sequence
parallel, vocabulary-parallel loss; GPipe, 1F1B and interleaved) match 5 steps of the tiny recipe
(tied embeddings: the two stages' copies stay one matrix, sharded alike under TP) in losses and
gradient norms to 1e-4, with gradient accumulation and AC too; its checkpoint resumes in one
process; stages keep the whole model's parameter names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import pretrain_records
from leanlm.model import Transformer
from leanlm.train import get_recipe
from leanlm.train.config import apply_overrides
from leanlm.train.pipeline import Skip, split_model_, stage_layers

REL = 1e-4


def assert_same_run(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), (key, g["step"], g[key], w[key])


def test_stages_split_the_layers_and_keep_their_names():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]
    cfg = get_recipe("tiny").model
    names = {}
    for stage in range(2):
        with torch.device("meta"):
            model = split_model_(Transformer(cfg), 2, stage)
        names[stage] = {n for n, _ in model.named_parameters()}
        assert isinstance(model.layers[1 - stage], Skip)
    with torch.device("meta"):
        whole = {n for n, _ in Transformer(cfg).named_parameters()}
    assert names[0] & names[1] == set()
    assert names[0] | names[1] == whole | {"lm_head.weight"}  # the last stage's copy of the tied matrix
    assert "embed_tokens.weight" in names[0] and "layers.1.mlp.up_proj.weight" in names[1]


def test_interleaved_ranks_hold_every_pp_th_stage():
    """4 layers, 2 ranks × 2 stages: rank 0 runs stages 0 and 2 (layers 0 and 2), rank 1 stages
    1 and 3; the whole model's names still."""
    cfg = apply_overrides(get_recipe("tiny"), [DEEP]).model
    with torch.device("meta"):
        models = [split_model_(Transformer(cfg), 2, rank, virtual=2) for rank in range(2)]
    assert [[list(c) for c in m.pp_chunks] for m in models] == [[[0], [2]], [[1], [3]]]
    assert [isinstance(layer, Skip) for layer in models[0].layers] == [False, True, False, True]
    assert "layers.2.mlp.up_proj.weight" in dict(models[0].named_parameters())


@pytest.fixture(scope="module")
def single_out(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain_records(tiny_data, out, "micro_batch=4", "eval_every=0")
    return out


def records_of(out: Path) -> list[dict[str, Any]]:
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.mark.dist
@pytest.mark.parametrize(("nproc", "sets"), [
    (2, ("micro_batch=4", "parallel.pp_schedule=gpipe")),
    (2, ("micro_batch=4", "parallel.pp_schedule=1f1b")),
    (2, ("micro_batch=2", "grad_accum=2", "parallel.pp_microbatches=2", "ac=full")),
    (4, ("micro_batch=2", "parallel.dp=2", "parallel.pp_microbatches=2")),
    (4, ("micro_batch=4", "parallel.tp=2", "parallel.pp_schedule=gpipe")),
    (4, ("micro_batch=4", "parallel.tp=2", "parallel.sequence_parallel=false")),
], ids=["gpipe", "1f1b", "1f1b-accum-ac", "pp2xfsdp2", "pp2xtp2-gpipe", "pp2xtp2-1f1b-nosp"])
def test_two_stages_match_one_process(tiny_data, tmp_path, single_out, nproc, sets):
    """The same global batch of 4 sequences: one pipeline of 4 micro-batches, 2 steps of 2, or
    (pp2xfsdp2) 2 replicas of the pipeline, each stage FSDP2-sharded over 2 ranks, or (pp2xtp2)
    one pipeline whose stages are tensor-parallel over 2 ranks each (sending sequence chunks
    between stages, or whole activations without sequence parallelism)."""
    got = pretrain_records(tiny_data, tmp_path / "run", "parallel.pp=2", *sets, nproc=nproc)
    single = records_of(single_out)
    assert len(got) == 5 and single[-1]["loss"] < single[0]["loss"] - 0.5
    assert_same_run(got, single)


@pytest.mark.dist
@pytest.mark.parametrize(("nproc", "sets"), [(2, ("micro_batch=4",)),
                                            (4, ("micro_batch=2", "parallel.dp=2")),
                                            (4, ("micro_batch=4", "parallel.tp=2"))],
                         ids=["pp2", "pp2xfsdp2", "pp2xtp2"])
def test_pipeline_checkpoint_resumes_in_one_process(tiny_data, tmp_path, single_out, nproc, sets):
    """Each stage writes its own layers (FSDP or TP shards of them) into one DCP checkpoint; one process
    loads them all (the tied matrix from either copy) and continues with the same losses; the
    exported model (rank 0 gathers the stages) is the single-process run's."""
    from safetensors.torch import load_file

    got = pretrain_records(tiny_data, tmp_path / "pp", *sets, "parallel.pp=2", nproc=nproc)
    assert_same_run(got, records_of(single_out))
    out = tmp_path / "resume"
    shutil.copytree(tmp_path / "pp" / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    rest = pretrain_records(tiny_data, out, "micro_batch=4")
    assert_same_run(rest, records_of(single_out)[3:])
    got = load_file(tmp_path / "pp" / "model" / "model.safetensors")
    want = load_file(single_out / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert float((got[k] - w).abs().max()) <= 1e-4 * float(w.abs().max()) + 1e-6, k


DEEP = "model.num_layers=4"  # (two stages on each of two ranks: a layer each)
INTERLEAVED = ("parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2")


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2xtp2"])
def test_interleaved_stages_match_one_process_and_resume(tiny_data, tmp_path, tp):
    """Interleaved 1F1B, 2 ranks × 2 stages (each over ``tp`` ranks), 4 micro-batches: the
    single-process run's losses and gradient norms; its checkpoint (each rank's two stages, one
    model's names) resumes in one process, and the gathered export is the single-process run's
    model."""
    from safetensors.torch import load_file

    single = pretrain_records(tiny_data, tmp_path / "single", DEEP, "micro_batch=4")
    got = pretrain_records(tiny_data, tmp_path / "pp", DEEP, "micro_batch=4", *INTERLEAVED,
                           f"parallel.tp={tp}", nproc=2 * tp)
    assert single[-1]["loss"] < single[0]["loss"] - 0.5
    assert_same_run(got, single)
    out = tmp_path / "resume"
    shutil.copytree(tmp_path / "pp" / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    assert_same_run(pretrain_records(tiny_data, out, DEEP, "micro_batch=4"), single[3:])
    got_model = load_file(tmp_path / "pp" / "model" / "model.safetensors")
    want = load_file(tmp_path / "single" / "model" / "model.safetensors")
    assert got_model.keys() == want.keys()
    # to 1e-3 of the tensor's largest entry: a wrong stage or shard in the export is off by the
    # weights themselves, while Adam's normalized steps carry the runs' last-bit gradient
    # differences into the weights (a CPU without bf16 instructions: 8.7e-6 on a max of 0.074)
    for k, w in want.items():
        assert float((got_model[k] - w).abs().max()) <= 1e-3 * float(w.abs().max()) + 1e-6, k
