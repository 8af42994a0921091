"""Prometheus metrics of the server (vLLM's names where vLLM has one).

Latencies and token counts are observed here, on the requests this API server streams. The
engine's own figures (running and waiting requests, KV-cache use, prefix-cache hits, drafts)
come from each data-parallel engine core's latest report: one series per core, labelled
``engine="<index>"``, which a Prometheus ``sum`` aggregates."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leanlm.serve.async_engine import RequestOutput
from leanlm.serve.messages import EngineStats


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        e = ["engine"]
        self.running = Gauge("leanlm_num_requests_running", "Requests in the running batch", e, registry=r)
        self.waiting = Gauge("leanlm_num_requests_waiting", "Requests waiting to be scheduled", e, registry=r)
        self.kv_usage = Gauge("leanlm_kv_cache_usage_ratio", "Fraction of KV blocks in use", e, registry=r)
        self.hit_rate = Gauge("leanlm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                              e, registry=r)
        self.prompt_tokens = Counter("leanlm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("leanlm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("leanlm_requests_finished", "Finished requests", ["reason"], registry=r)
        self.drafts = Counter("leanlm_spec_decode_num_draft_tokens", "Draft tokens verified", e, registry=r)
        self.accepted = Counter("leanlm_spec_decode_num_accepted_tokens", "Draft tokens accepted", e,
                                registry=r)
        self.queries = Counter("leanlm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                               e, registry=r)
        self.hits = Counter("leanlm_prefix_cache_hits", "Prompt tokens found in the prefix cache", e,
                            registry=r)
        # each engine's totals (drafts, accepted, queries, hits) at the last scrape
        self.seen: dict[int, tuple[int, int, int, int]] = {}
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

    def scrape(self, stats: dict[int, EngineStats]) -> str:
        """The exposition text, with the gauges set from each engine core's latest figures."""
        for index, st in stats.items():
            label = str(index)
            self.running.labels(label).set(st.running)
            self.waiting.labels(label).set(st.waiting)
            self.kv_usage.labels(label).set(st.kv_usage)
            self.hit_rate.labels(label).set(st.prefix_hit_rate)
            # the engines keep totals: the counters catch up with them at each scrape
            totals = (st.spec_proposed, st.spec_accepted, st.prefix_queries, st.prefix_hits)
            seen = self.seen.get(index, (0, 0, 0, 0))
            for counter, total, before in zip((self.drafts, self.accepted, self.queries, self.hits), totals,
                                              seen, strict=True):
                counter.labels(label).inc(max(0, total - before))
            self.seen[index] = totals
        return generate_latest(self.registry).decode()
