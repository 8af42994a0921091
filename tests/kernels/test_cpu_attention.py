"""The C++ CPU paged decode kernel against the fp64 reference, on poisoned caches (every slot no
request owns is NaN, so a read through a wrong slot shows up in the output)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err
from test_paged_attention import paged_batch, reference

from leanlm import kernels
from leanlm.errors import LeanLMError
from leanlm.kernels import cpu_attention as ca
from leanlm.kernels import paged_attention as pa
from leanlm.kernels import rotary

pytestmark = pytest.mark.skipif(ca.ops() is None, reason="the C++ kernel cannot be built here")


def decode(b: dict, window: int | None) -> torch.Tensor:
    return ca.paged_decode(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                           b["block_size"], b["scale"], window)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads,d,block_size", [(4, 2, 16, 4), (8, 1, 24, 16), (3, 3, 64, 8),
                                                         (5, 5, 64, 16), (4, 4, 80, 16), (4, 2, 128, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_fp64_reference(window: int | None, heads: int, kv_heads: int, d: int,
                                       block_size: int, dtype: torch.dtype) -> None:
    seq_lens = [1, 5, 17, 40, 100, 3]
    b = paged_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, d, block_size, seed=heads + d,
                    dtype=dtype)
    out = decode(b, window)
    assert out.dtype == dtype and out.shape == b["q"].shape
    want = reference(b, window)
    assert rel_err(out.double(), want) < (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:  # the torch path the engine used before: fp32 rounding apart
        got = pa.reference(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], seq_lens,
                           b["query_start"].tolist(), block_size, b["scale"], window)
        torch.testing.assert_close(out, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batches_split_between_kernel_and_reference(dtype: torch.dtype) -> None:
    # prefill chunks (one after a cached prefix), decode rows between them, a long decode
    query_lens, seq_lens = [7, 1, 20, 1, 1], [7, 12, 33, 70, 2]
    b = paged_batch(query_lens, seq_lens, 4, 2, 32, 4, seed=5, dtype=dtype)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], seq_lens,
            b["query_start"].tolist(), b["block_size"], b["scale"], 5)
    out = ca.attention(*args[:3], ca.Split.of(*args[3:7]), *args[6:])
    assert rel_err(out.double(), reference(b, 5)) < (1e-6 if dtype == torch.float32 else 1e-2)
    with kernels.kernel_mode("reference"):
        assert not ca.runs(b["q"], b["k_cache"])


def fresh_step(rows: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, seed: int) -> tuple:
    """A step's unrotated q/k/v as views of one fused projection's output (the engine's layout),
    cos/sin [rows, D] of the rows' positions, and the reference's rotation of a [rows, heads, D]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, v = (t.view(rows, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
    angles = torch.randn(rows, d // 2, generator=g) * 3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    tables = (cos[None, None], sin[None, None])
    rot = lambda x: rotary.reference(x.transpose(0, 1)[None], *tables)[0].transpose(0, 1)
    return qkv, q, k, v, cos, sin, rot


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 16), (5, 5, 64), (8, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_decode_is_rotary_store_and_decode(window: int | None, heads: int, kv_heads: int, d: int,
                                                  dtype: torch.dtype) -> None:
    # the step's q/k/v as views of one fused projection's output (the engine's layout); each
    # request's last key slot is where its new k/v go; cos/sin of the requests' positions
    seq_lens, block_size = [1, 5, 17, 40, 3], 4
    b = paged_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, d, block_size, seed=d, dtype=dtype)
    qkv, q, k, v, cos, sin, rot = fresh_step(len(seq_lens), heads, kv_heads, d, dtype, seed=1)
    tables = b["block_tables"]
    slots = torch.tensor([int(tables[r, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for r, n in enumerate(seq_lens)])
    split = ca.Split.of(tables, seq_lens, list(range(len(seq_lens) + 1)), block_size)
    # unfused: rotary of q and of k, the two row stores, the decode kernel
    kc, vc = b["k_cache"].clone(), b["v_cache"].clone()
    rq, rk = rot(q), rot(k)
    kc[slots], vc[slots] = rk, v
    want = ca.attention(rq.contiguous(), kc, vc, split, block_size, b["scale"], window)
    kf, vf = b["k_cache"].clone(), b["v_cache"].clone()
    got = ca.rotary_decode(q, k, v, cos, sin, kf, vf, slots, split, block_size, b["scale"], window)
    assert torch.equal(got, want)
    for cache, want_cache in ((kf, kc), (vf, vc)):  # the same slots written, the poison left alone
        torch.testing.assert_close(cache, want_cache, rtol=0, atol=0, equal_nan=True)
    kf, vf = b["k_cache"].clone(), b["v_cache"].clone()  # the fused projection's output as it is
    whole = ca.rotary_decode_qkv(qkv, heads, cos[None, None], sin[None, None], kf, vf, slots, split,
                                 block_size, b["scale"], window)
    assert torch.equal(whole, want.view(len(seq_lens), heads * d))
    torch.testing.assert_close(kf, kc, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(LeanLMError, match="one query per request"):
        mixed = ca.Split.of(tables[:2], [5, 5], [0, 2, 3], block_size)
        ca.rotary_decode(q, k, v, cos, sin, kf, vf, slots, mixed, block_size, b["scale"], window)


def test_runs_only_where_it_can() -> None:
    b = paged_batch([1], [9], 4, 2, 16, 4, seed=1)
    assert ca.runs(b["q"], b["k_cache"])
    assert not ca.runs(b["q"].double(), b["k_cache"].double())  # fp64 stays on the reference
    assert not ca.runs(b["q"], b["k_cache"].to(torch.int8))
    assert not ca.runs(b["q"].requires_grad_(), b["k_cache"])


def test_launcher_rejects_bad_arguments() -> None:
    b = paged_batch([1, 1], [9, 30], 4, 2, 16, 4, seed=0)
    with pytest.raises(LeanLMError, match="not a multiple of 2 K/V heads"):
        decode({**b, "q": torch.randn(2, 3, 16)}, None)
    with pytest.raises(LeanLMError, match="exceeds the"):
        decode({**b, "seq_lens": torch.tensor([9, 10_000])}, None)
    with pytest.raises(LeanLMError, match="at least one key"):
        decode({**b, "seq_lens": torch.tensor([0, 3])}, None)
    with pytest.raises(LeanLMError, match="describe 2 requests"):
        decode({**b, "seq_lens": torch.tensor([9])}, None)
    with pytest.raises(LeanLMError, match="k_cache must be one of"):
        decode({**b, "k_cache": b["k_cache"].half()}, None)
    with pytest.raises(LeanLMError, match="must be ≥ 1 and fit 10 blocks"):
        ca.Split.of(b["block_tables"], [9, 41], [0, 1, 2], 4)


def test_rotary_decode_rows_of_one_request_see_each_others_keys() -> None:
    """Three rows of one request at positions 11, 10, 9 (drafts to verify, as the compiled step
    passes them; the first row the last position): every row's k/v is stored before any row
    attends, so the row at 11 reads the keys of the rows at 9 and 10, as the reference, which
    stores them all first."""
    heads, kv_heads, d, bs, n = 4, 2, 16, 4, 12
    b = paged_batch([1], [n], heads, kv_heads, d, bs, seed=3)
    table = b["block_tables"][0]
    positions = [11, 10, 9]
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in positions])
    tables, lens = table[None].repeat(3, 1).contiguous(), torch.tensor([p + 1 for p in positions])
    qkv, q, k, v, cos, sin, rot = fresh_step(3, heads, kv_heads, d, torch.float32, seed=4)
    kc, vc = b["k_cache"].clone(), b["v_cache"].clone()
    kc[slots], vc[slots] = rot(k), v  # the reference: every row stored, then each row attends
    want = ca.paged_decode(rot(q).contiguous(), kc, vc, tables, lens, bs, b["scale"])
    kf, vf = b["k_cache"].clone(), b["v_cache"].clone()
    got = ca.ops().rotary_decode_qkv(qkv, heads, cos, sin, kf, vf, slots, tables, lens, bs, b["scale"], -1)
    assert torch.equal(got, want.view(3, heads * d))
    torch.testing.assert_close(kf, kc, rtol=0, atol=0, equal_nan=True)
