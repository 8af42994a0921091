"""Text perplexity under the GPTQ protocol (and its sliding-window variant) against an independent
computation with transformers; KL agreement; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_hf_model
from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.eval.agreement import flip_rate, next_token_kl
from leanlm.eval.perplexity import text_perplexity, windows


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    path = tmp_path_factory.mktemp("m") / "llama"
    hf = build_hf_model("llama").eval()
    hf.save_pretrained(path)
    return hf, load_model(path, dtype="float32").eval()


def hf_perplexity(hf: object, ids: torch.Tensor, seq_len: int, stride: int | None) -> float:
    """Hugging Face's own recipe ("Perplexity of fixed-length models"), summing token NLLs."""
    nll, count, prev_end = 0.0, 0, 0
    starts = range(0, len(ids) - seq_len + 1, seq_len) if stride is None else range(0, len(ids), stride)
    for begin in starts:
        end = min(begin + seq_len, len(ids))
        trg = end - begin - 1 if stride is None else end - max(prev_end, begin + 1)
        inputs = ids[begin:end][None]
        labels = inputs.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = hf(inputs, labels=labels).loss
        nll += float(loss) * trg
        count += trg
        prev_end = end
        if stride is not None and end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [None, 5, 16])
def test_perplexity_equals_transformers(models: tuple, stride: int | None) -> None:
    hf, lm = models
    ids = torch.randint(3, 300, (203,), generator=torch.Generator().manual_seed(0))
    got = text_perplexity(lm, ids, seq_len=16, stride=stride, batch_size=3)
    want = hf_perplexity(hf, ids, 16, stride)
    assert abs(got.ppl / want - 1) < 1e-4
    # with a stride below seq_len every token after the first is scored once; GPTQ drops the tail
    if stride == 5:
        assert got.tokens == len(ids) - 1
    elif stride is None:
        assert got.tokens == (len(ids) // 16) * 15


def test_windows_and_bad_input() -> None:
    assert windows(10, 4) == [(0, 4, 3), (4, 8, 3)]
    assert windows(10, 4, stride=3) == [(0, 4, 3), (3, 7, 3), (6, 10, 3)]
    with pytest.raises(LeanLMError, match="fewer than one window"):
        windows(10, 16)
    with pytest.raises(LeanLMError, match="stride"):
        windows(10, 4, stride=5)


def test_kl_is_zero_against_itself_and_grows_with_noise(models: tuple) -> None:
    _, lm = models
    ids = torch.randint(3, 300, (96,), generator=torch.Generator().manual_seed(1))
    assert next_token_kl(lm, lm, ids, 16) == pytest.approx(0.0, abs=1e-6)
    import copy

    kls = []
    for noise in (0.01, 0.05, 0.2):
        other = copy.deepcopy(lm)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * p.abs().mean())
        kls.append(next_token_kl(lm, other, ids, 16))
    assert 0 < kls[0] < kls[1] < kls[2]
    assert flip_rate([0, 1, 2, 3], [0, 1, 1, 0]) == 0.5


def test_a_window_subset_is_spread_over_the_stream() -> None:
    from leanlm.eval.perplexity import spread

    spans = windows(100, 10)
    assert spread(spans, 0) == spans and spread(spans, 20) == spans
    assert [s[0] for s in spread(spans, 4)] == [0, 30, 60, 90]
