"""leanlm's GPTQ/AWQ checkpoints in GPTQModel, and GPTQModel's in leanlm, with equal logits.

Both directions go through gptqmodel's default CPU kernels (``TorchAtenLinear`` for GPTQ,
``TorchAtenAwqLinear`` for AWQ, loaded by ``transformers.AutoModelForCausalLM``): they run torch's
``_weight_int4pack_mm_for_cpu`` on bf16 activations, which is leanlm's ``int4pack`` backend, so
the comparison forces that backend on leanlm's side and asks for identical fp32 logits. The one
difference left is how the two round the kernel's zero offsets on an asymmetric checkpoint (AWQ):
gptqmodel computes ``(8 - z)·s`` in bf16, leanlm in fp32 and rounds once; the AWQ cases check
the gap is small, then round leanlm's offsets gptqmodel's way and ask for identical logits —
which then holds only if codes, scales, zeros, groups and order were all read the same.

Marked ``peers``; skipped where gptqmodel is not installed (it lives in its own environment,
scripts/setup_peers.sh: it pins numpy 2.2.6). Tiny random models, offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_hf_model, write_tokenizer
from leanlm.checkpoint import load_model
from leanlm.kernels import kernel_mode
from leanlm.quant import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gptqmodel_peer as peer  # benchmarks/: the peer tooling bench_quant.py shares

if not peer.available():
    pytest.skip("gptqmodel is not installed (it has its own venv: scripts/setup_peers.sh)",
                allow_module_level=True)

pytestmark = pytest.mark.peers
SAMPLES, SEQ_LEN = 8, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny random Llama checkpoint with a tokenizer, a calibration .jsonl) — K = 64 and 128."""
    root = tmp_path_factory.mktemp("peers")
    build_hf_model("llama").save_pretrained(root / "m")
    write_tokenizer(root / "m")
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1\n"}) for i in range(200)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return root / "m", root / "calib.jsonl"


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def peer_logits(path: Path) -> tuple[torch.Tensor, set[str]]:
    """fp32 logits of ``path`` through transformers + gptqmodel, and its quantized layer kinds."""
    hf = peer.load_hf(path, torch.float32)
    kinds = {type(m).__name__ for m in hf.modules() if type(m).__module__.startswith("gptqmodel")}
    with torch.no_grad():
        return hf(ids()).logits, kinds


def leanlm_logits(path: Path, offsets_as_gptqmodel: bool = False) -> tuple[torch.Tensor, Any]:
    """fp32 logits of ``path`` loaded by leanlm, its int4 layers on the ``int4pack`` backend, the
    rest on the torch references (transformers' math: leanlm's C++ RMSNorm sums in another order)."""
    model = load_model(path, dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 4 for m in layers)
    for m in layers:
        m.backend = "int4pack"
    with torch.no_grad(), kernel_mode("reference"):
        logits = model(ids())
        if offsets_as_gptqmodel:
            peer.int4pack_zero_offsets_as_gptqmodel(model)
            logits = model(ids())
    return logits, model


@pytest.mark.parametrize(("method", "kernel"), [("gptq", "TorchAtenLinear"), ("awq", "TorchAtenAwqLinear")])
def test_leanlm_quantize_defaults_load_in_gptqmodel(tmp_path: Path, tiny: tuple[Path, Path],
                                                    method: str, kernel: str) -> None:
    model, calib = tiny
    out = tmp_path / method
    run = subprocess.run([sys.executable, "-m", "leanlm.cli", "quantize", str(model), "--method", method,
                          "--calib", str(calib), "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"]) == (method, 4, 64)  # group auto

    theirs, kinds = peer_logits(out)
    assert kinds == {kernel}
    ours, _ = leanlm_logits(out)
    if method == "gptq":  # symmetric: zero offsets are 0 on both sides
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-3)  # offsets rounded differently
        ours, _ = leanlm_logits(out, offsets_as_gptqmodel=True)
        assert torch.equal(ours, theirs)
    fp = build_hf_model("llama")
    with torch.no_grad():
        gap = (fp(ids()).logits - theirs).abs().max().item()
    assert 1e-3 < gap < 1.0  # quantized (not the fp weights read back), and not garbage


@pytest.mark.parametrize(("method", "act_order"), [("gptq", False), ("gptq", True), ("awq", False)])
def test_gptqmodel_checkpoints_load_in_leanlm(tmp_path: Path, tiny: tuple[Path, Path], method: str,
                                              act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny
    monkeypatch.chdir(tmp_path)  # GPTQModel writes its logs/ into the working directory
    calib = torch.randint(2, 300, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    config = peer.quantize_config(method, 4, 64, act_order, offload_to_disk=False)
    gm = peer.load_unquantized(model, config)
    peer.quantize(gm, calib)
    gm.save(str(tmp_path / "q"))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == method and qcfg.get("desc_act", False) == act_order

    theirs, _ = peer_logits(tmp_path / "q")
    ours, lm = leanlm_logits(tmp_path / "q", offsets_as_gptqmodel=method == "awq")
    assert torch.equal(ours, theirs)
    if act_order:  # the columns really are permuted, so the g_idx path was exercised
        g_idx = lm.layers[0].mlp.down_proj.g_idx
        assert not torch.equal(g_idx, torch.sort(g_idx).values)
