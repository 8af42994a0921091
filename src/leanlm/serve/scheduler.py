"""Iteration-level scheduling (Yu et al., "Orca", OSDI 2022) with chunked prefill (Agrawal et al.,
"SARATHI", 2023) and preemption by recompute (vLLM), in vLLM v1's shape.

There are no prefill and decode phases. Each step has a budget of ``max_num_batched_tokens``;
every request is owed ``num_tokens - num_computed_tokens`` tokens. Running requests are served
first (in order), then waiting ones are admitted while the budget, ``max_num_seqs`` and the free
KV blocks allow; a long prompt simply takes several steps (a chunked prefill), capped per step
by ``long_prefill_token_threshold``. A waiting request starts from its longest cached prefix.

Policies decide which waiting request is admitted next and which running one is preempted:
``fcfs`` (arrival order), ``priority`` (lowest value first), and ``vtc``, the Virtual Token
Counter of Sheng et al. 2024 ("Fairness in Serving Large Language Models", OSDI): each client
(API key or ``user``) has a counter of the service it received, w_p per prompt token computed and
w_q per token generated; the waiting request of the least-served client goes first, and a client
that becomes active again has its counter lifted to the smallest active one, so idling earns no
credit; running requests are served in counter order too. Under a flood from one client, a light
client's request is admitted at the next step instead of behind the flood, and that step runs
it alone (everyone else waits one step), so the step that gives its first token is as short as
on an idle server. That happens only while another client holds more than its share of the
running slots: many clients with a request each are admitted together, as usual.

When a running request needs a block and none is free, the lowest-priority running request (the
most recently admitted under FCFS) is preempted: its blocks are freed, its computed count goes
back to 0, and it returns to the front of the queue, to be recomputed (prompt + the tokens it has
generated, mostly from the prefix cache) when there is room. No waiting request is admitted in a
step that ran short of blocks. Under ``vtc`` a request also gives up its slot when every slot is
taken and a less-served client waits (the most-served client's latest request goes).

``leanlm serve`` runs ``vtc`` by default, with each request's ``n`` copies under one client (the
``user``, else the request itself), so that one request cannot take every slot. VTC was chosen
over a per-request slot cap because it is work-conserving and covers more than ``n``: a cap
idles slots on a quiet server (one ``n=64`` request would run 16 at a time with 48 slots free)
and does nothing against many requests from one client, while VTC lets a request use every slot
until someone else waits, then admits the newcomer at the next step (preempting one of the
heavy client's copies if every slot is taken) and keeps serving the least-served client first.
Counters of clients that left are kept for the ``MAX_IDLE_CLIENTS`` most recent ones only, so
they stay bounded however many ``user`` values or single requests come and go.

:class:`SchedulerOutput` is all the model runner sees: which requests are new (with their whole
token list and block table), which continue (their new tokens and new blocks), how many tokens
each gets this step, and which requests were preempted or finished since the last step.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from leanlm.errors import LeanLMError
from leanlm.serve.kv_cache import KVCacheManager
from leanlm.serve.request import Request, RequestStatus, SamplingParams

POLICIES = ("fcfs", "priority", "vtc")
MAX_IDLE_CLIENTS = 4096  # vtc: counters kept for clients with no request (least recently active dropped)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0  # most tokens of one request per step (0 = budget)
    policy: str = "fcfs"
    # vtc: the cost of one prompt / one generated token in a client's virtual token counter
    vtc_prompt_weight: float = 1.0
    vtc_output_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise LeanLMError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.long_prefill_token_threshold < 0:
            raise LeanLMError("long_prefill_token_threshold must be >= 0")
        if self.policy not in POLICIES:
            raise LeanLMError(f"unknown scheduling policy {self.policy!r}: expected one of {POLICIES}")


@dataclass
class NewRequestData:
    request_id: str
    token_ids: list[int]  # prompt + tokens generated before a preemption
    sampling_params: SamplingParams
    lora: str | None
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose K/V are already cached (a prefix hit)
    num_prompt_tokens: int  # the rest of token_ids are outputs (penalties count those)
    # every token was cached: the first one computed (the last, for its logits) is not stored again
    last_token_cached: bool = False


@dataclass
class CachedRequestData:
    request_id: str
    new_token_ids: list[int]  # the tokens to compute this step
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_req_ids: set[str] = field(default_factory=set)
    finished_req_ids: set[str] = field(default_factory=set)
    # draft tokens scheduled after a request's real ones (they are the last of its scheduled tokens)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 num_lookahead_tokens: int = 0) -> None:
        self.config = config
        self.kv = kv_cache
        self.lookahead = num_lookahead_tokens  # slots kept free past a request's tokens (draft model)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()  # preempted between steps (preempt_all)
        self.counters: dict[str, float] = {}  # vtc: service received per client
        self._clients: Counter[str] = Counter()  # vtc: requests (waiting or running) per client
        self._idle: OrderedDict[str, None] = OrderedDict()  # vtc: clients with none, oldest first

    # ---- requests in and out ----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise LeanLMError(f"request id {request.request_id!r} is already in use")
        if self.config.policy == "vtc":
            if request.client not in self._clients:  # (re)joining: no credit for having been idle
                floor = min((self.counters.get(c, 0.0) for c in self._clients), default=0.0)
                self.counters[request.client] = max(self.counters.get(request.client, 0.0), floor)
                self._idle.pop(request.client, None)
            self._clients[request.client] += 1
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None and not request.is_finished:
                request.status = RequestStatus.FINISHED_ABORTED
                self._retire(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt_all(self) -> None:
        """Every running request back to the front of the queue, in order, to be recomputed (after
        a failed step); the next output lists them as preempted, so the runner drops their state."""
        for request in reversed(self.running[:]):
            self._preempt(request)
            self._preempted_ids.add(request.request_id)

    def _retire(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)
        if self.config.policy == "vtc":
            self._left(request.client)

    def _left(self, client: str) -> None:
        """vtc: a client's request is gone. A client with none left keeps its counter (it is
        lifted to the smallest active one when it returns, so idling earns no credit) until
        ``MAX_IDLE_CLIENTS`` more recently active clients have left too: the counters stay
        bounded however many clients (``user`` values, or single requests) come and go."""
        self._clients[client] -= 1
        if self._clients[client] > 0:
            return
        del self._clients[client]
        self._idle[client] = None
        while len(self._idle) > MAX_IDLE_CLIENTS:
            self.counters.pop(self._idle.popitem(last=False)[0], None)

    def _key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time) if self.config.policy == "priority" else ()

    def _next_waiting(self) -> Request:
        if self.config.policy == "priority":
            return min(self.waiting, key=self._key)
        if self.config.policy == "vtc":  # the least-served client's oldest request (as _service)
            running = Counter(r.client for r in self.running)
            return min(self.waiting, key=lambda r: (self.counters.get(r.client, 0.0), running[r.client]))
        return self.waiting[0]

    def _service(self, request: Request) -> tuple[float, int]:
        """vtc: (the client's counter, its running requests) — ties (a client that just joined
        starts at the smallest counter) go to the client with fewer requests running."""
        return (self.counters.get(request.client, 0.0),
                sum(r.client == request.client for r in self.running))

    def _victim(self) -> Request:
        """The running request to preempt: the lowest priority (vtc: the most-served client's
        latest), else the latest admitted."""
        if self.config.policy == "priority":
            return max(self.running, key=self._key)
        if self.config.policy == "vtc":
            most = max(self.counters.get(r.client, 0.0) for r in self.running)
            return [r for r in self.running if self.counters.get(r.client, 0.0) == most][-1]
        return self.running[-1]

    def _charge(self, request: Request, n: int, sampled: bool, count: int = 1) -> None:
        """vtc: add the service of n computed tokens (prompt ones) and the sampled tokens."""
        prompt = max(0, min(n, request.num_prompt_tokens - request.num_computed_tokens))
        self.counters[request.client] = (self.counters.get(request.client, 0.0)
                                         + self.config.vtc_prompt_weight * prompt
                                         + self.config.vtc_output_weight * count * sampled)

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        victim.spec_token_ids = []
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.waiting.insert(0, victim)

    def _budgeted(self, owed: int, budget: int) -> int:
        cap = self.config.long_prefill_token_threshold
        return min(owed, budget, cap) if cap else min(owed, budget)

    # ---- one step ---------------------------------------------------------------------------
    def _favoured(self, out: SchedulerOutput) -> Request | None:
        """vtc: the least-served waiting request when its client has nothing running, is served
        no more than the most-served running client, and that client holds more than one running
        request and more than its share of them (a flood, not many clients with a request each).
        If every slot is taken, the flooding client's latest request gives up its slot
        (preempted, to be recomputed — mostly from the prefix cache — when its turn comes)."""
        if self.config.policy != "vtc" or not self.waiting or not self.running:
            return None
        want, victim = self._next_waiting(), self._victim()
        served, hog = self._service(want), self._service(victim)
        clients = len({r.client for r in self.running} | {want.client})
        if served[1] or served > hog or hog[1] <= max(1.0, len(self.running) / clients):
            return None
        if len(self.running) >= self.config.max_num_seqs:
            self._preempt(victim)
            out.preempted_req_ids.add(victim.request_id)
        return want

    def _admit(self, request: Request, out: SchedulerOutput, budget: int) -> int:
        """Move a waiting request to running with up to ``budget`` tokens this step (starting from
        its cached prefix); the tokens scheduled, or 0 if its blocks do not fit."""
        hits, cached = [], 0  # prompt logprobs score every prompt position: none from the cache
        if request.sampling_params.prompt_logprobs is None:
            hits, cached = self.kv.get_computed_blocks(request)
        n = self._budgeted(request.num_tokens - cached, budget)
        if self.kv.allocate_slots(request, n, hits, self.lookahead) is None:
            return 0
        self.waiting.remove(request)
        request.num_computed_tokens = cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.new_requests.append(NewRequestData(
            request.request_id, list(request.all_token_ids), request.sampling_params, request.lora,
            self.kv.block_ids(request.request_id), cached, request.num_prompt_tokens,
            len(hits) * self.kv.block_size > cached))
        out.num_scheduled_tokens[request.request_id] = n
        return n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids, preempted_req_ids=self._preempted_ids)
        self._finished_ids, self._preempted_ids = set(), set()
        budget = self.config.max_num_batched_tokens
        if self.config.policy == "vtc":  # running requests too: the least-served client's first
            self.running.sort(key=lambda r: self.counters.get(r.client, 0.0))
        # vtc: a returning light client's request runs alone for a step (the others wait one step),
        # so the step that gives it its first token is as short as on an idle server
        favoured = self._favoured(out)
        if favoured is not None and self._admit(favoured, out, budget):
            return out
        short_of_blocks = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            real = request.num_tokens - request.num_computed_tokens
            n = self._budgeted(real + len(request.spec_token_ids), budget)
            if n == 0:
                i += 1
                continue
            new_blocks = self.kv.allocate_slots(request, n, lookahead=self.lookahead)
            while new_blocks is None:
                short_of_blocks = True
                index = self.running.index(victim := self._victim())
                self._preempt(victim)
                out.preempted_req_ids.add(victim.request_id)
                if victim is request:
                    break
                if index < i:  # (priority policy) scheduled earlier in this step: undo that
                    budget += out.num_scheduled_tokens.pop(victim.request_id)
                    out.cached_requests = [c for c in out.cached_requests
                                           if c.request_id != victim.request_id]
                    i -= 1
                new_blocks = self.kv.allocate_slots(request, n, lookahead=self.lookahead)
            if new_blocks is None:  # the request preempted itself; the list shrank under i
                continue
            start = request.num_computed_tokens
            if n > real:  # verify the draft tokens that fit in the budget
                out.spec_token_ids[request.request_id] = request.spec_token_ids[:n - real]
            out.cached_requests.append(CachedRequestData(
                request.request_id, request.all_token_ids[start:start + n],
                [b.block_id for b in new_blocks], start))
            out.num_scheduled_tokens[request.request_id] = n
            budget -= n
            i += 1
        while (not short_of_blocks and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            n = self._admit(self._next_waiting(), out, budget)
            if n == 0:
                break
            budget -= n
        return out

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance the scheduled requests by the computed tokens and append the tokens each one
        sampled (only requests that reached the end of their tokens sample; a speculative step
        gives the accepted draft tokens and one more). Returns the requests that got tokens,
        finished ones included (their blocks already freed)."""
        updated = []
        for rid, n in output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted since
            drafts = len(output.spec_token_ids.get(rid, ()))
            tokens = sampled.get(rid, [])
            accepted = max(0, len(tokens) - 1) if drafts else 0
            real = n - drafts  # the drafts' K/V count as computed only where they were accepted
            if self.config.policy == "vtc":
                done = request.num_computed_tokens + real >= request.num_tokens
                self._charge(request, real, bool(tokens) and done, len(tokens))
            request.num_computed_tokens += real + accepted
            request.spec_token_ids = []
            if request.num_computed_tokens < request.num_tokens + accepted or not tokens:
                continue  # a prefill chunk: nothing to sample yet
            for token in tokens:
                if request.append_output(token).finished:
                    self._retire(request)
                    break
            updated.append(request)
        return updated
