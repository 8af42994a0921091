"""The one logits pipeline: a batch of rows with mixed parameters processed as each row alone,
and the exponential race's draws."""

from __future__ import annotations

import dataclasses

import torch

from leanlm.sampling import Row, SamplingParams, apply_penalties, probabilities, process_logits, sample

PARAMS = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
          SamplingParams(temperature=0.7, top_k=5, logit_bias={0: -2.0, 7: 1.5, 3: 0.5}),
          SamplingParams(temperature=1.2, top_p=0.8, presence_penalty=0.4, frequency_penalty=0.2),
          SamplingParams(temperature=1.0, min_p=0.1, logit_bias={3: 5.0}),
          SamplingParams(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2)]


def rows() -> list[Row]:
    g = torch.Generator().manual_seed(0)
    return [Row(p, torch.randint(0, 40, (12,), generator=g).tolist(), 6, None) for p in PARAMS]


def test_batched_processing_equals_the_reference_per_row() -> None:
    logits = torch.randn(len(PARAMS), 40, generator=torch.Generator().manual_seed(1)) * 3
    rs = rows()
    greedy, probs = probabilities(logits, rs)
    for i, row in enumerate(rs):
        p = row.params
        # the OpenAI penalties first, then the rest with the row alone in its batch
        openai_only = dataclasses.replace(p, repetition_penalty=1.0, temperature=0.0)
        one = apply_penalties(logits[i:i + 1].clone(), [Row(openai_only, row.token_ids, 6, None)])
        rest = dataclasses.replace(p, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={})
        ref_greedy, ref = process_logits(one, [Row(rest, row.token_ids, 6, None)])
        if p.greedy:
            assert int(greedy[i]) == int(ref_greedy[0]) == int(ref.argmax())
        else:
            torch.testing.assert_close(probs[i], ref[0].softmax(-1), rtol=1e-5, atol=1e-6)


def test_sampling_draws_from_the_distribution_and_is_seeded() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=1.0)
    draws = torch.stack([sample(logits, [Row(p, [0], 1, None)]) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)
    seeded = lambda: [int(sample(logits, [Row(p, [0], 1, torch.Generator().manual_seed(5))]))
                      for _ in range(3)]
    assert seeded() == seeded()


def test_sampling_never_draws_a_removed_token_and_rows_draw_independently() -> None:
    logits = torch.tensor([[0.0, 5.0, 0.0, 5.0, 0.0], [3.0, 0.0, 0.0, 0.0, 3.0]])
    kept = SamplingParams(temperature=1.0, top_k=2)  # tokens 1, 3 (row 0) and 0, 4 (row 1) remain
    rows = [Row(kept, [0], 1, None), Row(kept, [0], 1, torch.Generator().manual_seed(1))]
    draws = torch.stack([sample(logits, rows) for _ in range(2000)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 4}
    assert 0.45 < float((draws[:, 0] == 1).float().mean()) < 0.55

