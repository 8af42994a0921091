"""The data-parallel router: least-loaded, and prefix affinity bounded by load."""

from __future__ import annotations

import pytest

from leanlm.errors import LeanLMError
from leanlm.serve.router import Router, prefix_hashes

SHARED = list(range(100, 132))  # two blocks of 16


def test_least_loaded_spreads_and_finished_requests_free_their_core() -> None:
    r = Router(2, 16, policy="least-loaded")
    assert [r.route(f"r{i}", SHARED) for i in range(4)] == [0, 1, 0, 1]
    r.finished("r1")
    r.finished("r3")
    assert r.route("r4", SHARED) == 1 and r.load == {0: 2, 1: 1}


def test_a_shared_prefix_stays_on_its_core_until_it_is_overloaded() -> None:
    r = Router(2, 16, policy="prefix", slack=2)
    assert r.route("a", [*SHARED, 1]) == 0
    assert r.route("other", [7] * 40) == 1  # no known prefix: the least-loaded core
    assert [r.route(f"b{i}", [*SHARED, i]) for i in range(3)] == [0, 0, 0]  # loads 4 vs 1, slack 2
    assert r.route("b3", [*SHARED, 3]) == 1  # 4 > 1 + 2: overloaded, least-loaded decides
    assert r.route("b4", [*SHARED, 4]) == 1  # and the prefix now lives on core 1


def test_prefixes_are_salted_and_stable() -> None:
    assert prefix_hashes(SHARED, 16, 8) == prefix_hashes(list(SHARED), 16, 8)
    assert prefix_hashes(SHARED, 16, 8, "lora-a") != prefix_hashes(SHARED, 16, 8)
    assert len(prefix_hashes([*SHARED, 1], 16, 8)) == 2
    assert prefix_hashes(SHARED, 16, 1) == prefix_hashes(SHARED, 16, 8)[:1]
    assert prefix_hashes(SHARED, 16, 1) == prefix_hashes(SHARED, 16, 8)[:1]


def test_dead_cores_leave_the_rotation() -> None:
    r = Router(2, 16)
    r.route("x", SHARED)
    assert r.remove(0) == ["x"]
    assert r.route("y", SHARED) == 1
    r.remove(1)
    with pytest.raises(LeanLMError, match="no engine core"):
        r.route("z", SHARED)
