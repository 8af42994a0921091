"""Which data-parallel engine core serves a request (``--data-parallel-size N``).

Each engine core has its own KV cache and prefix cache, so where a request goes decides whether
its prompt's prefix is already computed there. Two policies:

- ``least-loaded`` (vLLM's default): the core with the fewest requests in flight from this front
  end (ties: the lowest index);
- ``prefix`` (the default here): the prompt's leading full blocks are hashed as the KV cache
  hashes them (a chain: each block's hash covers every token before it), and the request goes to
  the core that last took the longest of those prefixes — unless that core is overloaded (more
  than ``slack`` requests above the least-loaded one), when least-loaded decides. Every prefix
  of the request's prompt is then remembered for the core it went to (an LRU of
  ``capacity`` hashes), so the requests of one shared system prompt or conversation meet on one
  core while the load still spreads (SGLang's cache-aware router has the same shape).

The router is pure Python over token ids: the front end calls :meth:`Router.route` on arrival
and :meth:`Router.finished` when a request ends; dead cores are excluded with
:meth:`Router.remove`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from leanlm.errors import LeanLMError

POLICIES = ("prefix", "least-loaded")


def prefix_hashes(tokens: Sequence[int], block_size: int, max_blocks: int, salt: str = "") -> list[bytes]:
    """Chained hashes of the first ``max_blocks`` full blocks of ``tokens`` (``salt``: what else
    the K/V depend on, e.g. the request's adapter). Stable across processes, so every API server
    routes a prefix alike."""
    out, h = [], hashlib.blake2b(salt.encode(), digest_size=16).digest()
    for i in range(min(len(tokens) // block_size, max_blocks)):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        out.append(h)
    return out


class Router:
    def __init__(self, num_cores: int, block_size: int, policy: str = "prefix", max_blocks: int = 16,
                 slack: int = 8, capacity: int = 1 << 16) -> None:
        if policy not in POLICIES:
            raise LeanLMError(f"unknown routing policy {policy!r}: expected one of {POLICIES}")
        self.policy, self.block_size, self.max_blocks = policy, block_size, max_blocks
        self.slack, self.capacity = slack, capacity
        self.load = dict.fromkeys(range(num_cores), 0)  # requests in flight, per live core
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # prefix hash -> core that took it last
        self.where: dict[str, int] = {}  # request -> core

    def route(self, request_id: str, tokens: Sequence[int], salt: str = "") -> int:
        if not self.load:
            raise LeanLMError("no engine core is alive to take the request")
        least = min(self.load, key=lambda c: (self.load[c], c))
        core = least
        hashes = (prefix_hashes(tokens, self.block_size, self.max_blocks, salt)
                  if self.policy == "prefix" else [])
        for h in reversed(hashes):  # the longest prefix some core holds
            owner = self.owner.get(h)
            if owner is not None and owner in self.load:
                if self.load[owner] <= self.load[least] + self.slack:
                    core = owner
                break
        for h in hashes:
            self.owner[h] = core
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)
        self.load[core] += 1
        self.where[request_id] = core
        return core

    def finished(self, request_id: str) -> None:
        core = self.where.pop(request_id, None)
        if core is not None and core in self.load:
            self.load[core] -= 1

    def remove(self, core: int) -> list[str]:
        """Take a dead core out of rotation; returns the requests that were on it."""
        self.load.pop(core, None)
        lost = [rid for rid, c in self.where.items() if c == core]
        for rid in lost:
            del self.where[rid]
        return lost
