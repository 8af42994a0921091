"""The scheduler with a fake runner: admission, chunked prefill, decode, finishing, preemption
and resumption, priorities, aborts."""

from __future__ import annotations

import pytest

from leanlm.errors import LeanLMError
from leanlm.serve.kv_cache import KVCacheManager
from leanlm.serve.request import Request, RequestStatus, SamplingParams
from leanlm.serve.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make(num_blocks: int = 64, block_size: int = 4, **config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), KVCacheManager(num_blocks, block_size))


def req(rid: str, n: int, max_tokens: int = 4, priority: int = 0, first: int = 1) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(EOS,), priority=priority)


def step(s: Scheduler, token: int = 7) -> tuple:
    """One engine step with a fake runner that samples ``token`` for every request that needs one."""
    out = s.schedule()
    sampled = {rid: [token] for rid in out.num_scheduled_tokens}
    s.update_from_output(out, sampled)
    return out


def test_chunked_prefill_then_decode_until_max_tokens() -> None:
    s = make(max_num_batched_tokens=8)
    a, b = req("a", 13), req("b", 3, first=100)
    s.add_request(a)
    s.add_request(b)
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 8}  # a's first chunk uses the whole budget
    assert [n.request_id for n in out.new_requests] == ["a"] and a.output_token_ids == []
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 5, "b": 3}  # a finishes its prompt, b is admitted
    assert out.cached_requests[0].new_token_ids == list(range(9, 14))
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}  # decode: one token each
    assert out.cached_requests[0].new_token_ids == [7]
    step(s)
    step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_token_ids == [7] * 4
    assert not s.has_unfinished_requests() and s.kv.pool.num_free_blocks == 64
    assert s.schedule().finished_req_ids == {"a", "b"}


def test_stop_on_eos_respects_min_tokens() -> None:
    s = make()
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=10, min_tokens=2), eos_token_ids=(EOS,))
    s.add_request(r)
    step(s, token=EOS)
    assert r.status is RequestStatus.RUNNING  # min_tokens=2: the first eos does not stop it
    step(s, token=EOS)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_token_ids == [EOS, EOS]


def test_admission_limits() -> None:
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(str(i), 4, first=10 * i + 1))
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"0", "1"} and len(s.waiting) == 1
    s2 = make(num_blocks=3, block_size=4)  # room for 12 tokens
    s2.add_request(req("a", 8))
    s2.add_request(req("b", 8, first=50))
    out = s2.schedule()
    assert set(out.num_scheduled_tokens) == {"a"}  # b does not fit: it waits


def test_preemption_frees_blocks_and_resumption_recomputes() -> None:
    s = make(num_blocks=4, block_size=2)  # 8 token slots
    a, b = req("a", 3, max_tokens=5), req("b", 3, max_tokens=5, first=50)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: 2 blocks for 3 tokens, b: 2 -> the pool is full
    assert s.kv.pool.num_free_blocks == 0 and a.output_token_ids == [7] and b.output_token_ids == [7]
    assert step(s).preempted_req_ids == set()  # each 4th token fits in its 2nd block
    out = step(s)  # a needs a 3rd block for its 5th token: b (the latest admitted) is preempted
    assert out.preempted_req_ids == {"b"} and set(out.num_scheduled_tokens) == {"a"}
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and s.waiting == [b]
    assert s.kv.block_ids("b") == [] and b.num_preemptions == 1
    while a.status is RequestStatus.RUNNING:
        step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH
    out = step(s)  # b comes back with prompt + the 2 tokens it had generated, as a new request
    assert [n.token_ids for n in out.new_requests] == [[50, 51, 52, 7, 7]]
    while s.has_unfinished_requests():
        step(s)
    assert b.output_token_ids == [7] * 5 and s.kv.pool.num_free_blocks == 4


def test_priority_policy_admits_and_preempts_by_priority() -> None:
    s = make(num_blocks=4, block_size=2, policy="priority")
    low, high = req("low", 3, priority=5), req("high", 3, priority=1, first=50)
    s.add_request(low)
    s.add_request(high)
    out = s.schedule()
    assert [n.request_id for n in out.new_requests] == ["high", "low"]
    s.update_from_output(out, {"high": [7], "low": [7]})
    s.update_from_output(s.schedule(), {"high": [7], "low": [7]})  # 4th tokens fit their blocks
    out = s.schedule()  # both need a new block, none is free: "low" goes
    assert out.preempted_req_ids == {"low"} and set(out.num_scheduled_tokens) == {"high"}
    assert s.waiting == [low] and s.kv.block_ids("low") == []


def test_abort_frees_blocks_and_is_reported() -> None:
    s = make()
    r = req("r", 6)
    s.add_request(r)
    step(s)
    assert s.kv.block_ids("r")
    s.abort_requests(["r", "unknown"])
    assert r.status is RequestStatus.FINISHED_ABORTED and s.kv.pool.num_free_blocks == 64
    assert s.schedule().finished_req_ids == {"r"}


def test_prefix_hits_skip_computed_tokens() -> None:
    s = make(block_size=4)
    s.add_request(req("a", 9))
    step(s)
    b = req("b", 9)  # the same prompt: two full blocks cached
    s.add_request(b)
    out = s.schedule()
    assert out.num_scheduled_tokens["b"] == 1 and out.new_requests[0].num_computed_tokens == 8


def test_bad_config_and_requests() -> None:
    with pytest.raises(LeanLMError, match="policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(LeanLMError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(LeanLMError, match="prompt is empty"):
        Request("x", [])
    s = make()
    s.add_request(req("x", 2))
    with pytest.raises(LeanLMError, match="already in use"):
        s.add_request(req("x", 2))


def test_vtc_gives_a_less_served_client_a_slot() -> None:
    """Every slot is taken by one client's requests: a request of a client served less takes the
    most-served client's latest slot at once (FCFS would leave it waiting)."""
    for policy, preempted in (("vtc", {"flood-1"}), ("fcfs", set())):
        s = make(policy=policy, max_num_seqs=2)
        for i in range(2):
            r = req(f"flood-{i}", 6, max_tokens=20, first=10 * i + 1)
            r.client = "flood"
            s.add_request(r)
        for _ in range(3):
            step(s)
        light = req("light", 3, first=100)
        light.client = "light"
        s.add_request(light)
        out = step(s)
        assert out.preempted_req_ids == preempted
        assert ("light" in out.num_scheduled_tokens) == (policy == "vtc")
        if policy == "vtc":  # the preempted request waits to be recomputed, first in line
            assert s.waiting[0].request_id == "flood-1" and s.waiting[0].num_computed_tokens == 0


def test_vtc_runs_a_returning_clients_request_alone_for_a_step() -> None:
    """Long prompts of one client fill the budget in chunks. A light client's request runs alone
    in the next step, so the step that gives its first token is short; then the others resume.
    FCFS serves the running chunks first, and the light request waits for the budget."""
    for policy in ("vtc", "fcfs"):
        s = make(policy=policy, max_num_seqs=4, max_num_batched_tokens=16)
        for i in range(3):
            r = req(f"flood-{i}", 40 if i else 8, max_tokens=20, first=50 * i + 1)
            r.client = "flood"
            s.add_request(r)
        step(s)
        step(s)  # flood-0 decodes, flood-1 and flood-2 are in their prompts
        light = req("light", 6, first=200)
        light.client = "light"
        s.add_request(light)
        out = step(s)
        if policy == "vtc":
            assert out.num_scheduled_tokens == {"light": 6}
            assert light.output_token_ids == [7]
            nxt = step(s).num_scheduled_tokens
            assert nxt["flood-0"] == 1 and nxt["flood-1"] > 1  # the decode and the chunks resume
        else:
            assert "light" not in out.num_scheduled_tokens and sum(out.num_scheduled_tokens.values()) == 16


def test_vtc_admits_a_new_client_with_the_others_when_no_client_floods() -> None:
    """Three clients with one running request each: a fourth client's request joins an ordinary
    step (nobody holds more than a fair share of the slots, so nobody waits for it)."""
    s = make(policy="vtc", max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(3):
        r = req(f"user-{i}", 8, max_tokens=20, first=20 * i + 1)
        r.client = f"user-{i}"
        s.add_request(r)
    step(s)
    new = req("new", 6, first=200)
    new.client = "new"
    s.add_request(new)
    assert step(s).num_scheduled_tokens == {"user-0": 1, "user-1": 1, "user-2": 1, "new": 6}


def test_vtc_n_copies_of_one_request_count_as_one_client() -> None:
    """The server's default: 16 copies of one request (one client) fill the 4 slots; a later
    request is admitted at the next step, not after the copies."""
    s = make(max_num_seqs=4, policy="vtc", num_blocks=256)
    copies = [Request(f"big-{i}", [1, 2, 3], SamplingParams(max_tokens=50), client="request:big")
              for i in range(16)]
    for r in copies:
        s.add_request(r)
    step(s)
    step(s)
    assert len(s.running) == 4 and {r.client for r in s.running} == {"request:big"}
    small = Request("small", [5, 6], SamplingParams(max_tokens=2), client="request:small")
    s.add_request(small)
    out = step(s)
    assert [n.request_id for n in out.new_requests] == ["small"] and len(out.preempted_req_ids) == 1
    step(s)
    assert small.is_finished and sum(not r.is_finished for r in copies) == 16


def test_vtc_counters_stay_bounded_and_recent_idle_clients_keep_theirs() -> None:
    from leanlm.serve.scheduler import MAX_IDLE_CLIENTS

    s = make(policy="vtc", num_blocks=256)
    heavy = Request("h", [1, 2, 3], SamplingParams(max_tokens=2), client="heavy")
    s.add_request(heavy)
    step(s)
    step(s)
    assert heavy.is_finished and s.counters["heavy"] > 0  # idle, its counter kept
    for i in range(MAX_IDLE_CLIENTS + 500):  # single requests, each its own client, come and go
        r = Request(f"r{i}", [1], SamplingParams(max_tokens=1), client=f"request:r{i}")
        s.add_request(r)
        s.abort_requests([r.request_id])
    assert len(s.counters) <= MAX_IDLE_CLIENTS and "heavy" not in s.counters
    assert s._clients == {} and len(s._idle) == MAX_IDLE_CLIENTS
    s.add_request(Request("back", [1], SamplingParams(max_tokens=1), client="request:r4500"))
    assert "request:r4500" not in s._idle and s._clients["request:r4500"] == 1


def test_preempt_all_returns_every_running_request_and_reports_it() -> None:
    s = make(num_blocks=64)
    a, b = req("a", 5), req("b", 6, first=50)
    s.add_request(a)
    s.add_request(b)
    step(s)
    s.preempt_all()
    assert s.running == [] and [r.request_id for r in s.waiting] == ["a", "b"]
    assert s.kv.pool.num_free_blocks == 64 and a.num_computed_tokens == 0
    s.kv.pool.reset_prefix_cache()
    out = step(s)
    assert out.preempted_req_ids == {"a", "b"}
    assert {n.request_id: n.num_computed_tokens for n in out.new_requests} == {"a": 0, "b": 0}
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7, 7]
