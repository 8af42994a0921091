"""The training loop in one process: learning, AC / grad-accum invariance, exact resume, export,
starting from a checkpoint, distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from leanlm.errors import LeanLMError
from leanlm.train.trainer import Trainer, lr_at


def train(data: tuple[Path, Path], out: Path, *overrides: str, stop_after: int | None = None) -> Trainer:
    trainer = Trainer(tiny_config(data, out, *overrides), quiet=True)
    trainer.run(stop_after=stop_after)
    trainer.close()
    return trainer


def test_loss_decreases_and_exports_hf_model(tiny_data, tmp_path):
    trainer = train(tiny_data, tmp_path / "run", "max_steps=30", "lr=1e-2")
    assert trainer.losses[-1] < trainer.losses[0] - 1.0
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    # the export is a plain HF checkpoint: transformers reproduces our logits
    import transformers

    from leanlm import load_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = load_model(model_dir)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(result["eval"]) == {"mycode", "mydocs", "myliterature"}
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["mem_gib"] > 0 for r in steps)
    # running a finished run again changes nothing: no steps, same result, model kept
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    again = Trainer(tiny_config(tiny_data, tmp_path / "run", "max_steps=30", "lr=1e-2"), quiet=True)
    out = again.run()
    again.close()
    assert out["eval"] == result["eval"] and not again.losses
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_keeps_the_result(tiny_data, tmp_path, ac):
    base = train(tiny_data, tmp_path / "base", "max_steps=4", "eval_every=0")
    ckpt = train(tiny_data, tmp_path / ac, "max_steps=4", "eval_every=0", f"ac={ac}")
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(base.losses), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_keeps_the_result(tiny_data, tmp_path):
    one = train(tiny_data, tmp_path / "one", "max_steps=4", "eval_every=0", "micro_batch=4")
    acc = train(tiny_data, tmp_path / "acc", "max_steps=4", "eval_every=0", "micro_batch=2", "grad_accum=2")
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(one.losses), rtol=1e-5, atol=1e-6)


def test_interrupted_and_resumed_run_matches_exactly(tiny_data, tmp_path):
    straight = train(tiny_data, tmp_path / "a", "max_steps=8", "ckpt_every=3", "eval_every=0")
    first = train(tiny_data, tmp_path / "b", "max_steps=8", "ckpt_every=3", "eval_every=0", stop_after=5)
    assert first.step == 5
    resumed = train(tiny_data, tmp_path / "b", "max_steps=8", "ckpt_every=3", "eval_every=0")
    # the interrupted run saved at step 5 (stop) -> the resumed one continues from there
    assert first.losses + resumed.losses == straight.losses


def test_bf16_training_runs(tiny_data, tmp_path):
    trainer = train(tiny_data, tmp_path / "bf16", "max_steps=6", "precision=bf16", "lr=1e-2")
    assert trainer.losses[-1] < trainer.losses[0]


def test_schedules():
    from leanlm.train import get_recipe
    from leanlm.train.config import apply_overrides

    cfg = apply_overrides(get_recipe("tiny"), ["max_steps=100", "warmup_steps=10", "lr=1.0",
                                               "min_lr_ratio=0.1"])
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 54) == pytest.approx(0.55)  # cosine midpoint: r + (1-r)/2
    assert lr_at(cfg, 99) == pytest.approx(0.1)  # the last step run reaches min_lr_ratio * lr
    wsd = apply_overrides(cfg, ["schedule=wsd", "decay_fraction=0.2"])
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0
    assert lr_at(wsd, 89) == pytest.approx(0.55) and lr_at(wsd, 99) == pytest.approx(0.1)


@pytest.mark.slow
def test_compiled_blocks_keep_the_result(tiny_data, tmp_path):
    base = train(tiny_data, tmp_path / "base", "max_steps=3", "eval_every=0")
    compiled = train(tiny_data, tmp_path / "compiled", "max_steps=3", "eval_every=0", "compile=true",
                     "ac=full")
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(base.losses), rtol=1e-4, atol=1e-5)


def test_init_from_starts_at_a_checkpoints_weights_and_rejects_other_shapes(tiny_data, tmp_path):
    from leanlm import load_model

    train(tiny_data, tmp_path / "src", "max_steps=5", "eval_every=0", "lr=1e-2")
    src = load_model(tmp_path / "src" / "model")
    run = Trainer(tiny_config(tiny_data, tmp_path / "run", f"init_from={tmp_path / 'src' / 'model'}"),
                  quiet=True)
    for name, value in src.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[name], value)
    run.close()
    with pytest.raises(LeanLMError, match="init_from=.*do not fit"):
        Trainer(tiny_config(tiny_data, tmp_path / "bad", f"init_from={tmp_path / 'src' / 'model'}",
                            "model.hidden_size=48"), quiet=True)


def test_distilling_from_a_teacher_brings_the_student_to_its_distribution(tiny_data, tmp_path):
    """A fresh student trained on the teacher's distributions (the KL is the logged loss) ends up
    much closer to the teacher than a student trained as long on the data alone."""
    from leanlm import load_model
    from leanlm.eval.agreement import next_token_kl

    train(tiny_data, tmp_path / "teacher", "max_steps=30", "eval_every=0", "lr=1e-2")
    teacher_dir = tmp_path / "teacher" / "model"
    kd = train(tiny_data, tmp_path / "kd", "max_steps=30", "eval_every=0", "lr=1e-2", "seed=1",
               f"teacher={teacher_dir}")
    train(tiny_data, tmp_path / "data", "max_steps=30", "eval_every=0", "lr=1e-2", "seed=1")
    assert kd.losses[-1] < kd.losses[0] / 4
    teacher = load_model(teacher_dir)
    ids = torch.from_numpy(np.concatenate(list(kd.val.values())).astype(np.int64))  # held-out text
    kl = {name: next_token_kl(teacher, load_model(tmp_path / name / "model"), ids, 32)
          for name in ("kd", "data")}
    assert kl["kd"] < kl["data"] / 2, kl
    with pytest.raises(LeanLMError, match="same tokenizer"):
        Trainer(tiny_config(tiny_data, tmp_path / "bad", f"teacher={teacher_dir}", "model.vocab_size=1024"),
                quiet=True)
