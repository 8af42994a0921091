"""DoReMi on the tiny 3-domain corpus, and the trainer's domain-mixture sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from leanlm.data.tokens import MixtureLoader
from leanlm.errors import LeanLMError
from leanlm.train.doremi import DoReMiConfig, ProxyTrainer, doremi
from leanlm.train.trainer import Trainer


def test_trainer_samples_domains_by_weights_from_a_file(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text(json.dumps({"domain_weights": {"mycode": 1.0}}))
    t = Trainer(tiny_config(tiny_data, tmp_path / "run", f"domain_weights={tmp_path / 'w.json'}",
                            "max_steps=2"), quiet=True)
    try:
        assert isinstance(t.loader, MixtureLoader) and t.loader.p.tolist() == [1.0, 0.0, 0.0]
        t.run()
    finally:
        t.close()


def test_doremi_produces_weights_and_resumes(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, "max_steps=12", "eval_every=0", "ckpt_every=6")
    result = doremi(tiny_data[0], tmp_path / "doremi", cfg, DoReMiConfig(), quiet=True)
    w = result["domain_weights"]
    assert set(w) == {"mycode", "mydocs", "myliterature"} and abs(sum(w.values()) - 1) < 1e-9
    assert min(w.values()) > 0 and result["steps"] == 12
    assert json.loads((tmp_path / "doremi" / "weights.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "doremi" / "reference" / "model" / "config.json").is_file()
    # a second call finds both runs finished and returns the same weights from the checkpoint
    again = doremi(tiny_data[0], tmp_path / "doremi", cfg, DoReMiConfig(), quiet=True)
    assert again["domain_weights"] == pytest.approx(w)


def test_proxy_weights_move_toward_the_domain_with_excess_loss(tiny_data: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    # a reference that has seen only code: the proxy's excess loss (hence weight) is on code
    ref = Trainer(tiny_config(tiny_data, tmp_path / "ref", "max_steps=30", "eval_every=0",
                              'domain_weights={"mycode": 1.0}'), quiet=True)
    try:
        ref.run()
    finally:
        ref.close()
    proxy = ProxyTrainer(tiny_config(tiny_data, tmp_path / "proxy", "max_steps=10", "eval_every=0",
                                     'domain_weights={"mycode": 1, "mydocs": 1, "myliterature": 1}'),
                         tmp_path / "ref" / "model", DoReMiConfig(), quiet=True)
    try:
        proxy.run()
    finally:
        proxy.close()
    w = proxy.domain_weights()
    assert w["mycode"] > w["mydocs"] and w["mycode"] > w["myliterature"]


def test_iterated_doremi_trains_each_reference_on_the_last_rounds_weights(tiny_data: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, "max_steps=6", "eval_every=0", "ckpt_every=6")
    result = doremi(tiny_data[0], tmp_path / "it", cfg, DoReMiConfig(rounds=2, tolerance=0.0), quiet=True)
    first, second = result["rounds"]
    assert result["domain_weights"] == second and first != second
    assert result["reference_weights"] == pytest.approx({d: 1 / 3 for d in first})
    # round 2's reference (and proxy) sampled their domains by round 1's weights
    for run in ("reference", "proxy"):
        saved = json.loads((tmp_path / "it" / "round2" / run / "train_config.json").read_text())
        assert saved["domain_weights"] == pytest.approx(first)
    with pytest.raises(LeanLMError, match="rounds >= 1"):
        doremi(tiny_data[0], tmp_path / "bad", cfg, DoReMiConfig(rounds=0), quiet=True)


def test_the_doremi_command_is_mounted_under_data() -> None:
    from typer.testing import CliRunner

    from leanlm.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["data", "--help"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "doremi" in listing.output and "stats" in listing.output
    out = runner.invoke(app, ["data", "doremi", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "Group DRO proxy" in out.output and "--rounds" in out.output
