"""Bad input to pretraining: clear errors, and a SIGKILL mid-save leaves a usable checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_config
from leanlm.errors import LeanLMError
from leanlm.train.trainer import Trainer


def run(cfg, stop_after=None) -> Trainer:
    trainer = Trainer(cfg, quiet=True)
    trainer.run(stop_after=stop_after)
    trainer.close()
    return trainer


def test_missing_and_empty_data_dir(tiny_data, tmp_path):
    with pytest.raises(LeanLMError, match="does not exist"):
        Trainer(tiny_config(tiny_data, tmp_path / "a", f"data={tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeanLMError, match="is empty"):
        Trainer(tiny_config(tiny_data, tmp_path / "b", f"data={tmp_path / 'empty'}"))
    with pytest.raises(LeanLMError, match="no training data"):
        Trainer(tiny_config(tiny_data, tmp_path / "c", "data="))


def test_recipe_that_does_not_fit_is_refused_before_starting(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "big", "model.hidden_size=4096", "model.num_layers=64",
                      "model.intermediate_size=16384", "model.num_heads=32", "model.num_kv_heads=8",
                      "model.max_position_embeddings=4096", "seq_len=4096", "micro_batch=64")
    with pytest.raises(LeanLMError, match=r"needs about \d+\.\d GiB .* only \d+\.\d GiB is available"):
        Trainer(cfg)
    assert not (tmp_path / "big").exists()  # refused before anything was written


def test_bad_overrides_and_config_values(tiny_data, tmp_path):
    with pytest.raises(LeanLMError, match="unknown setting 'lr_max'"):
        tiny_config(tiny_data, tmp_path, "lr_max=1")
    with pytest.raises(LeanLMError, match="expected key=value"):
        tiny_config(tiny_data, tmp_path, "lr")
    with pytest.raises(LeanLMError, match="ac must be"):
        tiny_config(tiny_data, tmp_path, "ac=most")
    with pytest.raises(LeanLMError, match="seq_len 9999 > the model's context"):
        tiny_config(tiny_data, tmp_path, "seq_len=9999")
    with pytest.raises(LeanLMError, match="cpu_offload"):
        Trainer(tiny_config(tiny_data, tmp_path / "o", "cpu_offload=true"))


@pytest.mark.parametrize("damage", ["metadata", "shard", "state"])
def test_corrupt_checkpoint_on_resume(tiny_data, tmp_path, damage):
    out = tmp_path / "run"
    run(tiny_config(tiny_data, out, "max_steps=6", "eval_every=0"), stop_after=3)
    ckpt = out / "checkpoints" / "step-000003"
    if damage == "metadata":
        (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    elif damage == "shard":
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(LeanLMError, match="corrupt"):
        Trainer(tiny_config(tiny_data, out, "max_steps=6", "eval_every=0"))


def test_sigkill_during_save_keeps_previous_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    straight = run(tiny_config(tiny_data, tmp_path / "straight", "max_steps=8", "eval_every=0",
                               "ckpt_every=3"))
    # a child process trains and is SIGKILLed half-way through writing its second checkpoint
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import torch.distributed.checkpoint as dcp
        from conftest import tiny_config
        from leanlm.train.trainer import Trainer
        saves = []
        original = dcp.FileSystemWriter.write_data
        def write_data(self, plan, planner):
            saves.append(1)
            if len(saves) == 2:
                (self.path / "__0_0.distcp").write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, plan, planner)
        dcp.FileSystemWriter.write_data = write_data
        cfg = tiny_config(({str(tiny_data[0])!r}, {str(tiny_data[1])!r}), {str(out)!r},
                          "max_steps=8", "eval_every=0", "ckpt_every=3")
        Trainer(cfg, quiet=True).run()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[0] == "step-000003" and names[1].startswith("step-000006.tmp")
    resumed = run(tiny_config(tiny_data, out, "max_steps=8", "eval_every=0", "ckpt_every=3"))
    assert resumed.losses == straight.losses[3:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]


def test_checkpoint_metadata_cannot_reach_a_callable(tmp_path):
    """A tampered .metadata naming anything outside DCP's records is refused, dotted names too."""
    import pickle

    from leanlm.train.checkpointing import SafeReader

    class Evil:
        def __reduce__(self):
            import operator

            return (operator.attrgetter, ("__class__",))

    for payload in (pickle.dumps(Evil()),
                    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c'torch.distributed.checkpoint.filesystem"
                    b"\x94\x8c\x13operator.attrgetter\x94\x93\x94."):
        (tmp_path / ".metadata").write_bytes(payload)
        with pytest.raises(LeanLMError, match="refers to"):
            SafeReader(tmp_path).read_metadata()
