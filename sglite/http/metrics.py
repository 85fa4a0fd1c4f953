"""/metrics in Prometheus' text format (prometheus_client), names in SGLang's style (`sglite:`).

Counted in the HTTP process, per request: requests (by route and outcome), prompt / generated /
cached tokens, time to first token and inter-token latency (streamed requests), end-to-end
latency. Read from the runtime at each scrape (its InfoOut counters): running and waiting
requests, KV pool usage, radix cache hit rate.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
        0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lab = {"model_name": model_name}
        self.labels = lab
        self.requests = Counter("sglite:requests", "HTTP generation requests",
                                ["model_name", "route", "status"], registry=r)
        self.prompt_tokens = Counter("sglite:prompt_tokens", "Prompt tokens", ["model_name"],
                                     registry=r).labels(**lab)
        self.generation_tokens = Counter("sglite:generation_tokens", "Generated tokens",
                                         ["model_name"], registry=r).labels(**lab)
        self.cached_tokens = Counter("sglite:cached_tokens", "Prompt tokens read from the radix "
                                     "cache", ["model_name"], registry=r).labels(**lab)
        self.ttft = Histogram("sglite:time_to_first_token_seconds", "Time to first token "
                              "(streamed requests)", ["model_name"], buckets=_LATENCY,
                              registry=r).labels(**lab)
        self.itl = Histogram("sglite:inter_token_latency_seconds", "Time between output tokens "
                             "(streamed requests)", ["model_name"], buckets=_ITL,
                             registry=r).labels(**lab)
        self.e2e = Histogram("sglite:e2e_request_latency_seconds", "End-to-end request latency",
                             ["model_name"], buckets=_LATENCY, registry=r).labels(**lab)
        self.running = Gauge("sglite:num_running_reqs", "Requests decoding in the runtime",
                             ["model_name"], registry=r).labels(**lab)
        self.waiting = Gauge("sglite:num_queue_reqs", "Requests waiting in the runtime",
                             ["model_name"], registry=r).labels(**lab)
        self.kv_usage = Gauge("sglite:token_usage", "Fraction of the KV pool held (not free, "
                              "not evictable)", ["model_name"], registry=r).labels(**lab)
        self.kv_total = Gauge("sglite:max_total_num_tokens", "KV pool size in tokens",
                              ["model_name"], registry=r).labels(**lab)
        self.hit_rate = Gauge("sglite:cache_hit_rate", "Prompt tokens served from the radix "
                              "cache, over all prompt tokens", ["model_name"], registry=r).labels(**lab)

    def finished(self, route: str, meta: dict, e2e: float) -> None:
        self.requests.labels(self.labels["model_name"], route, "ok").inc()
        self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        self.generation_tokens.inc(meta.get("completion_tokens", 0))
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        self.e2e.observe(e2e)

    def failed(self, route: str, status: str) -> None:
        self.requests.labels(self.labels["model_name"], route, status).inc()

    def render(self, info: dict) -> bytes:
        self.running.set(info.get("num_running_reqs", 0))
        self.waiting.set(info.get("num_waiting_reqs", 0))
        self.kv_usage.set(info.get("kv_usage", 0.0))
        self.kv_total.set(info.get("kv_total", 0))
        self.hit_rate.set(info.get("cache_hit_rate", 0.0))
        return generate_latest(self.registry)
