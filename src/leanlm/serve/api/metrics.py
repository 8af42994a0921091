"""Prometheus metrics of the server (vLLM's names where vLLM has one)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leanlm.serve.async_engine import RequestOutput


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("leanlm_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("leanlm_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("leanlm_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.hit_rate = Gauge("leanlm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                              registry=r)
        self.prompt_tokens = Counter("leanlm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("leanlm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("leanlm_requests_finished", "Finished requests", ["reason"], registry=r)
        self.drafts = Counter("leanlm_spec_decode_num_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted = Counter("leanlm_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                registry=r)
        self.spec_seen = (0, 0)  # the engine's (drafts, accepted) totals at the last scrape
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("leanlm_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r)
        self.itl = Histogram("leanlm_inter_token_latency_seconds", "ITL", buckets=buckets, registry=r)
        self.e2e = Histogram("leanlm_e2e_request_latency_seconds", "E2E latency", buckets=buckets,
                             registry=r)

    async def timed(self, stream: AsyncIterator[RequestOutput], start: float) -> AsyncIterator[RequestOutput]:
        """``stream``, observing TTFT, ITL, E2E latency and tokens on the way."""
        last = None
        async for out in stream:
            now = time.monotonic()
            if last is None:
                self.ttft.observe(now - start)
            else:
                self.itl.observe(now - last)
            last = now
            self.generation_tokens.inc(len(out.token_ids))
            if out.finished:
                self.e2e.observe(now - start)
                self.requests.labels(out.finish_reason or "stop").inc()
            yield out

    def scrape(self, engine: Any) -> str:
        """The exposition text, with the gauges read from the engine (an ``LLMEngine``) now."""
        s = engine.scheduler
        self.running.set(len(s.running))
        self.waiting.set(len(s.waiting))
        self.kv_usage.set(engine.kv.pool.usage)
        self.hit_rate.set(engine.kv.stats.hit_rate)
        # the engine keeps totals: the counters catch up with them at each scrape
        totals = (engine.spec_proposed, engine.spec_accepted)
        self.drafts.inc(totals[0] - self.spec_seen[0])
        self.accepted.inc(totals[1] - self.spec_seen[1])
        self.spec_seen = totals
        return generate_latest(self.registry).decode()
