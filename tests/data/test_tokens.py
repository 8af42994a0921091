"""Packing with document masking, and the stateful loaders (``data/tokens.py``): packed and mixed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from leanlm.attention import SDPAMetadata
from leanlm.data.tokens import MixtureLoader, PackedLoader, make_batch
from leanlm.errors import LeanLMError
from leanlm.model import Transformer


def test_make_batch_positions_and_documents():
    b = make_batch(np.array([[5, 0, 7, 8, 0, 9, 9]]), eos_id=0, document_masking=True)
    assert b.inputs.tolist() == [[5, 0, 7, 8, 0, 9]] and b.targets.tolist() == [[0, 7, 8, 0, 9, 9]]
    assert b.positions.tolist() == [[0, 0, 1, 2, 0, 1]]
    assert b.documents.tolist() == [[1, 2, 2, 2, 3, 3]]
    plain = make_batch(np.array([[5, 0, 7]]), eos_id=0, document_masking=False)
    assert plain.positions is None and plain.documents is None


def test_document_masking_equals_separate_documents(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0.1)
    a, b = torch.randint(2, 300, (1, 7)), torch.randint(2, 300, (1, 5))
    eos = torch.tensor([[1]])
    packed = torch.cat([eos, a, eos, b], dim=1)
    batch = make_batch(np.concatenate([packed.numpy(), [[3]]], axis=1), eos_id=1, document_masking=True)
    with torch.no_grad():
        together = model(batch.inputs, batch.positions, SDPAMetadata.packed(batch.documents))
        first = model(torch.cat([eos, a], 1))
        second = model(torch.cat([eos, b], 1))
    torch.testing.assert_close(together, torch.cat([first, second], 1), rtol=1e-5, atol=1e-5)


def test_loader_layout_is_independent_of_world_size_and_resumes():
    tokens = np.arange(2000) % 50
    one = PackedLoader(tokens, 16, 0, micro_batch=4, grad_accum=2, seed=3)
    two = [PackedLoader(tokens, 16, 0, micro_batch=2, grad_accum=2, rank=r, world=2, seed=3) for r in (0, 1)]
    for _ in range(40):  # crosses epochs (124 windows / 8 per step)
        ref = one.next_step()
        parts = [ld.next_step() for ld in two]
        for k in range(2):  # micro-step k: rank 0 and 1 halves concatenated = the 1-process batch
            both = torch.cat([parts[0][k].inputs, parts[1][k].inputs])
            assert torch.equal(both, ref[k].inputs)
    state = one.state_dict()
    nxt = one.next_step()
    fresh = PackedLoader(tokens, 16, 0, micro_batch=4, grad_accum=2, seed=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(fresh.next_step(), nxt, strict=True))
    other = PackedLoader(tokens, 16, 0, micro_batch=2, grad_accum=2, seed=3)
    with pytest.raises(LeanLMError, match="cannot resume the data loader"):
        other.load_state_dict(state)
    with pytest.raises(LeanLMError, match="fewer than one global batch"):
        PackedLoader(np.arange(40), 16, 0, micro_batch=4)


def test_mixture_loader_follows_the_weights_and_resumes() -> None:
    streams = {d: np.arange(i * 10_000, (i + 1) * 10_000) for i, d in enumerate("abc")}
    loader = MixtureLoader(streams, {"a": 0.6, "b": 0.3, "c": 0.1}, seq_len=8, eos_id=0, micro_batch=50)
    counts = np.zeros(3)
    for _ in range(40):
        windows, dom = loader.draw()
        counts += np.bincount(dom, minlength=3)
        assert all(w[0] // 10_000 == d for w, d in zip(windows, dom, strict=True))  # from its domain
    assert np.allclose(counts / counts.sum(), [0.6, 0.3, 0.1], atol=0.03)
    state = loader.state_dict()
    a = loader.draw()
    again = MixtureLoader(streams, {"a": 0.6, "b": 0.3, "c": 0.1}, seq_len=8, eos_id=0, micro_batch=50)
    again.load_state_dict(json.loads(json.dumps(state)))
    b = again.draw()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(LeanLMError, match="unknown domains"):
        MixtureLoader(streams, {"z": 1.0}, seq_len=8, eos_id=0, micro_batch=2)
    with pytest.raises(LeanLMError, match="positive sum"):
        MixtureLoader(streams, {"a": 0.0}, seq_len=8, eos_id=0, micro_batch=2)
